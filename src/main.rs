//! The `retinanet` binary: parses the command line and dispatches. The
//! binary's own parts (`cli`, `commands`, `runtime`) are not in the library.

mod cli;
mod commands;
mod runtime;

use std::process::ExitCode;

use clap::Parser;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse(); // usage errors exit with code 2
    runtime::configure(cli.command.only_infers());
    match runtime::on_worker(|| commands::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The whole context chain on one line: "file: field: cause". A cause that
/// its wrapper already quotes (Candle's I/O errors repeat the OS message)
/// is not printed twice.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string().replace('\n', " ");
        if !parts.last().is_some_and(|previous| previous.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}
