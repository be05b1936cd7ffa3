//! `retinanet synth`: writes the synthetic shapes dataset.

use anyhow::{Context, Result};

use candle_retinanet::data::{create_folder_atomically, write_dataset, SynthSpec};

use crate::cli::SynthArgs;

pub(super) fn run(args: SynthArgs) -> Result<()> {
    let spec = SynthSpec { train: args.train, val: args.val, size: args.size, seed: args.seed };
    if spec.size < 32 {
        anyhow::bail!("--size {}: images must be at least 32 px", spec.size);
    }
    create_folder_atomically(&args.out, |dir| write_dataset(dir, spec)).context("--out")?;
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
