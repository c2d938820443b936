#!/usr/bin/env python3
"""Writes the hostile GGUF corpus (tests/hostile/) and the fuzz seeds
(tests/fuzz_corpus/). The files are committed; rerun this only to change
them. Each hostile file is a small valid llama-architecture GGUF with one
thing broken; tests/hostile/README.md (written here too) lists what and
the error each must get, and tests/hostile.rs checks it."""

import json
import math
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HOSTILE = os.path.join(ROOT, "tests", "hostile")
CORPUS = os.path.join(ROOT, "tests", "fuzz_corpus")

N_EMBD = 32
T_U8, T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY, T_U64 = 0, 4, 5, 6, 7, 8, 9, 10
F32, F16, Q8_0, Q4_K, IQ2_XXS = 0, 1, 8, 12, 16


def pseudo(n, seed):
    s = seed * 2654435761 % 2**32 or 1
    out = []
    for _ in range(n):
        s = (s * 1103515245 + 12345) % 2**31
        out.append(s / 2**31 - 0.5)
    return out


def f16_bits(x):
    return struct.unpack("<H", struct.pack("<e", x))[0]


def q8_0(values):
    out = b""
    for i in range(0, len(values), 32):
        block = values[i : i + 32]
        amax = max(abs(v) for v in block)
        d = amax / 127 if amax else 0.0
        qs = [int(round(v / d)) if d else 0 for v in block]
        out += struct.pack("<H", f16_bits(d)) + struct.pack("<32b", *qs)
    return out


def encode_tensor(ty, values):
    if ty == F32:
        return struct.pack(f"<{len(values)}f", *values)
    if ty == F16:
        return struct.pack(f"<{len(values)}e", *values)
    if ty == Q8_0:
        return q8_0(values)
    raise ValueError(ty)


def s(text):
    raw = text if isinstance(text, bytes) else text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv(key, ty, payload):
    return s(key) + struct.pack("<I", ty) + payload


def kv_str(key, value):
    return kv(key, T_STRING, s(value))


def kv_u32(key, value):
    return kv(key, T_U32, struct.pack("<I", value))


class Model:
    """A GGUF under construction: metadata, tensor infos, data."""

    def __init__(self, n_embd=N_EMBD, arch="llama"):
        self.version = 3
        self.kvs = [
            kv_str("general.architecture", arch),
            kv_str("general.name", "hostile"),
            kv_u32(f"{arch}.block_count", 1),
            kv_u32(f"{arch}.embedding_length", n_embd),
        ]
        e = n_embd
        self.tensors = []  # [name, dims, type, data bytes]
        self.add("token_embd.weight", [e, 8], Q8_0, 1)
        self.add("blk.0.attn_norm.weight", [e], F32, 2)
        self.add("blk.0.attn_output.weight", [e, e], Q8_0, 3)
        self.add("blk.0.ffn_down.weight", [2 * e, e], Q8_0, 4)
        self.add("output_norm.weight", [e], F32, 5)
        self.alignment = 32
        self.n_kv = None  # override the counts written in the header
        self.n_tensors = None

    def add(self, name, dims, ty, seed, data=None):
        n = math.prod(dims)
        if data is None:
            data = encode_tensor(ty, pseudo(n, seed))
        self.tensors.append([name, dims, ty, data])

    def tensor(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def encode(self, offsets=None, n_dims=None, raw_infos=None):
        out = b"GGUF" + struct.pack("<I", self.version)
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        out += struct.pack("<QQ", n_tensors, n_kv)
        out += b"".join(self.kvs)
        offset, data, auto = 0, b"", []
        for name, dims, ty, blob in self.tensors:
            auto.append(offset)
            data += blob
            pad = (-len(data)) % self.alignment
            data += b"\0" * pad
            offset = len(data)
        for i, (name, dims, ty, blob) in enumerate(self.tensors):
            if raw_infos and name in raw_infos:
                out += raw_infos[name]
                continue
            nd = len(dims) if n_dims is None or name not in n_dims else n_dims[name]
            out += s(name) + struct.pack("<I", nd)
            out += b"".join(struct.pack("<Q", d) for d in dims)
            off = auto[i] if offsets is None or name not in offsets else offsets[name]
            out += struct.pack("<IQ", ty, off)
        out += b"\0" * ((-len(out)) % self.alignment)
        return out + data


def write(directory, name, data):
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def hostile_cases():
    """(file name, bytes, description, expected error substring)."""
    cases = []

    def case(name, data, what, expect):
        cases.append((name, data, what, expect))

    base = Model().encode()
    case("00-valid-control.gguf", base, "the valid base all others break (must succeed)", "OK")
    case("01-empty.gguf", b"", "an empty file", "file too short")
    case("02-three-bytes.gguf", b"GGU", "three bytes, shorter than the magic", "file too short")
    case("03-bad-magic.gguf", b"GGML" + base[4:], "magic GGML instead of GGUF", "bad magic")
    case("04-version-1.gguf", base[:4] + struct.pack("<I", 1) + base[8:], "GGUF version 1", "unsupported GGUF version 1")
    case("05-version-4.gguf", base[:4] + struct.pack("<I", 4) + base[8:], "GGUF version 4 (from the future)", "unsupported GGUF version 4")
    m = Model(); m.n_kv = 2**63
    case("06-huge-kv-count.gguf", m.encode(), "2^63 metadata entries claimed", "more than the file can hold")
    m = Model(); m.n_tensors = 2**40
    case("07-huge-tensor-count.gguf", m.encode(), "2^40 tensors claimed", "more than the file can hold")
    case("08-header-only.gguf", base[:24], "magic, version and counts, then nothing", "more than the file can hold")
    m = Model(); m.kvs[1] = struct.pack("<Q", 2**62) + b"general.name"
    case("09-huge-key-length.gguf", m.encode(), "a key whose length is 2^62", "truncated at byte")
    m = Model(); m.kvs[1] = kv(b"general.\xff\xfename", T_STRING, s("x"))
    case("10-non-utf8-key.gguf", m.encode(), "a key that is not UTF-8", "invalid UTF-8")
    m = Model(); m.kvs[1] = kv("general.name", T_STRING, s(b"caf\xc3(\xa9"))
    case("11-non-utf8-value.gguf", m.encode(), "a string value that is not UTF-8", "invalid UTF-8")
    m = Model(); m.kvs[1] = kv("general.name", 13, b"")
    case("12-unknown-value-type.gguf", m.encode(), "metadata value type 13", "unknown metadata value type 13")
    m = Model(); m.kvs.append(kv("tokenizer.ggml.scores", T_ARRAY, struct.pack("<IQ", T_F32, 2**61)))
    case("13-huge-array.gguf", m.encode(), "an f32 array claiming 2^61 elements", "runs past the end of the file")
    m = Model(); m.kvs.append(kv("test.nested", T_ARRAY, struct.pack("<IQ", T_ARRAY, 1) + struct.pack("<IQ", T_U8, 1) + b"\1"))
    case("14-nested-array.gguf", m.encode(), "an array of arrays", "nested arrays are not supported")
    m = Model(); m.kvs.append(kv("test.weird", T_ARRAY, struct.pack("<IQ", 77, 1) + b"\0" * 8))
    case("15-array-unknown-type.gguf", m.encode(), "an array of element type 77", "unknown metadata value type 77")
    m = Model(); m.kvs.append(kv_str("general.name", "again"))
    case("16-duplicate-key.gguf", m.encode(), "general.name twice", "duplicate metadata key general.name")
    m = Model(); m.kvs.append(kv_u32("general.alignment", 0))
    case("17-alignment-zero.gguf", m.encode(), "general.alignment = 0", "general.alignment must be a power-of-two")
    m = Model(); m.kvs.append(kv_u32("general.alignment", 48))
    case("18-alignment-48.gguf", m.encode(), "general.alignment = 48, not a power of two", "general.alignment must be a power-of-two")
    m = Model(); m.kvs.append(kv_str("general.alignment", "32"))
    case("19-alignment-string.gguf", m.encode(), "general.alignment stored as a string", "general.alignment must be a power-of-two")
    m = Model()
    case("20-zero-dims.gguf", m.encode(n_dims={"output_norm.weight": 0}), "a tensor with 0 dimensions", "0 dimensions")
    m = Model(); m.tensor("output_norm.weight")[1] = [N_EMBD, 1, 1, 1, 1]
    case("21-five-dims.gguf", m.encode(), "a tensor with 5 dimensions", "5 dimensions")
    m = Model(); m.tensor("blk.0.ffn_down.weight")[1] = [2 * N_EMBD, 0]
    case("22-zero-sized-dim.gguf", m.encode(), "ffn_down with a zero-sized axis (the crash a bit flip found)", "dimension 1 is zero")
    m = Model(); m.tensor("blk.0.attn_norm.weight")[1] = [32, 2**40, 2**40]
    case("23-dims-overflow.gguf", m.encode(), "dimensions whose product overflows u64", "element count overflows")
    m = Model(); m.tensor("output_norm.weight")[2] = 99
    case("24-unknown-ggml-type.gguf", m.encode(), "ggml type 99", "unknown ggml type id 99")
    m = Model(); m.tensor("blk.0.attn_output.weight")[1] = [33, N_EMBD - 1]
    case("25-partial-block.gguf", m.encode(), "a Q8_0 row of 33 elements (blocks are 32)", "not a whole number of Q8_0 blocks")
    m = Model()
    case("26-misaligned-offset.gguf", m.encode(offsets={"output_norm.weight": 4}), "a tensor offset that is not a multiple of 32", "is not aligned to 32")
    m = Model()
    case("27-offset-past-end.gguf", m.encode(offsets={"output_norm.weight": 2**20}), "a tensor 1 MiB past the end of the file", "runs past the end of the file")
    m = Model()
    case("28-offset-wraps.gguf", m.encode(offsets={"output_norm.weight": 2**64 - 32}), "offset + size overflows u64", "runs past the end of the file")
    m = Model()
    case("29-overlap.gguf", m.encode(offsets={"blk.0.attn_output.weight": 0}), "attn_output placed on top of token_embd", "overlap")
    m = Model(); m.tensor("output_norm.weight")[0] = "blk.0.attn_norm.weight"
    case("30-duplicate-tensor.gguf", m.encode(), "two tensors named blk.0.attn_norm.weight", "duplicate tensor name")
    case("31-truncated-data.gguf", base[: len(base) - 100], "cut 100 bytes into the last tensor's data", "runs past the end of the file (truncated?)")
    m = Model(); m.kvs.append(kv_u32("split.count", 0))
    case("32-split-count-zero.gguf", m.encode(), "split.count = 0", "split.count is 0")
    m = Model(); m.kvs += [kv("split.no", 2, struct.pack("<H", 3)), kv("split.count", 2, struct.pack("<H", 2))]
    case("33-split-no-past-count.gguf", m.encode(), "split.no = 3 of split.count = 2", "split.no is 3 but split.count is 2")
    m = Model(); m.kvs.append(kv("split.count", T_U64, struct.pack("<Q", 2**32 + 2)))
    case("34-split-count-huge.gguf", m.encode(), "split.count = 2^32 + 2 (wraps to 2 as u32)", "split.count is 4294967298")
    m = Model(); m.kvs.append(kv_str("split.count", "2"))
    case("35-split-count-string.gguf", m.encode(), "split.count stored as a string", "split.count must be a non-negative integer")
    m = Model(); m.kvs += [kv("split.no", 2, struct.pack("<H", 0)), kv("split.count", 2, struct.pack("<H", 2))]
    case("36-split-plain-name.gguf", m.encode(), "first of 2 shards, but not named -00001-of-00002", "its name is not PREFIX-00001-of-00002.gguf")
    m = Model(); m.kvs += [kv("split.no", 2, struct.pack("<H", 1)), kv("split.count", 2, struct.pack("<H", 2))]
    case("37-second-shard.gguf", m.encode(), "shard 2 of 2 passed as the model", "is shard 2 of a split")
    m = Model(); m.kvs += [kv("split.no", 2, struct.pack("<H", 0)), kv("split.count", 2, struct.pack("<H", 2))]
    case("38-lonely-00001-of-00002.gguf", m.encode(), "first of 2 shards whose second shard is missing", "cannot open")
    first = Model(); first.kvs += [kv("split.no", 2, struct.pack("<H", 0)), kv("split.count", 2, struct.pack("<H", 2))]
    case("39-pair-00001-of-00002.gguf", first.encode(), "first of 2 shards; its second shard says it is shard 1", "does not say it is shard 2 of 2")
    case("39-pair-00002-of-00002.gguf", first.encode(), "the lying second shard of 39-pair (split.no = 0)", "its name is not PREFIX-00001-of-00002.gguf")
    m = Model(); del m.kvs[0]
    case("40-no-architecture.gguf", m.encode(), "no general.architecture", "no general.architecture key")
    m = Model(); del m.kvs[3]
    case("41-no-embedding-length.gguf", m.encode(), "no llama.embedding_length", "no llama.embedding_length key")
    m = Model(); m.kvs[3] = kv_u32("llama.embedding_length", 64)
    case("42-embedding-length-lies.gguf", m.encode(), "embedding_length 64 while the tensors have 32", "the model's n_embd is 64")
    m = Model(); m.tensor("blk.0.attn_output.weight")[1] = [N_EMBD * 2, N_EMBD // 2]
    case("43-wrong-residual-axis.gguf", m.encode(), "attn_output whose output axis is not n_embd", "residual axis should be n_embd")
    m = Model()
    vals = pseudo(2 * N_EMBD * N_EMBD, 9); vals[77] = float("nan")
    m.tensor("blk.0.ffn_down.weight")[2:] = [F32, encode_tensor(F32, vals)]
    case("44-nan-weight.gguf", m.encode(), "an F32 ffn_down holding one NaN", "NaN or Inf")
    m = Model()
    blob = bytearray(m.tensor("blk.0.attn_output.weight")[3]); blob[0:2] = struct.pack("<H", 0x7C00)
    m.tensor("blk.0.attn_output.weight")[3] = bytes(blob)
    case("45-inf-scale.gguf", m.encode(), "a Q8_0 block whose f16 scale is +Inf", "NaN or Inf")
    m = Model()
    m.tensor("blk.0.ffn_down.weight")[1:] = [[256, N_EMBD], IQ2_XXS, b"\0" * (66 * N_EMBD)]
    case("46-iq2-xxs.gguf", m.encode(), "ffn_down in IQ2_XXS, which needs an importance matrix", "importance matrix")
    m = Model(); m.tensor("output_norm.weight")[0] = b"output\xffnorm"
    raw = s(b"output\xffnorm") + struct.pack("<I", 1) + struct.pack("<Q", N_EMBD) + struct.pack("<IQ", F32, 0)
    case("47-non-utf8-tensor-name.gguf", m.encode(raw_infos={b"output\xffnorm": raw}), "a tensor name that is not UTF-8", "invalid UTF-8")
    m = Model(); enc = m.encode()
    info_start = enc.index(s("output_norm.weight"))
    case("48-truncated-tensor-info.gguf", enc[: info_start + 30], "cut inside the last tensor info", "truncated at byte")
    m = Model(); m.tensors = [t for t in m.tensors if "norm" in t[0]]
    case("49-no-residual-writers.gguf", m.encode(), "only norm weights, nothing to edit", "no tensor that writes into the residual stream")
    m = Model(); m.kvs[3] = kv("llama.embedding_length", T_F32, struct.pack("<f", 32.0))
    case("50-embedding-length-float.gguf", m.encode(), "embedding_length stored as f32", "no llama.embedding_length key")
    return cases


def fuzz_seeds():
    """Small valid inputs for every reader the fuzz harness mutates."""
    seeds = {}
    seeds["q8_0.gguf"] = Model().encode()
    m = Model()
    for t in m.tensors:
        if t[2] == Q8_0:
            t[2:] = [F16, encode_tensor(F16, pseudo(math.prod(t[1]), 7))]
    m.kvs.append(kv("tokenizer.ggml.tokens", T_ARRAY, struct.pack("<IQ", T_STRING, 3) + s("a") + s("b") + s("<|im_end|>")))
    m.kvs.append(kv("tokenizer.ggml.token_type", T_ARRAY, struct.pack("<IQ", T_I32, 3) + struct.pack("<3i", 1, 1, 3)))
    m.kvs.append(kv("test.flag", T_BOOL, b"\1"))
    seeds["f16-tokenizer.gguf"] = m.encode()
    m = Model(); m.alignment = 64; m.kvs.append(kv_u32("general.alignment", 64)); m.version = 2
    seeds["v2-align64.gguf"] = m.encode()
    shard = Model(); shard.kvs += [kv("split.no", 2, struct.pack("<H", 0)), kv("split.count", 2, struct.pack("<H", 2))]
    seeds["split-00001-of-00002.gguf"] = shard.encode()
    second = Model(); second.kvs = [kv("split.no", 2, struct.pack("<H", 1)), kv("split.count", 2, struct.pack("<H", 2))]
    second.tensors = []
    second.add("blk.1.ffn_down.weight", [2 * N_EMBD, N_EMBD], Q8_0, 11)
    seeds["split-00002-of-00002.gguf"] = second.encode()
    direction = [round(v, 6) for v in pseudo(N_EMBD, 3)]
    seeds["direction.json"] = json.dumps({"direction": direction, "layer": 0, "position": 1, "model": "hostile"}).encode()
    seeds["prompts.txt"] = b"How do I bake bread?\nWrite a poem about rain.\n\nList three prime numbers.\n"
    seeds["prompts.jsonl"] = b'{"instruction": "How do I bake bread?"}\n{"prompt": "x", "instruction": "Write a poem"}\n{"goal": "List primes"}\n'
    seeds["prompts.csv"] = b'id,prompt,notes\n1,"Say ""hi"", please",a\n2,"two\nlines",b\n3,plain,\n'
    # Importance matrices, as llama-imatrix writes them: GGUF (in_sum2 and
    # counts per weight, one with two experts) and the legacy .dat.
    imx = Model()
    imx.kvs = [kv_str("general.type", "imatrix"), kv_u32("imatrix.chunk_count", 2), kv_u32("imatrix.chunk_size", 512)]
    imx.tensors = []
    sq = lambda n, seed: [abs(v) * 8 for v in pseudo(n, seed)]
    imx.add("blk.0.attn_output.weight.in_sum2", [N_EMBD, 1], F32, 0, encode_tensor(F32, sq(N_EMBD, 21)))
    imx.add("blk.0.attn_output.weight.counts", [1, 1], F32, 0, encode_tensor(F32, [4.0]))
    imx.add("blk.0.ffn_down_exps.weight.in_sum2", [2 * N_EMBD, 2], F32, 0, encode_tensor(F32, sq(4 * N_EMBD, 22)))
    imx.add("blk.0.ffn_down_exps.weight.counts", [1, 2], F32, 0, encode_tensor(F32, [3.0, 0.0]))
    seeds["imatrix.gguf"] = imx.encode()
    dat = struct.pack("<i", 2)
    for name, values in [(b"blk.0.attn_output.weight", sq(N_EMBD, 23)), (b"blk.0.ffn_down.weight", sq(2 * N_EMBD, 24))]:
        dat += struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, len(values)) + encode_tensor(F32, values)
    dat += struct.pack("<ii", 2, 8) + b"data.txt"
    seeds["imatrix.dat"] = dat
    return seeds


def main():
    os.makedirs(HOSTILE, exist_ok=True)
    os.makedirs(CORPUS, exist_ok=True)
    cases = hostile_cases()
    names = [c[0] for c in cases]
    assert len(set(names)) == len(names), "duplicate hostile names"
    lines = [
        "# Hostile GGUFs",
        "",
        "Hand-made broken files: a small valid llama GGUF (n_embd 32, Q8_0) with one thing wrong.",
        "`tests/hostile.rs` runs `apply` on each and expects exit 1, one `error:` line containing",
        "the text in the last column, no output and no temporary file (`00-valid-control.gguf` must",
        "succeed). Written by `scripts/make-hostile.py`; `direction.json` is the direction used.",
        "",
        "| file | what is wrong | expected error contains |",
        "|---|---|---|",
    ]
    for name, data, what, expect in cases:
        write(HOSTILE, name, data)
        lines.append(f"| `{name}` | {what} | `{expect}` |")
    with open(os.path.join(HOSTILE, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    direction = [round(v, 6) for v in pseudo(N_EMBD, 3)]
    write(HOSTILE, "direction.json", json.dumps({"direction": direction}).encode())
    for name, data in fuzz_seeds().items():
        write(CORPUS, name, data)
    print(f"{len(cases)} hostile files, {len(fuzz_seeds())} fuzz seeds", file=sys.stderr)


if __name__ == "__main__":
    main()
