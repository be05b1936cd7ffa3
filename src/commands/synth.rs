//! `retinanet synth`: writes the synthetic shapes dataset.

use anyhow::{Context, Result};

use candle_retinanet::data::{write_dataset, SynthSpec};

use crate::cli::SynthArgs;

pub(super) fn run(args: SynthArgs) -> Result<()> {
    let spec = SynthSpec { train: args.train, val: args.val, size: args.size, seed: args.seed };
    if spec.size < 32 {
        anyhow::bail!("--size {}: images must be at least 32 px", spec.size);
    }
    if std::fs::read_dir(&args.out).is_ok_and(|mut entries| entries.next().is_some()) {
        anyhow::bail!("--out {}: folder exists and is not empty", args.out.display());
    }
    // Built beside the target and renamed into place: never half-written.
    let tmp = args.out.with_extension(format!("tmp-{}", std::process::id()));
    write_dataset(&tmp, spec)?;
    let _ = std::fs::remove_dir(&args.out); // an empty folder may stand in the way
    std::fs::rename(&tmp, &args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    eprintln!(
        "wrote {} train and {} val images ({}x{} px, seed {}) to {}",
        spec.train,
        spec.val,
        spec.size,
        spec.size,
        spec.seed,
        args.out.display()
    );
    Ok(())
}
