//! The options of each command, parsed by clap straight into the types
//! the pipeline takes. The search's are resolved against the model once
//! it is read ([`crate::direction::SearchOptions`]).

use crate::cache::Cache;
use crate::direction::{self, SearchOptions};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args, FromArgMatches};
use std::path::PathBuf;

/// What the direction search needs besides the model.
#[derive(Args, Clone, Debug)]
pub struct SearchConfig {
    /// Also write a llama.cpp control vector (use with --control-vector-scaled CV.gguf:-1).
    #[arg(long, value_name = "CV.gguf")]
    pub export_control_vector: Option<PathBuf>,
    /// Harmful instructions: text (one per line), JSONL or CSV. Default: built-in set.
    #[arg(long, value_name = "FILE")]
    pub harmful: Option<PathBuf>,
    /// Harmless instructions, in the same formats. Default: built-in set.
    #[arg(long, value_name = "FILE")]
    pub harmless: Option<PathBuf>,
    /// JSONL/CSV column holding the instruction (default: instruction, prompt, goal, text or question).
    #[arg(long, value_name = "NAME")]
    pub column: Option<String>,
    /// Training instructions per set.
    #[arg(long, default_value_t = SearchOptions::default().n_train, value_name = "N")]
    pub n_train: usize,
    /// Validation instructions per set.
    #[arg(long, default_value_t = SearchOptions::default().n_val, value_name = "N")]
    pub n_val: usize,
    /// Use this layer (block output index) instead of searching.
    #[arg(long, value_name = "L")]
    pub layer: Option<usize>,
    /// Use this post-instruction position (0 = first token after the instruction).
    #[arg(long, value_name = "P")]
    pub position: Option<usize>,
    /// A llama.cpp built-in chat template name or a template file, for models without one.
    #[arg(long, value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
    /// First-token KL on answered harmless prompts the edit may cost: candidates
    /// above it are discarded, and the pick is the fewest refusals within it
    /// (the lowest KL among points within a standard error of the fewest).
    #[arg(long, visible_alias = "kl-target", default_value_t = SearchOptions::default().kl_threshold, value_name = "KL")]
    pub kl_threshold: f64,
    /// TPE trials refining the chosen direction's edit (per-layer weights,
    /// direction index, biprojection); 0 keeps the first stage's choice.
    /// Default: 20 for models up to 150 MB, fewer for larger ones (at least 6).
    #[arg(long, value_name = "N")]
    pub trials: Option<usize>,
    /// Directions the edit may remove at most: after the refinement, the
    /// refusals the pick leaves make further directions of a subspace,
    /// measured on the front (1: the refusal direction alone).
    #[arg(long, default_value_t = SearchOptions::default().max_directions, value_name = "K", value_parser = clap::value_parser!(u64).range(1..=8).map(|k| k as usize))]
    pub directions: usize,
    /// Candidates fully evaluated after the cheap ranking.
    #[arg(long, default_value_t = SearchOptions::default().top_k, value_name = "K")]
    pub top_k: usize,
    /// Prompts per set used to rank every candidate cheaply before the top K are evaluated.
    #[arg(long, default_value_t = SearchOptions::default().rank_prompts, value_name = "N")]
    pub rank_prompts: usize,
    /// Layers to offload to the GPU (metal/cuda builds).
    #[arg(
        long = "n-gpu-layers",
        visible_alias = "ngl",
        default_value_t = 0,
        value_name = "N"
    )]
    pub n_gpu_layers: i32,
    /// Shuffle the training instructions with this seed before taking --n-train.
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// Threads for llama.cpp and the rewrite (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
    /// Collect an importance matrix during the search's capture.
    #[arg(skip)]
    pub collect_imatrix: bool,
}

impl Default for SearchConfig {
    fn default() -> Self {
        parsed_defaults()
    }
}

impl SearchConfig {
    /// llama.cpp threads: the option, or every core.
    pub fn llama_threads(&self) -> i32 {
        self.threads
            .map_or_else(direction::default_threads, |t| t as i32)
    }
}

/// Edit options shared by the main command and `apply`.
#[derive(Args, Clone, Debug)]
pub struct EditConfig {
    /// Share of the refusal component to remove (1.0 removes all of it;
    /// the main command defaults to the share the search chose).
    #[arg(long, value_name = "S")]
    pub scale: Option<f32>,
    /// Leave token_embd untouched (with tied embeddings it is also the unembedding).
    #[arg(long)]
    pub skip_embeddings: bool,
    /// Apply point N of the saved Pareto front (numbered as printed) instead
    /// of the chosen one: from the direction file, or the search just run.
    #[arg(long, value_name = "N")]
    pub pick: Option<usize>,
    /// Grid-aware projection: requantize until the quantized tensor itself
    /// has lost the requested share of the component ("off": one plain pass,
    /// as 0.1.0 did, for comparison).
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        action = ArgAction::Set,
        value_parser = PossibleValuesParser::new(["on", "off"]).map(|s| s == "on")
    )]
    pub exact_grid: bool,
    /// After the projection, give every write vector its norm back: each
    /// input column of attn_output/ffn_down, each token_embd row
    /// (norm-preserving abliteration). Measured on the written file.
    #[arg(long)]
    pub preserve_norms: bool,
    /// Importance matrix for requantizing (llama-imatrix's GGUF or legacy
    /// .dat); needed for IQ2_XXS, IQ2_XS and IQ1_S. The main command
    /// collects one over the training prompts when none is given.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Overwrite OUT if it exists.
    #[arg(short, long)]
    pub force: bool,
    /// No progress bar.
    #[arg(short, long)]
    pub quiet: bool,
}

impl Default for EditConfig {
    fn default() -> Self {
        parsed_defaults()
    }
}

/// The main command's options: `gguf-abliterate IN.gguf OUT.gguf [OPTIONS]`.
#[derive(Args, Clone, Debug)]
pub struct RunConfig {
    /// Use this direction file instead of searching.
    #[arg(long, value_name = "DIR.json")]
    pub direction: Option<PathBuf>,
    /// Skip loading OUT and measuring refusals and KL afterwards.
    #[arg(long)]
    pub no_verify: bool,
    /// Write everything measured (direction provenance included) as JSON.
    #[arg(long, value_name = "REPORT.json")]
    pub report: Option<PathBuf>,
    /// Write an Ollama Modelfile beside OUT.
    #[arg(long)]
    pub ollama: bool,
    /// Tokens generated per reply when verifying (refusals are judged on
    /// the whole reply, and also on its first 24 and 48 tokens).
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub verify_tokens: usize,
    /// Measure perplexity on this text instead of the shipped one
    /// (data/perplexity.txt).
    #[arg(long, value_name = "FILE")]
    pub perplexity_text: Option<PathBuf>,
    /// Chunks of 512 tokens scored for perplexity, as llama-perplexity's
    /// --chunks (0 skips perplexity; more than the text holds scores all of
    /// it: the shipped text holds 25).
    // Ten chunks measure the rise about as well as 25, at 0.4 of the rows
    // (docs/figures.md).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub perplexity_chunks: usize,
    /// Keep the original model's verification here between runs (default:
    /// $GGUF_ABLITERATE_CACHE, else $XDG_CACHE_HOME/gguf-abliterate or
    /// ~/.cache/gguf-abliterate).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Neither read nor write the cache.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    #[command(flatten)]
    pub edit: EditConfig,
    #[command(flatten)]
    pub search: SearchConfig,
}

impl RunConfig {
    /// Where the original's verification is kept between runs.
    pub fn cache(&self) -> Cache {
        if self.no_cache {
            Cache::disabled()
        } else {
            Cache::at(self.cache_dir.clone())
        }
    }
}

/// `gguf-abliterate apply --direction DIR.json IN OUT`.
#[derive(Args, Clone, Debug)]
pub struct ApplyConfig {
    /// Direction file: a JSON object with "direction": [n_embd numbers].
    #[arg(long, value_name = "DIR.json")]
    pub direction: PathBuf,
    /// Input GGUF (the first shard of a split GGUF).
    pub input: PathBuf,
    /// Output GGUF.
    pub output: PathBuf,
    #[command(flatten)]
    pub edit: EditConfig,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
}

/// `gguf-abliterate direction IN -o DIR.json`.
#[derive(Args, Clone, Debug)]
pub struct DirectionConfig {
    /// Input GGUF.
    pub input: PathBuf,
    /// Where to write the direction (JSON).
    #[arg(short, long, value_name = "DIR.json")]
    pub output: PathBuf,
    /// Overwrite existing output files.
    #[arg(short, long)]
    pub force: bool,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub search: SearchConfig,
}

/// Options as clap parses them from no arguments: the defaults are the
/// ones the command line declares, written once.
fn parsed_defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&command.get_matches_from(["defaults"]))
        .expect("every option has a default")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_command_lines() {
        let (search, edit) = (SearchConfig::default(), EditConfig::default());
        let d = SearchOptions::default();
        assert_eq!(
            (
                search.n_train,
                search.n_val,
                search.top_k,
                search.rank_prompts
            ),
            (d.n_train, d.n_val, d.top_k, d.rank_prompts)
        );
        assert_eq!(
            (search.kl_threshold, search.trials, search.n_gpu_layers),
            (0.25, None, 0)
        );
        assert!(!search.collect_imatrix);
        assert!(edit.exact_grid && !edit.preserve_norms && !edit.force && edit.scale.is_none());
    }
}
