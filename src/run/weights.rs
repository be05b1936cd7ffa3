//! Weights on disk: where `--weights` points (a run folder, a checkpoint
//! folder or a weights file), the config that goes with them, and reading
//! them. `model.backbone.weights` may also name a Hub file (`hf:`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::checkpoint::{is_checkpoint, CONFIG_FILE, MODEL_FILE};
use super::hub::resolve_weights;
use super::RunFolder;
use crate::config::Config;

/// Where `--weights` points: the weight file and the config saved beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsSource {
    pub model_file: PathBuf,
    /// `config.toml` of the run or checkpoint, when there is one.
    pub saved_config: Option<PathBuf>,
}

impl WeightsSource {
    /// Resolves `--weights`: a run folder (its `best` checkpoint, else
    /// `last`), a checkpoint folder, or a `.safetensors` file.
    pub fn locate(weights: &Path) -> Result<Self> {
        if weights.is_file() {
            return Ok(Self { model_file: weights.to_path_buf(), saved_config: None });
        }
        let folder = RunFolder::at(weights)
            .best_or_last()
            .or_else(|| is_checkpoint(weights).then(|| weights.to_path_buf()))
            .with_context(|| {
                format!("--weights {}: not a .safetensors file, a run folder or a checkpoint folder", weights.display())
            })?;
        let config = folder.join(CONFIG_FILE);
        Ok(Self { model_file: folder.join(MODEL_FILE), saved_config: config.is_file().then_some(config) })
    }

    /// The config a model runs with: `--config` if given, else the one
    /// saved with the weights; then the `--set` overrides.
    pub fn config(&self, config: Option<&str>, overrides: &[String]) -> Result<Config> {
        match (config, &self.saved_config) {
            (Some(c), _) => Config::resolve(Some(c), overrides),
            (None, Some(saved)) => Config::resolve(Some(&saved.to_string_lossy()), overrides),
            (None, None) => bail!(
                "--weights {}: a bare .safetensors file needs --config for the architecture",
                self.model_file.display()
            ),
        }
    }
}

/// A local path for a `model.backbone.weights` value: a file, or
/// `hf:<owner>/<repo>[/<file>]` fetched into the Hub cache on first use.
pub fn resolve_weights_spec(spec: &str) -> Result<PathBuf> {
    resolve_weights(spec, None)
}

/// Reads a safetensors weights file onto the CPU.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read safetensors weights {}", path.display()))
}
