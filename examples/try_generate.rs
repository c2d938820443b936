use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::eval::{NoHook, Runner};
use gguf_abliterate::ffi::{self, Model};
use gguf_abliterate::prompts::{Kind, PromptSet};
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let sys = std::env::args().nth(2);
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, None)?;
    for kind in [Kind::Harmful, Kind::Harmless] {
        let set = PromptSet::builtin(kind);
        let prompts: Vec<Vec<i32>> = set.val.iter().take(24).map(|p| {
            let text = match &sys { Some(s) => format!("<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", p.text), None => fmt.format(&p.text).unwrap() };
            model.tokenize(&text, true, true).unwrap()
        }).collect();
        let mut runner = Runner::new(&model, 2048, 2)?;
        let t = std::time::Instant::now();
        let gens = runner.generate(&prompts, 32, &mut NoHook)?;
        eprintln!("{:?} {:.1}s", kind, t.elapsed().as_secs_f64());
        for g in gens.iter().take(24) {
            let text: String = g.tokens.iter().map(|&t| model.token_to_piece(t)).collect();
            println!(
                "{kind:?}: {}",
                text.replace('\n', " ").chars().take(90).collect::<String>()
            );
        }
    }
    Ok(())
}
