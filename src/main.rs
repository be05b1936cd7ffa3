//! The `retinanet` binary: parses the command line and dispatches.

use std::process::ExitCode;

use clap::Parser;

use candle_retinanet::cli::Cli;

fn main() -> ExitCode {
    candle_retinanet::runtime::configure();
    let cli = Cli::parse(); // usage errors exit with code 2
    match candle_retinanet::commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole context chain: "error: file: field: cause".
            let message = format!("{err:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
