//! One module per subcommand. Commands read files, call the library and
//! print; they do no tensor math.

use anyhow::{bail, Result};

use crate::cli::Command;

pub mod bench;
pub mod eval;
pub mod inspect;
pub mod synth;
pub mod train;

/// Runs one parsed command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(&args),
        Command::Predict(_) => not_built("predict", "the model"),
        Command::Synth(args) => synth::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

fn not_built(command: &str, what: &str) -> Result<()> {
    bail!("`retinanet {command}` is not built yet: {what} has not landed in this version")
}
