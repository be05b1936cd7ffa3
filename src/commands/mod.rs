//! One module per subcommand. Commands read arguments, call the library
//! and print; they do no tensor math. The binary's own layer: nothing in
//! the library imports it.

use anyhow::Result;
use candle_retinanet::eval::EvalResult;

use crate::cli::Command;

mod bench;
mod convert;
mod convert_weights;
mod eval;
mod inspect;
mod launch;
mod predict;
mod progress;
mod synth;
mod train;

/// Runs one parsed command.
pub(crate) fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(&args),
        Command::Predict(args) => predict::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::ConvertWeights(args) => convert_weights::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Prints pycocotools' 12-line summary, a blank line and the per-class AP
/// table on stdout.
fn print_eval_summary(result: &EvalResult) {
    for line in result.summary_lines() {
        println!("{line}");
    }
    println!();
    for line in result.class_table() {
        println!("{line}");
    }
}
