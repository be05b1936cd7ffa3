//! A trained model ready to run: found from `--weights` (a run folder, a
//! checkpoint folder, or a `.safetensors` file with `--config`), with its
//! config, class names and input transform.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::config::Config;
use crate::data::coco::CategoryMap;
use crate::data::transforms::{pad_batch, Augment, Transform};
use crate::inference::{detect_images, ImageDetections, ImageInfo};
use crate::model::retinanet::RetinaNet;
use crate::model::weights::{self, LoadMode};
use crate::train::checkpoint::{CONFIG_FILE, MODEL_FILE};

/// Where `--weights` points: the weight file and the config saved beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsSource {
    pub model_file: PathBuf,
    /// `config.toml` of the run or checkpoint, when there is one.
    pub saved_config: Option<PathBuf>,
}

/// Resolves `--weights`: a run folder (its `best` checkpoint, else `last`),
/// a checkpoint folder, or a `.safetensors` file.
pub fn locate_weights(weights: &Path) -> Result<WeightsSource> {
    if weights.is_file() {
        return Ok(WeightsSource { model_file: weights.to_path_buf(), saved_config: None });
    }
    let checkpoints = weights.join("checkpoints");
    let folder = ["best", "last"]
        .iter()
        .map(|name| checkpoints.join(name))
        .chain(std::iter::once(weights.to_path_buf()))
        .find(|f| f.join(MODEL_FILE).is_file())
        .with_context(|| {
            format!("--weights {}: not a .safetensors file, a run folder or a checkpoint folder", weights.display())
        })?;
    let config = folder.join(CONFIG_FILE);
    Ok(WeightsSource { model_file: folder.join(MODEL_FILE), saved_config: config.is_file().then_some(config) })
}

/// The config a model runs with: `--config` if given, else the one saved
/// with the weights; then the `--set` overrides.
pub fn model_config(source: &WeightsSource, config: Option<&str>, overrides: &[String]) -> Result<Config> {
    match (config, &source.saved_config) {
        (Some(c), _) => Config::resolve(Some(c), overrides),
        (None, Some(saved)) => Config::resolve(Some(&saved.to_string_lossy()), overrides),
        (None, None) => bail!(
            "--weights {}: a bare .safetensors file needs --config for the architecture",
            source.model_file.display()
        ),
    }
}

pub struct Predictor {
    pub config: Config,
    pub model: RetinaNet,
    pub categories: CategoryMap,
    transform: Transform,
    device: Device,
}

impl Predictor {
    /// Loads the model of `--weights` with the resolved `config` on `device`.
    pub fn load(source: &WeightsSource, config: Config, device: &Device) -> Result<Self> {
        let categories = config.data.category_map().context("the config does not say which classes the model has")?;
        let num_classes = match config.model.num_classes {
            0 => categories.num_labels(),
            n => n,
        };
        let tensors = weights::read_safetensors(&source.model_file)?;
        let loaded =
            weights::build(&config.model, num_classes, device, config.train.seed, Some((&tensors, LoadMode::Exact)))
                .with_context(|| format!("weights {}", source.model_file.display()))?;
        Ok(Self {
            transform: Transform::new(&config.input),
            model: loaded.model,
            categories,
            config,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// Detections on one image, in its pixels, best score first.
    pub fn predict(&self, image: &RgbImage) -> Result<ImageDetections> {
        let t = self.transform.apply(image, &[], Augment::NONE);
        let padded = self.transform.padded_size([(t.height, t.width)]);
        let pixels = pad_batch(&[&t], padded);
        let batch = Tensor::from_vec(pixels, (1, 3, padded.0, padded.1), &Device::Cpu)?;
        let info = ImageInfo {
            image_id: 0,
            resized: (t.height, t.width),
            original: (image.height() as usize, image.width() as usize),
        };
        let mut detections = detect_images(&self.model, &batch, &[info], &self.device)?;
        Ok(detections.pop().expect("one image in, one out"))
    }
}
