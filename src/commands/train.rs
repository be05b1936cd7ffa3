//! `retinanet train`: resolves the config, starts or resumes a run (or
//! launches one rank per GPU), shows its progress and prints the final
//! COCO summary.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_retinanet::config::{parse_device, Config};
use candle_retinanet::data::Shard;
use candle_retinanet::run::{ResumePoint, RunFolder};
use candle_retinanet::train::{rank_from_env, Collective, SingleProcess, Start, TrainEvent, Trainer, RANK_ENV};

use super::launch::{launch, parse_gpus};
use super::print_eval_summary;
use super::progress::TrainDisplay;
use crate::cli::TrainArgs;

pub(super) fn run(args: TrainArgs) -> Result<()> {
    let resume = args.resume.as_deref().map(ResumePoint::locate).transpose()?;
    let config = match &resume {
        Some(point) => {
            if args.config.config.is_some() {
                bail!("--resume continues with the run's own config; change keys with --set");
            }
            Config::resolve(Some(&point.config_file().to_string_lossy()), &args.config.overrides)?
        }
        None => Config::resolve(args.config.config.as_deref(), &args.config.overrides)?,
    };
    let gpus = args.gpus.as_deref().map(parse_gpus).transpose()?;
    let (device, collective): (Device, Box<dyn Collective>) = match (gpus, rank_from_env()?) {
        (None, None) => (parse_device(&args.device.spec)?, Box::new(SingleProcess)),
        (Some(gpus), None) => {
            let out = args.out.clone().map_or_else(|| RunFolder::unused(&config.name), RunFolder::at);
            return launch(&gpus, out.root());
        }
        (Some(gpus), Some((shard, group_id))) => {
            if gpus.len() != shard.world {
                bail!("{RANK_ENV}: a world of {} ranks, but --gpus lists {} GPUs", shard.world, gpus.len());
            }
            let device = parse_device(&format!("cuda:{}", gpus[shard.rank]))?;
            let group = join_group(&device, shard, &group_id)?;
            (device, group)
        }
        (None, Some(_)) => bail!("{RANK_ENV} is set, but ranks are started by `retinanet train --gpus LIST`"),
    };
    // Rank 0 shows the run; the other ranks of a data-parallel run are quiet.
    let leader = collective.shard().rank == 0;
    let display = Rc::new(RefCell::new(TrainDisplay::default()));
    let shown = Rc::clone(&display);
    let events = Box::new(move |event: TrainEvent<'_>| {
        if leader {
            shown.borrow_mut().show(event);
        }
    });
    let start = match resume {
        Some(point) => Start::Resume(point),
        None => Start::New { out: args.out.clone() },
    };
    let trainer = Trainer::new(config, device, start, collective, events)?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // a second Ctrl-C: stop now
        }
        eprintln!("\ninterrupted: saving a checkpoint (Ctrl-C again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;

    let outcome = trainer.run(&stop)?;
    display.borrow().finish();
    if !leader {
        return Ok(());
    }
    let run_dir = outcome.run.root().display();
    if outcome.interrupted {
        eprintln!(
            "stopped at step {}; checkpoint saved. Continue with: retinanet train --resume {run_dir}",
            outcome.steps
        );
        return Ok(());
    }
    if let Some(result) = &outcome.final_eval {
        print_eval_summary(result);
    }
    eprintln!("done: {} steps; run folder {run_dir}", outcome.steps);
    Ok(())
}

/// This rank's place in the NCCL group of a `--gpus` run.
#[cfg(feature = "nccl")]
fn join_group(device: &Device, shard: Shard, group_id: &str) -> Result<Box<dyn Collective>> {
    Ok(Box::new(candle_retinanet::train::NcclGroup::join(device, shard, group_id)?))
}

#[cfg(not(feature = "nccl"))]
fn join_group(_: &Device, _: Shard, _: &str) -> Result<Box<dyn Collective>> {
    bail!("--gpus: this binary was built without NCCL (rebuild with `--features nccl`)")
}
