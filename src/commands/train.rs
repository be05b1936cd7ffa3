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
use candle_retinanet::run::{ResumePoint, RunFolder};
use candle_retinanet::train::{Collective, Place, SingleProcess, Start, TrainEvent, Trainer};

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
    let place = Place::from_env()?;
    if (gpus.is_some() || place.is_some()) && !cfg!(feature = "nccl") {
        bail!("{}", NO_NCCL);
    }
    let (device, collective): (Device, Box<dyn Collective>) = match (gpus, place) {
        (None, None) => (super::device_for(&config, &args.device.spec)?, Box::new(SingleProcess)),
        (Some(gpus), None) => {
            let out = args.out.clone().map_or_else(|| RunFolder::unused(&config.name), RunFolder::at);
            return launch(&gpus, out.root());
        }
        (gpus, Some(place)) => {
            super::apply_runtime(&config);
            let device = rank_device(gpus.as_deref(), &args.device.spec, &place)?;
            let group = join_group(&device, &place, &config.to_toml())?;
            (device, group)
        }
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

const NO_NCCL: &str = "--gpus, or a rank started by torchrun or srun: this binary was built without NCCL \
                       (rebuild with `--features nccl`)";

/// The GPU of a rank: its local rank's entry in `--gpus`, else the GPU
/// numbered by its local rank (torchrun's and srun's convention).
fn rank_device(gpus: Option<&[usize]>, device_spec: &str, place: &Place) -> Result<Device> {
    if device_spec != "auto" {
        bail!(
            "--device {device_spec}: a rank of a run of several processes uses GPU LOCAL_RANK; choose GPUs with --gpus"
        );
    }
    let local = place.local_rank;
    let gpu = match gpus {
        Some(list) => {
            *list.get(local).with_context(|| format!("local rank {local}: --gpus lists {} GPUs", list.len()))?
        }
        None => local,
    };
    parse_device(&format!("cuda:{gpu}"))
}

/// Meets the other ranks and joins their NCCL group.
#[cfg(feature = "nccl")]
fn join_group(device: &Device, place: &Place, config: &str) -> Result<Box<dyn Collective>> {
    let id = candle_retinanet::train::meet(place, config, candle_retinanet::train::new_group_id)?;
    Ok(Box::new(candle_retinanet::train::NcclGroup::join(device, place.shard, &id)?))
}

#[cfg(not(feature = "nccl"))]
fn join_group(_: &Device, _: &Place, _: &str) -> Result<Box<dyn Collective>> {
    bail!("{}", NO_NCCL)
}
