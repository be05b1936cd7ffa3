//! The `retinanet` binary: parses the command line and dispatches.

use std::process::ExitCode;

use clap::Parser;

use candle_retinanet::cli::Cli;

fn main() -> ExitCode {
    // Candle runs element-wise CPU ops on its own spinning thread pool,
    // beside the rayon pool that runs GEMMs, im2col and the data loader. On
    // a few cores the two pools spin against each other: a training step
    // of the `shapes` preset took 2.5x longer on 2 cores. Element-wise ops
    // are memory-bound, so they run on the calling thread unless asked.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
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
