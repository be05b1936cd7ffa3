//! `retinanet convert-weights IN --out OUT.safetensors`: writes any weights
//! file `retinanet` reads (a PyTorch checkpoint, safetensors, a Hub file)
//! as safetensors, after checking it against a model when `--config` is
//! given.

use anyhow::{Context, Result};
use candle_core::Device;
use candle_retinanet::config::Config;
use candle_retinanet::model::{self, LoadMode};
use candle_retinanet::run::{read_weights, resolve_weights_spec, write_weights};

use crate::cli::ConvertWeightsArgs;

pub(super) fn run(args: ConvertWeightsArgs) -> Result<()> {
    let path = resolve_weights_spec(&args.input)?;
    let tensors = read_weights(&path)?;
    if let Some(name) = &args.config.config {
        let config = Config::resolve(Some(name), &args.config.overrides)?;
        let num_classes = config.model.num_classes.max(1);
        let mode = LoadMode::for_pretrained(&tensors);
        let loaded = model::build(&config.model, num_classes, &Device::Cpu, config.train.seed, Some((&tensors, mode)))
            .with_context(|| format!("weights {} against config {name}", path.display()))?;
        for note in loaded.notes {
            eprintln!("note: {note}");
        }
    }
    write_weights(&tensors, &args.out)?;
    eprintln!("wrote {} tensors from {} to {}", tensors.len(), path.display(), args.out.display());
    Ok(())
}
