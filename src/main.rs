mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the error and its context chain.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
