//! `retinanet bench`: times a training step or inference on random data.

use anyhow::Result;
use candle_retinanet::config::Config;
use candle_retinanet::train::{self, BenchMode};

use crate::cli::{BenchArgs, BenchModeArg};

pub(super) fn run(args: BenchArgs) -> Result<()> {
    let config = Config::resolve(args.config.config.as_deref(), &args.config.overrides)?;
    let device = super::device_for(&config, &args.device.spec)?;
    let mode = match args.mode {
        BenchModeArg::Train => BenchMode::Train,
        BenchModeArg::Infer => BenchMode::Infer,
    };
    let size = (args.size as usize, args.width.unwrap_or(args.size) as usize);
    let report = train::bench(config, mode, size, args.batch, args.steps, &device)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:?} {}x{} batch {}: {:.4} s/step (median of {}), {:.2} images/s, peak RSS {:.0} MiB ({:.0} above the start)",
            report.mode,
            report.size,
            report.width,
            report.batch,
            report.seconds_per_step_median,
            report.steps,
            report.images_per_second,
            report.peak_rss_mib,
            report.peak_rss_model_mib
        );
    }
    Ok(())
}
