//! Tiny random-weight F32 GGUFs that llama.cpp loads, one per architecture
//! family: the tensors and keys each family's loader requires, a vocabulary
//! of dummy tokens (`no_vocab`), and a refusal-like direction planted in
//! every residual writer so that removing it changes the logits.
use crate::common::{noise, write_gguf, Kv, SynthTensor};
use gguf_abliterate::ffi::GgmlType;
use std::path::Path;

pub const N_EMBD: usize = 64;
pub const N_LAYER: usize = 3;
pub const N_VOCAB: usize = 96;
const N_HEAD: usize = 4;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = N_EMBD / N_HEAD;
const N_FF: usize = 128;
const N_EXPERT: usize = 4;
const N_FF_EXPERT: usize = 32;
const N_FF_SHARED: usize = 64;

/// The feed-forward block of a family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ffn {
    /// `ffn_gate`, `ffn_up`, `ffn_down`.
    Gated,
    /// `ffn_up` of 2·n_ff (gate and up fused, as phi3 and glm4 store it), `ffn_down`.
    FusedUp,
    /// Routed experts (`ffn_*_exps`), with a shared expert (`ffn_*_shexp`) or not.
    Moe { shared: bool },
}

/// Per-head RMS norms on Q and K.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum QkNorm {
    None,
    /// One weight of head_dim (qwen3, gemma3, exaone4).
    PerHead,
    /// Weights over all of Q and all of K (olmo2).
    Full,
}

/// What the loader of one architecture family expects.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// `general.architecture`.
    pub arch: &'static str,
    /// A name for messages (`llama-moe` is arch llama with experts).
    pub label: &'static str,
    /// No `output.weight`: the unembedding is `token_embd`.
    pub tied: bool,
    /// `attn_norm` and `ffn_norm` before each block (olmo2 and exaone4 have none).
    pub pre_norms: bool,
    /// `post_attention_norm` and `post_ffw_norm` between each projection and the residual.
    pub post_norms: bool,
    pub qk_norm: QkNorm,
    pub qkv_bias: bool,
    /// `attn_output.bias` and `ffn_down.bias`: residual writers too.
    pub out_bias: bool,
    pub ffn: Ffn,
}

const BASE: Family = Family {
    arch: "llama",
    label: "llama",
    tied: false,
    pre_norms: true,
    post_norms: false,
    qk_norm: QkNorm::None,
    qkv_bias: false,
    out_bias: false,
    ffn: Ffn::Gated,
};

/// Every family the tests build, in the order of docs/architectures.md.
pub const FAMILIES: &[Family] = &[
    Family {
        out_bias: true,
        ..BASE
    },
    Family {
        label: "llama-moe",
        ffn: Ffn::Moe { shared: false },
        ..BASE
    },
    Family {
        arch: "mistral3",
        label: "mistral3",
        tied: true,
        ..BASE
    },
    Family {
        arch: "smollm3",
        label: "smollm3",
        tied: true,
        ..BASE
    },
    Family {
        arch: "qwen2",
        label: "qwen2",
        qkv_bias: true,
        ..BASE
    },
    Family {
        arch: "qwen3",
        label: "qwen3",
        tied: true,
        qk_norm: QkNorm::PerHead,
        ..BASE
    },
    Family {
        arch: "qwen2moe",
        label: "qwen2moe",
        qkv_bias: true,
        ffn: Ffn::Moe { shared: true },
        ..BASE
    },
    Family {
        arch: "qwen3moe",
        label: "qwen3moe",
        qk_norm: QkNorm::PerHead,
        ffn: Ffn::Moe { shared: false },
        ..BASE
    },
    Family {
        arch: "phi3",
        label: "phi3",
        ffn: Ffn::FusedUp,
        ..BASE
    },
    Family {
        arch: "gemma",
        label: "gemma",
        tied: true,
        ..BASE
    },
    Family {
        arch: "gemma2",
        label: "gemma2",
        tied: true,
        post_norms: true,
        ..BASE
    },
    Family {
        arch: "gemma3",
        label: "gemma3",
        tied: true,
        post_norms: true,
        qk_norm: QkNorm::PerHead,
        ..BASE
    },
    Family {
        arch: "olmo2",
        label: "olmo2",
        pre_norms: false,
        post_norms: true,
        qk_norm: QkNorm::Full,
        ..BASE
    },
    Family {
        arch: "glm4",
        label: "glm4",
        post_norms: true,
        ffn: Ffn::FusedUp,
        ..BASE
    },
    Family {
        arch: "exaone4",
        label: "exaone4",
        pre_norms: false,
        post_norms: true,
        qk_norm: QkNorm::PerHead,
        ..BASE
    },
];

pub fn family(label: &str) -> Family {
    *FAMILIES
        .iter()
        .find(|f| f.label == label)
        .unwrap_or_else(|| panic!("no synthetic family {label}"))
}

impl Family {
    /// The tensors that write into the residual stream, which the edit
    /// must touch and nothing else: listed here from the family's layout,
    /// independently of the crate's classifier.
    pub fn residual_writers(&self) -> Vec<String> {
        let mut names = vec!["token_embd.weight".to_string()];
        for l in 0..N_LAYER {
            names.push(format!("blk.{l}.attn_output.weight"));
            if self.out_bias {
                names.push(format!("blk.{l}.attn_output.bias"));
                names.push(format!("blk.{l}.ffn_down.bias"));
            }
            match self.ffn {
                Ffn::Moe { shared } => {
                    names.push(format!("blk.{l}.ffn_down_exps.weight"));
                    if shared {
                        names.push(format!("blk.{l}.ffn_down_shexp.weight"));
                    }
                }
                _ => names.push(format!("blk.{l}.ffn_down.weight")),
            }
        }
        names.sort();
        names
    }

    /// Writes the model to `path`, with `r` planted in every residual writer.
    pub fn write(&self, path: &Path, r: &[f32]) {
        assert_eq!(r.len(), N_EMBD);
        let mut b = Builder {
            tensors: Vec::new(),
            seed: 1000,
        };
        let (e, v) = (N_EMBD as u64, N_VOCAB as u64);
        let (q, kv) = ((N_HEAD * HEAD_DIM) as u64, (N_HEAD_KV * HEAD_DIM) as u64);
        b.embedding("token_embd.weight", e, v, r);
        b.norm("output_norm.weight", e);
        if !self.tied {
            b.matrix("output.weight", &[e, v], 1.0);
        }
        for l in 0..N_LAYER {
            let t = |name: &str| format!("blk.{l}.{name}");
            if self.pre_norms {
                b.norm(&t("attn_norm.weight"), e);
                b.norm(&t("ffn_norm.weight"), e);
            }
            b.matrix(&t("attn_q.weight"), &[e, q], 1.0);
            b.matrix(&t("attn_k.weight"), &[e, kv], 1.0);
            b.matrix(&t("attn_v.weight"), &[e, kv], 1.0);
            if self.qkv_bias {
                b.matrix(&t("attn_q.bias"), &[q], 0.2);
                b.matrix(&t("attn_k.bias"), &[kv], 0.2);
                b.matrix(&t("attn_v.bias"), &[kv], 0.2);
            }
            match self.qk_norm {
                QkNorm::None => {}
                QkNorm::PerHead => {
                    b.norm(&t("attn_q_norm.weight"), HEAD_DIM as u64);
                    b.norm(&t("attn_k_norm.weight"), HEAD_DIM as u64);
                }
                QkNorm::Full => {
                    b.norm(&t("attn_q_norm.weight"), q);
                    b.norm(&t("attn_k_norm.weight"), kv);
                }
            }
            b.projection(&t("attn_output.weight"), &[q, e], r);
            if self.out_bias {
                b.bias(&t("attn_output.bias"), e, r);
                b.bias(&t("ffn_down.bias"), e, r);
            }
            if self.post_norms {
                b.norm(&t("post_attention_norm.weight"), e);
                b.norm(&t("post_ffw_norm.weight"), e);
            }
            let ff = N_FF as u64;
            match self.ffn {
                Ffn::Gated => {
                    b.matrix(&t("ffn_gate.weight"), &[e, ff], 1.0);
                    b.matrix(&t("ffn_up.weight"), &[e, ff], 1.0);
                    b.projection(&t("ffn_down.weight"), &[ff, e], r);
                }
                Ffn::FusedUp => {
                    b.matrix(&t("ffn_up.weight"), &[e, 2 * ff], 1.0);
                    b.projection(&t("ffn_down.weight"), &[ff, e], r);
                }
                Ffn::Moe { shared } => {
                    // llama sizes its experts by feed_forward_length; the
                    // qwen MoE families by expert_feed_forward_length.
                    let fx = if self.arch == "llama" {
                        N_FF
                    } else {
                        N_FF_EXPERT
                    };
                    let (x, fx) = (N_EXPERT as u64, fx as u64);
                    b.matrix(&t("ffn_gate_inp.weight"), &[e, x], 1.0);
                    b.matrix(&t("ffn_gate_exps.weight"), &[e, fx, x], 1.0);
                    b.matrix(&t("ffn_up_exps.weight"), &[e, fx, x], 1.0);
                    b.projection(&t("ffn_down_exps.weight"), &[fx, e, x], r);
                    if shared {
                        let fs = N_FF_SHARED as u64;
                        b.matrix(&t("ffn_gate_inp_shexp.weight"), &[e], 1.0);
                        b.matrix(&t("ffn_gate_shexp.weight"), &[e, fs], 1.0);
                        b.matrix(&t("ffn_up_shexp.weight"), &[e, fs], 1.0);
                        b.projection(&t("ffn_down_shexp.weight"), &[fs, e], r);
                    }
                }
            }
        }
        write_gguf(path, &self.kvs(), &b.tensors);
    }

    fn kvs(&self) -> Vec<Kv> {
        let arch = self.arch;
        let key = |k: &str| format!("{arch}.{k}");
        let mut kv = vec![
            Kv::str("general.architecture", arch),
            Kv::str("general.name", &format!("synthetic {}", self.label)),
            Kv::u32(&key("context_length"), 512),
            Kv::u32(&key("embedding_length"), N_EMBD as u32),
            Kv::u32(&key("block_count"), N_LAYER as u32),
            Kv::u32(&key("feed_forward_length"), N_FF as u32),
            Kv::u32(&key("attention.head_count"), N_HEAD as u32),
            Kv::u32(&key("attention.head_count_kv"), N_HEAD_KV as u32),
            kv_f32(&key("attention.layer_norm_rms_epsilon"), 1e-6),
            kv_f32(&key("rope.freq_base"), 10000.0),
            Kv::u32(&key("vocab_size"), N_VOCAB as u32),
            // Dummy tokens: the tests feed token ids, never text.
            Kv::str("tokenizer.ggml.model", "no_vocab"),
        ];
        if let Ffn::Moe { shared } = self.ffn {
            kv.push(Kv::u32(&key("expert_count"), N_EXPERT as u32));
            kv.push(Kv::u32(&key("expert_used_count"), 2));
            kv.push(Kv::u32(
                &key("expert_feed_forward_length"),
                N_FF_EXPERT as u32,
            ));
            if shared {
                kv.push(Kv::u32(
                    &key("expert_shared_feed_forward_length"),
                    N_FF_SHARED as u32,
                ));
            }
        }
        kv
    }
}

fn kv_f32(key: &str, v: f32) -> Kv {
    Kv {
        key: key.into(),
        ty: 6,
        value: v.to_le_bytes().to_vec(),
    }
}

struct Builder {
    tensors: Vec<SynthTensor>,
    seed: u64,
}

impl Builder {
    fn push(&mut self, name: &str, dims: &[u64], source: Vec<f32>) {
        self.tensors.push(SynthTensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty: GgmlType::F32,
            source,
        });
    }

    fn noise(&mut self, n: u64) -> Vec<f32> {
        self.seed += 1;
        noise(n as usize, self.seed)
    }

    /// Random weights of about unit scale per output (`gain` · U(-0.5, 0.5) · √(12 / n_in)).
    fn matrix(&mut self, name: &str, dims: &[u64], gain: f32) {
        let n: u64 = dims.iter().product();
        let k = gain * (12.0 / dims[0] as f32).sqrt();
        let values = self.noise(n).iter().map(|x| x * k).collect();
        self.push(name, dims, values);
    }

    /// Norm weights around 1 but far from uniform, so that a post-norm
    /// really bends the direction the edit must remove.
    fn norm(&mut self, name: &str, n: u64) {
        let values = self.noise(n).iter().map(|x| 1.0 + 1.2 * x).collect();
        self.push(name, &[n], values);
    }

    /// Token embeddings: random rows, each with a component along `r`.
    fn embedding(&mut self, name: &str, e: u64, v: u64, r: &[f32]) {
        let mut values = self.noise(e * v);
        for (i, row) in values.chunks_mut(e as usize).enumerate() {
            let c = 1.5 + (i % 5) as f32 * 0.5;
            row.iter_mut().zip(r).for_each(|(x, ri)| *x += c * ri);
        }
        self.push(name, &[e, v], values);
    }

    /// A bias added to the residual: small noise plus a component along `r`.
    fn bias(&mut self, name: &str, e: u64, r: &[f32]) {
        let values = self
            .noise(e)
            .iter()
            .zip(r)
            .map(|(x, ri)| 0.2 * x + 0.5 * ri)
            .collect();
        self.push(name, &[e], values);
    }

    /// A residual writer (`dims[1]` = n_embd outputs, per expert for 3-D):
    /// random weights plus a write along `r` driven by the input's sum.
    fn projection(&mut self, name: &str, dims: &[u64], r: &[f32]) {
        let n_in = dims[0] as usize;
        let n: u64 = dims.iter().product();
        let k = (12.0 / n_in as f32).sqrt();
        let mut values: Vec<f32> = self.noise(n).iter().map(|x| x * k).collect();
        for (row, values) in values.chunks_mut(n_in).enumerate() {
            let ri = r[row % r.len()];
            values.iter_mut().for_each(|x| *x += 3.0 * ri / n_in as f32);
        }
        self.push(name, dims, values);
    }
}

/// Token-id prompts for the synthetic models (no tokenizer needed).
pub fn prompts() -> Vec<Vec<i32>> {
    (0..4)
        .map(|p| {
            (0..5 + 2 * p)
                .map(|i| ((i * 7 + p * 13 + 3) % N_VOCAB) as i32)
                .collect()
        })
        .collect()
}
