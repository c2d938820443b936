use gguf_abliterate::chat::ChatFormat;
use gguf_abliterate::ffi::{self, Model};
fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    ffi::init_backend(false);
    let model = Model::load(path.as_ref(), 0)?;
    let fmt = ChatFormat::resolve(&model, std::env::args().nth(2).as_deref())?;
    println!("{:?}", fmt.format("Hello there")?);
    let toks = fmt.tokenize(&model, "Hello there")?;
    println!(
        "{:?}",
        toks.iter()
            .map(|&t| model.token_to_piece(t))
            .collect::<Vec<_>>()
    );
    println!(
        "suffix {:?}",
        fmt.suffix_tokens
            .iter()
            .map(|&t| model.token_to_piece(t))
            .collect::<Vec<_>>()
    );
    Ok(())
}
