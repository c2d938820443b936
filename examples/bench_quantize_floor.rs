//! The quantize floor for `apply`: ggml quantizing the f32 rows of every
//! tensor `apply` would edit, to their own types, on rayon's pool (the
//! same threads `apply` uses), with no edit, no reading and no writing.
//! Prints the seconds. Run by scripts/bench-apply.sh.

use gguf_abliterate::direction::DirectionFile;
use gguf_abliterate::edit::{self, EditWeights};
use gguf_abliterate::{gguf, quant};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, direction] = &args[..] else {
        anyhow::bail!("usage: bench_quantize_floor MODEL.gguf DIRECTION.json");
    };
    let shards = gguf::open_model(model.as_ref())?;
    let r = DirectionFile::read(direction.as_ref())?.vectors.direction;
    let plan = edit::plan_edits(&shards, &r, &[], &EditWeights::default())?;
    let mut spent = Duration::ZERO;
    for e in &plan.edits {
        let t = shards[e.shard].tensor(&e.name).expect("planned");
        let n = t.row_len() as usize;
        let values = quant::dequantize(t.ty, shards[e.shard].tensor_data(t), n)?;
        let start = Instant::now();
        std::hint::black_box(quant::quantize(t.ty, &values, n, None)?);
        spent += start.elapsed();
    }
    println!("{:.3}", spent.as_secs_f64());
    Ok(())
}
