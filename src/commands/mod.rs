//! One module per subcommand. Commands read arguments, call the library
//! and print; they do no tensor math. The binary's own layer: nothing in
//! the library imports it.

use anyhow::Result;
use candle_core::Device;
use candle_retinanet::config::{parse_device, Config, CudaKernels};
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
/// The device `spec` names, with the config's kernel choices
/// (`runtime.cuda_kernels`, `runtime.tf32`) in force.
fn device_for(config: &Config, spec: &str) -> Result<Device> {
    apply_runtime(config);
    parse_device(spec)
}

/// Makes the config's kernel choices the process's, before any tensor work.
fn apply_runtime(config: &Config) {
    let runtime = &config.runtime;
    candle_retinanet::ops::set_cuda_kernels(runtime.cuda_kernels == CudaKernels::Stock, runtime.tf32);
}

fn print_eval_summary(result: &EvalResult) {
    for line in result.summary_lines() {
        println!("{line}");
    }
    println!();
    for line in result.class_table() {
        println!("{line}");
    }
}
