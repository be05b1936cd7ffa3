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
    /// `last`), a checkpoint folder, a weights file, or a Hub file
    /// (`hf:<owner>/<repo>[@<revision>][/<file>]`).
    pub fn locate(weights: &Path) -> Result<Self> {
        if let Some(spec) = weights.to_str().filter(|w| w.starts_with("hf:")) {
            return Ok(Self { model_file: resolve_weights(spec, None)?, saved_config: None });
        }
        if weights.is_file() {
            return Ok(Self { model_file: weights.to_path_buf(), saved_config: None });
        }
        let folder = RunFolder::at(weights)
            .best_or_last()
            .or_else(|| is_checkpoint(weights).then(|| weights.to_path_buf()))
            .with_context(|| {
                format!(
                    "--weights {}: not a weights file, a run folder, a checkpoint folder or hf:<owner>/<repo>",
                    weights.display()
                )
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
                "--weights {}: a bare weights file needs --config for the architecture",
                self.model_file.display()
            ),
        }
    }
}

/// A local path for a `model.backbone.weights` value: a file, or
/// `hf:<owner>/<repo>[@<revision>][/<file>]` fetched into the Hub cache on
/// first use.
pub fn resolve_weights_spec(spec: &str) -> Result<PathBuf> {
    resolve_weights(spec, None)
}

/// The weight file formats read, for errors.
const FORMATS: &str = "a .safetensors file or a PyTorch checkpoint as torch.save writes it (.pth/.pt, zip format)";

/// Where a PyTorch checkpoint keeps its state_dict: under `model`
/// (torchvision's reference scripts) or `state_dict`, else at the top.
const STATE_DICT_KEYS: [Option<&str>; 3] = [Some("model"), Some("state_dict"), None];

/// Reads a weights file onto the CPU: safetensors, or a PyTorch checkpoint
/// (a plain state_dict or one nested under `model` or `state_dict`),
/// told apart by their first bytes. Tensors keep their file's dtype.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut head = [0u8; 9];
    let read = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .with_context(|| format!("cannot read weights {}", path.display()))?;
    let head = &head[..read];
    if head.starts_with(b"PK\x03\x04") {
        return read_pytorch(path);
    }
    if head.len() == 9 && head[8] == b'{' {
        return candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read safetensors weights {}", path.display()));
    }
    bail!("weights {}: not {FORMATS}", path.display())
}

/// Writes tensors as a safetensors file, through a temporary file renamed
/// into place.
pub fn write_weights(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let contiguous: HashMap<String, Tensor> =
        tensors.iter().map(|(k, t)| Ok((k.clone(), t.contiguous()?))).collect::<candle_core::Result<_>>()?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = candle_core::safetensors::save(&contiguous, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(anyhow::Error::from));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// The state_dict of a PyTorch zip checkpoint.
fn read_pytorch(path: &Path) -> Result<HashMap<String, Tensor>> {
    for key in STATE_DICT_KEYS {
        // A key the file lacks is an error here: try the next place.
        if let Ok(tensors) = candle_core::pickle::read_all_with_key(path, key) {
            if !tensors.is_empty() {
                return Ok(tensors.into_iter().collect());
            }
        }
    }
    // Read once more at the top level for the reader's own error.
    candle_core::pickle::read_all_with_key(path, None)
        .with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))?;
    bail!(
        "weights {}: a PyTorch checkpoint without tensors at the top, under `model` or under `state_dict`",
        path.display()
    )
}
