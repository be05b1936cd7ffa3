//! `retinanet train`: resolves the config, starts or resumes a run, and
//! prints the final COCO summary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::cli::TrainArgs;
use crate::config::Config;
use crate::data::loader::Shard;
use crate::device::parse_device;
use crate::train::checkpoint::CONFIG_FILE;
use crate::train::distributed::{rank_from_env, Collective, SingleProcess, RANK_ENV};
use crate::train::trainer::{new_run_folder, resume_paths, Trainer};

use super::launch::{launch, parse_gpus};

pub fn run(args: TrainArgs) -> Result<()> {
    let config = match &args.resume {
        Some(resume) => {
            if args.config.config.is_some() {
                bail!("--resume continues with the run's own config; change keys with --set");
            }
            let (_, checkpoint) = resume_paths(resume)?;
            let saved = checkpoint.join(CONFIG_FILE);
            Config::resolve(Some(&saved.to_string_lossy()), &args.config.overrides)?
        }
        None => Config::resolve(args.config.config.as_deref(), &args.config.overrides)?,
    };
    let gpus = args.gpus.as_deref().map(parse_gpus).transpose()?;
    let (device, collective): (Device, Box<dyn Collective>) = match (gpus, rank_from_env()?) {
        (None, None) => (parse_device(&args.device)?, Box::new(SingleProcess)),
        (Some(gpus), None) => {
            let out = args.out.clone().unwrap_or_else(|| new_run_folder(&config.name));
            return launch(&gpus, &out);
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
    let leader = collective.shard().rank == 0;
    let trainer = Trainer::new(config, device, args.out.clone(), args.resume.as_deref(), collective)?;
    let run_dir = trainer.run_paths().root.clone();
    if leader {
        eprintln!("training for {} steps; run folder {}", trainer.total_steps(), run_dir.display());
    }

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
    if !leader {
        return Ok(());
    }
    if outcome.interrupted {
        eprintln!(
            "stopped at step {}; checkpoint saved. Continue with: retinanet train --resume {}",
            outcome.steps,
            run_dir.display()
        );
        return Ok(());
    }
    if let Some(result) = &outcome.final_eval {
        for line in result.summary_lines() {
            println!("{line}");
        }
        println!();
        for line in result.class_table() {
            println!("{line}");
        }
    }
    eprintln!("done: {} steps; run folder {}", outcome.steps, run_dir.display());
    Ok(())
}

/// This rank's place in the NCCL group of a `--gpus` run.
#[cfg(feature = "nccl")]
fn join_group(device: &Device, shard: Shard, group_id: &str) -> Result<Box<dyn Collective>> {
    Ok(Box::new(crate::train::distributed::NcclGroup::join(device, shard, group_id)?))
}

#[cfg(not(feature = "nccl"))]
fn join_group(_: &Device, _: Shard, _: &str) -> Result<Box<dyn Collective>> {
    bail!("--gpus: this binary was built without NCCL (rebuild with `--features nccl`)")
}
