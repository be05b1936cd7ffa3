//! `retinanet train`: resolves the config, starts or resumes a run, and
//! prints the final COCO summary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::cli::TrainArgs;
use crate::config::Config;
use crate::device::parse_device;
use crate::train::checkpoint::CONFIG_FILE;
use crate::train::trainer::{resume_paths, Trainer};

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
    let device = parse_device(&args.device)?;
    let trainer = Trainer::new(config, device, args.out.clone(), args.resume.as_deref())?;
    let run_dir = trainer.run_paths().root.clone();
    eprintln!("training for {} steps; run folder {}", trainer.total_steps(), run_dir.display());

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
