//! A stable-toolchain fuzz harness for every reader: the GGUF header,
//! metadata and tensor-info parser, split-shard logic, the edit plan and the
//! rewrite (`apply` as a library), direction JSON, prompt files and
//! importance matrices (llama-imatrix's GGUF and legacy .dat forms).
//!
//! Inputs are the committed seeds in tests/fuzz_corpus/ (written by
//! scripts/make-hostile.py) mutated with knowledge of the GGUF layout (bit
//! flips, truncation at every field boundary, huge counts, out-of-range and
//! overlapping offsets, bad alignments, wrong type tags, non-UTF-8 strings),
//! plus GGUFs built from `arbitrary` values. The property: no panic, no
//! abort, and no single allocation by a reader (open, shards, plan, JSON,
//! prompts) larger than four times the input plus 64 KiB, so a forged count
//! can never size an allocation. (Scalar arrays are kept as their bytes; a
//! string array's items are 32-byte values for at least 8 file bytes each,
//! hence the 4.) The rewrite (`apply`) runs on every mutant that
//! plans; its allocations follow tensor sizes, already bounded by the file,
//! and are not counted. A sample of mutants also goes through the binary.
//!
//! `FUZZ_CASES` (default 40,000) and `FUZZ_SEED` choose the run;
//! `scripts/fuzz.sh` runs long campaigns. Failing inputs are saved under
//! target/fuzz-failures/.

use crate::common::{apply_hostile, clean_failure, repo_path};
use arbitrary::{Arbitrary, Unstructured};
use gguf_abliterate::apply::{apply, ApplyOptions};
use gguf_abliterate::direction::DirectionFile;
use gguf_abliterate::edit::plan_edits;
use gguf_abliterate::gguf::{open_model, shards};
use gguf_abliterate::imatrix::Imatrix;
use gguf_abliterate::prompts::PromptSet;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Allocation tracking: the largest single request made by this thread while
// a case runs.

struct Tracking;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` with allocation tracking on; returns its result (or the panic
/// message) and the largest allocation it made.
fn tracked<T>(f: impl FnOnce() -> T) -> (Result<T, String>, usize) {
    LARGEST.with(|l| l.set(0));
    TRACK.with(|t| t.set(true));
    let result = catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into())
    });
    TRACK.with(|t| t.set(false));
    (result, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------
// Randomness.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// An independent, lenient walk over a GGUF that records where each field is,
// so that mutations can aim at counts, offsets, dims and type tags.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Field {
    /// Tensor or KV count, string length or array length (u64).
    Count,
    /// Metadata value type tag (u32).
    ValueType,
    /// A metadata scalar value (any width).
    Scalar,
    /// String bytes.
    Text,
    NDims,
    Dim,
    GgmlType,
    Offset,
    Version,
}

struct Layout2 {
    fields: Vec<(usize, usize, Field)>,
    alignment_value: Option<usize>,
}

fn walk(b: &[u8]) -> Layout2 {
    let mut fields = Vec::new();
    let mut alignment_value = None;
    let mut pos = 0usize;
    let u32_at = |p: usize| {
        b.get(p..p + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    };
    let u64_at = |p: usize| {
        b.get(p..p + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
    };
    let push = |fields: &mut Vec<_>, p: usize, len: usize, f: Field| fields.push((p, len, f));
    (|| -> Option<()> {
        push(&mut fields, 4, 4, Field::Version);
        let n_tensors = u64_at(8)?;
        let n_kv = u64_at(16)?;
        push(&mut fields, 8, 8, Field::Count);
        push(&mut fields, 16, 8, Field::Count);
        pos = 24;
        let string = |fields: &mut Vec<_>, pos: &mut usize| -> Option<Vec<u8>> {
            let len = u64_at(*pos)? as usize;
            fields.push((*pos, 8, Field::Count));
            let text = b.get(*pos + 8..(*pos + 8).checked_add(len)?)?.to_vec();
            fields.push((*pos + 8, len, Field::Text));
            *pos += 8 + len;
            Some(text)
        };
        fn scalar(ty: u32) -> Option<usize> {
            Some(match ty {
                0 | 1 | 7 => 1,
                2 | 3 => 2,
                4..=6 => 4,
                10..=12 => 8,
                _ => return None,
            })
        }
        for _ in 0..n_kv.min(10_000) {
            let key = string(&mut fields, &mut pos)?;
            let ty = u32_at(pos)?;
            fields.push((pos, 4, Field::ValueType));
            pos += 4;
            match ty {
                8 => {
                    string(&mut fields, &mut pos)?;
                }
                9 => {
                    let et = u32_at(pos)?;
                    fields.push((pos, 4, Field::ValueType));
                    let n = u64_at(pos + 4)?;
                    fields.push((pos + 4, 8, Field::Count));
                    pos += 12;
                    for _ in 0..n.min(100_000) {
                        if et == 8 {
                            string(&mut fields, &mut pos)?;
                        } else {
                            let w = scalar(et)?;
                            fields.push((pos, w, Field::Scalar));
                            pos += w;
                        }
                    }
                }
                t => {
                    let w = scalar(t)?;
                    if key == b"general.alignment" {
                        alignment_value = Some(pos);
                    }
                    fields.push((pos, w, Field::Scalar));
                    pos += w;
                }
            }
        }
        for _ in 0..n_tensors.min(10_000) {
            string(&mut fields, &mut pos)?;
            let nd = u32_at(pos)?;
            fields.push((pos, 4, Field::NDims));
            pos += 4;
            for _ in 0..nd.min(8) {
                u64_at(pos)?;
                fields.push((pos, 8, Field::Dim));
                pos += 8;
            }
            fields.push((pos, 4, Field::GgmlType));
            fields.push((pos + 4, 8, Field::Offset));
            pos += 12;
        }
        Some(())
    })();
    fields.retain(|&(p, len, _)| p + len <= b.len());
    Layout2 {
        fields,
        alignment_value,
    }
}

const INTERESTING_U64: &[u64] = &[
    0,
    1,
    2,
    31,
    32,
    33,
    255,
    4096,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    1 << 62,
    1 << 63,
    u64::MAX,
    u64::MAX - 31,
];

fn put(b: &mut [u8], pos: usize, len: usize, value: u64) {
    let bytes = value.to_le_bytes();
    let n = len.min(8);
    if let Some(target) = b.get_mut(pos..pos + n) {
        target.copy_from_slice(&bytes[..n]);
    }
}

/// Applies one structure-aware mutation chosen by `u`.
fn mutate(b: &mut Vec<u8>, u: &mut Unstructured, donors: &[Vec<u8>]) -> arbitrary::Result<()> {
    let layout = walk(b);
    let pick_field = |u: &mut Unstructured,
                      want: &[Field]|
     -> arbitrary::Result<Option<(usize, usize, Field)>> {
        let matching: Vec<_> = layout
            .fields
            .iter()
            .filter(|f| want.is_empty() || want.contains(&f.2))
            .copied()
            .collect();
        if matching.is_empty() {
            return Ok(None);
        }
        Ok(Some(*u.choose(&matching)?))
    };
    match u.int_in_range(0u8..=12)? {
        0 => {
            // Bit flips anywhere (mostly in the header, where parsing lives).
            for _ in 0..u.int_in_range(1..=8)? {
                if b.is_empty() {
                    break;
                }
                let limit = if u.ratio(3, 4)? {
                    b.len()
                        .min(layout.fields.last().map_or(64, |f| f.0 + f.1 + 64))
                } else {
                    b.len()
                };
                let i = u.choose_index(limit)?;
                b[i] ^= 1 << u.int_in_range(0..=7)?;
            }
        }
        1 => {
            // Truncate at a field boundary.
            if let Some((p, len, _)) = pick_field(u, &[])? {
                b.truncate(if u.arbitrary()? { p } else { p + len });
            }
        }
        2 => {
            let cut = u.choose_index(b.len().max(1))?;
            b.truncate(cut);
        }
        3 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::Count])? {
                let orig = b[p..p + 8].try_into().map(u64::from_le_bytes).unwrap_or(0);
                let v = match u.int_in_range(0..=3)? {
                    0 => orig.wrapping_add(1),
                    1 => orig.wrapping_sub(1),
                    2 => b.len() as u64,
                    _ => *u.choose(INTERESTING_U64)?,
                };
                put(b, p, len, v);
            }
        }
        4 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::Offset])? {
                let others: Vec<u64> = layout
                    .fields
                    .iter()
                    .filter(|f| f.2 == Field::Offset)
                    .map(|f| u64::from_le_bytes(b[f.0..f.0 + 8].try_into().unwrap()))
                    .collect();
                let orig = u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
                let v = match u.int_in_range(0..=4)? {
                    0 => *u.choose(&others)?, // overlap
                    1 => orig.wrapping_add(u.int_in_range(1..=64)?),
                    2 => b.len() as u64,
                    3 => orig.wrapping_sub(32),
                    _ => *u.choose(INTERESTING_U64)?,
                };
                put(b, p, len, v);
            }
        }
        5 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::Dim])? {
                let orig = u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
                let v = match u.int_in_range(0..=2)? {
                    0 => 0,
                    1 => orig.wrapping_mul(u.int_in_range(2..=4)?),
                    _ => *u.choose(INTERESTING_U64)?,
                };
                put(b, p, len, v);
            }
        }
        6 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::NDims])? {
                put(
                    b,
                    p,
                    len,
                    *u.choose(&[0u64, 1, 2, 3, 4, 5, 255, u32::MAX as u64])?,
                );
            }
        }
        7 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::ValueType])? {
                put(b, p, len, u.int_in_range(0..=14)?);
            }
        }
        8 => {
            if let Some((p, len, _)) = pick_field(u, &[Field::GgmlType])? {
                let v = if u.ratio(7, 8)? {
                    u.int_in_range(0..=41)?
                } else {
                    u.arbitrary::<u32>()? as u64
                };
                put(b, p, len, v);
            }
        }
        9 => {
            // Non-UTF-8 bytes inside a string.
            if let Some((p, len, _)) = pick_field(u, &[Field::Text])? {
                if len > 0 {
                    let i = p + u.choose_index(len)?;
                    b[i] = *u.choose(&[0xFFu8, 0xC3, 0x80, 0xED, 0x00])?;
                }
            }
        }
        10 => {
            // General alignment, where a seed has one; else any scalar.
            let target = match layout.alignment_value {
                Some(p) => Some((p, 4, Field::Scalar)),
                None => pick_field(u, &[Field::Scalar])?,
            };
            if let Some((p, len, _)) = target {
                put(
                    b,
                    p,
                    len,
                    *u.choose(&[0u64, 1, 3, 16, 48, 64, 1 << 31, u32::MAX as u64])?,
                );
            }
        }
        11 => {
            // Duplicate or delete a field's bytes (shifts everything after).
            if let Some((p, len, _)) = pick_field(u, &[])? {
                if u.arbitrary()? {
                    let copy = b[p..p + len].to_vec();
                    b.splice(p..p, copy);
                } else {
                    b.drain(p..p + len);
                }
            }
        }
        _ => {
            // Splice a piece of another seed in.
            let donor = u.choose(donors)?;
            if !donor.is_empty() && !b.is_empty() {
                let from = u.choose_index(donor.len())?;
                let n = u.int_in_range(1..=64usize)?.min(donor.len() - from);
                let at = u.choose_index(b.len())?;
                let end = (at + n).min(b.len());
                b.splice(at..end, donor[from..from + n].iter().copied());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// GGUFs built from arbitrary values: valid framing, hostile contents.

#[derive(Arbitrary, Debug)]
enum ArbValue {
    U8(u8),
    U32(u32),
    I32(i32),
    F32(f32),
    U64(u64),
    Bool(u8),
    Str(String),
    RawStr(Vec<u8>),
    Array(u8, Vec<u32>),
    StrArray(Vec<String>),
    BadType(u32, u32),
}

#[derive(Arbitrary, Debug)]
enum ArbKey {
    Arch(bool),
    EmbeddingLength,
    BlockCount,
    Alignment,
    SplitNo,
    SplitCount,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum ArbName {
    TokenEmbd,
    AttnOutput(u8),
    FfnDown(u8),
    FfnDownExps(u8),
    Norm(u8),
    Output,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct ArbTensor {
    name: ArbName,
    dims: Vec<u16>,
    big_dim: Option<u64>,
    ty: u8,
    offset: Option<u64>,
    data: u16,
}

#[derive(Arbitrary, Debug)]
struct ArbGguf {
    version: u8,
    kvs: Vec<(ArbKey, ArbValue)>,
    tensors: Vec<ArbTensor>,
    n_embd: u8,
    fill: u8,
}

fn enc_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s);
}

impl ArbGguf {
    fn encode(&self) -> Vec<u8> {
        let n_embd = 32 * (1 + u64::from(self.n_embd % 4));
        let mut out = b"GGUF".to_vec();
        out.extend(u32::from(2 + self.version % 3).to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64 + 2).to_le_bytes());
        enc_str(&mut out, b"general.architecture");
        out.extend(8u32.to_le_bytes());
        enc_str(&mut out, b"llama");
        enc_str(&mut out, b"llama.embedding_length");
        out.extend(4u32.to_le_bytes());
        out.extend((n_embd as u32).to_le_bytes());
        for (key, value) in &self.kvs {
            let key = match key {
                ArbKey::Arch(true) => "general.architecture".to_string(),
                ArbKey::Arch(false) => "gemma3.embedding_length".to_string(),
                ArbKey::EmbeddingLength => "llama.embedding_length".to_string(),
                ArbKey::BlockCount => "llama.block_count".to_string(),
                ArbKey::Alignment => "general.alignment".to_string(),
                ArbKey::SplitNo => "split.no".to_string(),
                ArbKey::SplitCount => "split.count".to_string(),
                ArbKey::Other(s) => s.clone(),
            };
            enc_str(&mut out, key.as_bytes());
            match value {
                ArbValue::U8(v) => {
                    out.extend(0u32.to_le_bytes());
                    out.push(*v);
                }
                ArbValue::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                ArbValue::I32(v) => {
                    out.extend(5u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                ArbValue::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                ArbValue::U64(v) => {
                    out.extend(10u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                ArbValue::Bool(v) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(*v);
                }
                ArbValue::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    enc_str(&mut out, s.as_bytes());
                }
                ArbValue::RawStr(s) => {
                    out.extend(8u32.to_le_bytes());
                    enc_str(&mut out, s);
                }
                ArbValue::Array(ty, items) => {
                    out.extend(9u32.to_le_bytes());
                    let ty = u32::from(ty % 14);
                    out.extend(ty.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        out.extend(&item.to_le_bytes()[..(item % 9) as usize % 5]);
                    }
                }
                ArbValue::StrArray(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        enc_str(&mut out, s.as_bytes());
                    }
                }
                ArbValue::BadType(ty, v) => {
                    out.extend(ty.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
            }
        }
        let mut offset = 0u64;
        let mut data_len = 0u64;
        for t in &self.tensors {
            let name = match &t.name {
                ArbName::TokenEmbd => "token_embd.weight".to_string(),
                ArbName::AttnOutput(l) => format!("blk.{}.attn_output.weight", l % 3),
                ArbName::FfnDown(l) => format!("blk.{}.ffn_down.weight", l % 3),
                ArbName::FfnDownExps(l) => format!("blk.{}.ffn_down_exps.weight", l % 3),
                ArbName::Norm(l) => format!("blk.{}.attn_norm.weight", l % 3),
                ArbName::Output => "output.weight".to_string(),
                ArbName::Other(s) => s.clone(),
            };
            enc_str(&mut out, name.as_bytes());
            let mut dims: Vec<u64> = t.dims.iter().take(5).map(|&d| u64::from(d % 512)).collect();
            if let (Some(big), Some(first)) = (t.big_dim, dims.first_mut()) {
                *first = big;
            }
            if dims.len() >= 2 && t.data % 3 == 0 {
                dims[1] = n_embd; // more likely to reach the rewrite
            }
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            let ty = [0u32, 1, 8, 12, 14, 30, 2, 3, 6, 7, 10, 11, 13, 16, 99][t.ty as usize % 15];
            out.extend(ty.to_le_bytes());
            let off = t.offset.unwrap_or(offset);
            out.extend(off.to_le_bytes());
            let len = u64::from(t.data);
            offset = (offset + len).next_multiple_of(32);
            data_len = offset;
        }
        out.resize(out.len().next_multiple_of(32), 0);
        let fill = self.fill;
        out.extend((0..data_len.min(1 << 20)).map(|i| (i as u8).wrapping_mul(fill)));
        out
    }
}

// ---------------------------------------------------------------------------
// The readers under test.

/// Everything we do with a GGUF we did not write: open (with its shards),
/// inspect tensors, plan the edit and, when the plan holds, rewrite it.
fn exercise_gguf(path: &Path, out: &Path) -> bool {
    // Every GGUF is also offered as an importance matrix.
    exercise_imatrix(path);
    let Ok(shards) = open_model(path) else {
        return false;
    };
    for shard in &shards {
        for t in &shard.tensors {
            let _ = (t.n_elements(), t.shape_string(), shard.tensor_data(t).len());
            if t.n_elements() <= 1 << 16 && matches!(t.ty.0, 0 | 1 | 30) {
                let _ = shard.read_f32(t);
            }
        }
    }
    let n_embd = shards[0]
        .arch_u64("embedding_length")
        .filter(|&n| (1..=4096).contains(&n))
        .unwrap_or(32) as usize;
    let direction: Vec<f32> = (0..n_embd).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
    if plan_edits(&shards, &direction, &[], &Default::default()).is_err() {
        return true;
    }
    drop(shards);
    // The rewrite allocates in proportion to tensor sizes (already bounded
    // by the file), and its log lines grow libtest's capture buffer, which
    // is not ours to count: track the readers only.
    TRACK.with(|t| t.set(false));
    let opts = ApplyOptions {
        force: true,
        progress: false,
        ..ApplyOptions::default()
    };
    let _ = apply(path, out, &direction, &opts);
    TRACK.with(|t| t.set(true));
    true
}

fn exercise_direction(path: &Path, bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(f) = DirectionFile::parse(text) {
            let _ = (f.provenance_kvs(), f.to_json(), f.recorded_edit());
        }
    }
    let _ = DirectionFile::read(path);
}

/// Either form of importance matrix; what reads is then looked up the way
/// `apply` does.
fn exercise_imatrix(path: &Path) -> bool {
    let Ok(m) = Imatrix::read(path) else {
        return false;
    };
    for name in m.names() {
        let n = m.get(name).map_or(0, <[f32]>::len);
        let _ = m.for_tensor(name, n, 1);
        let _ = m.for_tensor(name, n / 2, 2);
    }
    true
}

fn exercise_prompts(path: &Path, column: Option<&str>) {
    let _ = PromptSet::from_file(path, column);
}

fn exercise_names(name: &str, count: u32) {
    let p = Path::new(name);
    let _ = shards::parse_shard_name(p);
    let _ = shards::sibling_paths(p, count);
    let _ = shards::output_paths(p, count);
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = repo_path("tests/fuzz_corpus");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    seeds.sort();
    seeds
}

/// Scratch space: tmpfs when there is one (every case writes a file).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

struct Stats {
    cases: u64,
    parsed: u64,
    panics: Vec<String>,
    /// Largest single allocation seen, and the size of its input.
    largest_alloc: (usize, usize),
}

impl Stats {
    fn record(
        &mut self,
        kind: &str,
        case: u64,
        bytes: &[u8],
        result: Result<(), String>,
        alloc: usize,
    ) {
        self.cases += 1;
        let limit = 4 * bytes.len() + (64 << 10);
        if alloc > self.largest_alloc.0 {
            self.largest_alloc = (alloc, bytes.len());
        }
        let problem = match result {
            Err(msg) => Some(format!("panic: {msg}")),
            Ok(()) if alloc > limit => Some(format!(
                "allocated {alloc} bytes for a {}-byte input",
                bytes.len()
            )),
            Ok(()) => None,
        };
        if let Some(problem) = problem {
            let dir = repo_path("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let file = dir.join(format!("{kind}-{case}.bin"));
            let _ = std::fs::write(&file, bytes);
            self.panics.push(format!(
                "{kind} case {case}: {problem} (input saved to {})",
                file.display()
            ));
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn fuzz_every_reader() {
    let cases = env_u64("FUZZ_CASES", 40_000);
    let seed = env_u64("FUZZ_SEED", 1);
    let seeds = corpus();
    let ggufs: Vec<&(String, Vec<u8>)> = seeds
        .iter()
        .filter(|(n, _)| n.ends_with(".gguf") && !n.contains("-00002-of-"))
        .collect();
    let second_shard = &seeds
        .iter()
        .find(|(n, _)| n.contains("-00002-of-"))
        .expect("split seed")
        .1;
    let donors: Vec<Vec<u8>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    let texts: Vec<&(String, Vec<u8>)> = seeds
        .iter()
        .filter(|(n, _)| !n.ends_with(".gguf") && !n.ends_with(".dat"))
        .collect();
    let legacy_imatrix = &seeds
        .iter()
        .find(|(n, _)| n.ends_with(".dat"))
        .expect("legacy imatrix seed")
        .1;
    let dir = scratch();
    let out = dir.path().join("out.gguf");
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let mut stats = Stats {
        cases: 0,
        parsed: 0,
        panics: Vec::new(),
        largest_alloc: (0, 0),
    };
    // Panics inside a case are caught and reported below; any other panic
    // (in the harness itself) still prints as usual.
    let previous_hook = std::sync::Arc::new(std::panic::take_hook());
    let fallback = previous_hook.clone();
    std::panic::set_hook(Box::new(move |info| {
        if !TRACK.with(Cell::get) {
            fallback(info)
        }
    }));
    let start = std::time::Instant::now();

    // Deterministic part: every seed cut at every field boundary.
    for (name, bytes) in &ggufs {
        let path = dir.path().join(name);
        for (p, len, _) in walk(bytes).fields {
            for cut in [p, p + len] {
                let cut_bytes = &bytes[..cut];
                std::fs::write(&path, cut_bytes).unwrap();
                let (r, alloc) = tracked(|| {
                    exercise_gguf(&path, &out);
                });
                stats.record("truncation", stats.cases, cut_bytes, r, alloc);
            }
        }
    }

    // The imatrix seeds are valid, so that their mutants reach deep.
    for (name, bytes) in seeds.iter().filter(|(n, _)| n.starts_with("imatrix.")) {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        assert!(exercise_imatrix(&path), "seed {name} does not read");
    }
    // The legacy imatrix cut at every byte.
    let dat = dir.path().join("cut.dat");
    for cut in 0..legacy_imatrix.len() {
        std::fs::write(&dat, &legacy_imatrix[..cut]).unwrap();
        let (r, alloc) = tracked(|| {
            exercise_imatrix(&dat);
        });
        stats.record("truncation", stats.cases, &legacy_imatrix[..cut], r, alloc);
    }

    while stats.cases < cases {
        let case = stats.cases;
        let entropy = rng.bytes(512);
        let mut u = Unstructured::new(&entropy);
        let roll = rng.below(100);
        if roll < 62 {
            // Structure-aware mutants of a seed GGUF (the split's first
            // shard is written beside its unmutated second shard, or the
            // second shard is the one mutated).
            let (name, bytes) = ggufs[rng.below(ggufs.len())];
            let mut mutant = bytes.clone();
            let mutate_second = name.contains("-00001-of-") && rng.below(3) == 0;
            if mutate_second {
                mutant = second_shard.clone();
            }
            for _ in 0..1 + rng.below(3) {
                let _ = mutate(&mut mutant, &mut u, &donors);
            }
            let path = dir.path().join(name);
            if name.contains("-00001-of-") {
                let second = dir.path().join(name.replace("-00001-of-", "-00002-of-"));
                let (first_bytes, second_bytes) = if mutate_second {
                    (bytes.as_slice(), mutant.as_slice())
                } else {
                    (mutant.as_slice(), second_shard.as_slice())
                };
                std::fs::write(&path, first_bytes).unwrap();
                std::fs::write(&second, second_bytes).unwrap();
            } else {
                std::fs::write(&path, &mutant).unwrap();
            }
            let (r, alloc) = tracked(|| exercise_gguf(&path, &out));
            if matches!(r, Ok(true)) {
                stats.parsed += 1;
            }
            stats.record("gguf", case, &mutant, r.map(|_| ()), alloc);
        } else if roll < 77 {
            let Ok(arb) = ArbGguf::arbitrary(&mut u) else {
                continue;
            };
            let bytes = arb.encode();
            let path = dir.path().join("arbitrary.gguf");
            std::fs::write(&path, &bytes).unwrap();
            let (r, alloc) = tracked(|| exercise_gguf(&path, &out));
            if matches!(r, Ok(true)) {
                stats.parsed += 1;
            }
            stats.record("arbitrary", case, &bytes, r.map(|_| ()), alloc);
        } else if roll < 83 {
            // Legacy imatrix files: bit flips, truncations, forged int32
            // fields (counts, lengths) and spliced bytes.
            let mut mutant = legacy_imatrix.clone();
            for _ in 0..1 + rng.below(3) {
                let len = mutant.len();
                match rng.below(4) {
                    0 if len > 0 => mutant[rng.below(len)] ^= 1 << rng.below(8),
                    1 => mutant.truncate(rng.below(len + 1)),
                    2 if len >= 4 => {
                        let at = rng.below(len - 3);
                        let v = [
                            0i32,
                            -1,
                            1,
                            i32::MAX,
                            i32::MIN,
                            0x7f80_0000,
                            0x7fc0_0000,
                            len as i32,
                        ][rng.below(8)];
                        mutant[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                    _ => {
                        let at = rng.below(len + 1);
                        let n = rng.below(12);
                        let bytes = rng.bytes(n);
                        mutant.splice(at..at, bytes);
                    }
                }
            }
            let path = dir.path().join("mutant.dat");
            std::fs::write(&path, &mutant).unwrap();
            let (r, alloc) = tracked(|| exercise_imatrix(&path));
            if matches!(r, Ok(true)) {
                stats.parsed += 1;
            }
            stats.record("imatrix", case, &mutant, r.map(|_| ()), alloc);
        } else if roll < 95 {
            // Direction JSON and prompt files: byte-level mutations and
            // splices of JSON/CSV tokens.
            let (name, seed_bytes) = texts[rng.below(texts.len())];
            let mut mutant = seed_bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(mutant.len() + 1);
                match rng.below(5) {
                    0 if !mutant.is_empty() => {
                        let i = rng.below(mutant.len());
                        mutant[i] ^= 1 << rng.below(8);
                    }
                    1 => mutant.truncate(at),
                    2 => {
                        let token: &[u8] = [
                            &b"NaN"[..],
                            b"1e999",
                            b"-0",
                            b"[",
                            b"]",
                            b"{",
                            b"}",
                            b"\"",
                            b",",
                            b"\n",
                            b"\r\n",
                            b"\xff\xfe",
                            b"null",
                            b"\"direction\":",
                            b"1e-45",
                            b"\"\"",
                            b"\t",
                        ][rng.below(17)];
                        mutant.splice(at..at, token.iter().copied());
                    }
                    3 => {
                        let n = rng.below(16);
                        let tail = mutant.get(at..).unwrap_or(&[]).to_vec();
                        mutant.truncate(at);
                        mutant.extend(rng.bytes(n));
                        mutant.extend(tail);
                    }
                    _ => {
                        // Repeat a line many times (long files).
                        let line = mutant.split(|&c| c == b'\n').next().unwrap_or(b"").to_vec();
                        for _ in 0..rng.below(200) {
                            mutant.extend(&line);
                            mutant.push(b'\n');
                        }
                    }
                }
            }
            let path = dir.path().join(name);
            std::fs::write(&path, &mutant).unwrap();
            let column = [None, Some("prompt"), Some("goal"), Some("")][rng.below(4)];
            let (r, alloc) = tracked(|| {
                if name.ends_with(".json") {
                    exercise_direction(&path, &mutant);
                } else {
                    exercise_prompts(&path, column);
                }
            });
            stats.record("text", case, &mutant, r, alloc);
        } else {
            let name: String = u.arbitrary().unwrap_or_default();
            let name = if rng.below(2) == 0 {
                format!(
                    "m-{:05}-of-{:05}.gguf",
                    rng.below(100_000),
                    rng.below(100_000)
                )
            } else {
                name
            };
            let count = rng.below(64) as u32;
            let (r, alloc) = tracked(|| exercise_names(&name, count));
            stats.record("name", case, name.as_bytes(), r, alloc);
        }
    }
    let _ = std::panic::take_hook();
    eprintln!(
        "fuzz: {} cases in {:.1} s (seed {seed}), {} GGUFs parsed, largest allocation {} bytes (for a {}-byte input), {} failures",
        stats.cases,
        start.elapsed().as_secs_f64(),
        stats.parsed,
        stats.largest_alloc.0,
        stats.largest_alloc.1,
        stats.panics.len()
    );
    assert!(stats.panics.is_empty(), "{}", stats.panics.join("\n"));
}

/// Mutants through the real binary: exit 0 with OUT, or exit 1 with one
/// `error:` line and nothing left behind; never a crash or a stray file.
#[test]
fn binary_sample_of_mutants() {
    let seeds = corpus();
    let base = &seeds.iter().find(|(n, _)| n == "q8_0.gguf").unwrap().1;
    let donors = vec![base.clone()];
    let mut rng = Rng(env_u64("FUZZ_SEED", 1).wrapping_mul(31) | 1);
    let (mut ok, mut failed) = (0, 0);
    for case in 0..48 {
        let dir = scratch();
        let input: PathBuf = dir.path().join("in.gguf");
        let entropy = rng.bytes(256);
        let mut u = Unstructured::new(&entropy);
        let mut mutant = base.clone();
        let _ = mutate(&mut mutant, &mut u, &donors);
        std::fs::write(&input, &mutant).unwrap();
        let (out, left) = apply_hostile(&input, dir.path(), &format!("case {case}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {
                ok += 1;
                assert_eq!(left, ["in.gguf", "out.gguf"], "case {case}: {stderr}");
            }
            Some(1) => {
                failed += 1;
                // Any error message will do: one line, the last.
                if let Err(why) = clean_failure(&out, "") {
                    panic!("case {case}: {why}");
                }
                assert_eq!(left, ["in.gguf"], "case {case}: {stderr}");
            }
            other => panic!("case {case}: exit {other:?}: {stderr}"),
        }
    }
    eprintln!("binary sample: {ok} mutants applied, {failed} rejected cleanly");
    assert!(failed > 0);
}
