//! One module per subcommand. Commands read files, call the library and
//! print; they do no tensor math.

use anyhow::Result;

use crate::cli::Command;

pub mod bench;
pub mod eval;
pub mod inspect;
pub mod launch;
pub mod predict;
pub mod synth;
pub mod train;

/// Runs one parsed command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(&args),
        Command::Predict(args) => predict::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
