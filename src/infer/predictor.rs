//! A trained model ready to run on images: its config, class names and
//! input transform, from what `--weights` names.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

use super::detect::{detect_images, ImageSizes};
use crate::config::Config;
use crate::data::{pad_batch, Augment, CategoryMap, CocoCategory, LoadedSplit, Transform};
use crate::model::{self, Detections, LoadMode, RetinaNet};
use crate::run::{read_weights, WeightsSource};

pub struct Predictor {
    pub config: Config,
    pub model: RetinaNet,
    /// The classes the model was trained on, from its config.
    pub categories: CategoryMap,
    transform: Transform,
    device: Device,
}

impl Predictor {
    /// Loads the model of `--weights` with the resolved `config` on `device`.
    pub fn load(source: &WeightsSource, config: Config, device: &Device) -> Result<Self> {
        let categories =
            CategoryMap::from_config(&config.data).context("the config does not say which classes the model has")?;
        let num_classes = match config.model.num_classes {
            0 => categories.num_labels(),
            n => n,
        };
        let tensors = read_weights(&source.model_file)?;
        let loaded =
            model::build(&config.model, num_classes, device, config.train.seed, Some((&tensors, LoadMode::Exact)))
                .with_context(|| format!("weights {}", source.model_file.display()))?;
        Ok(Self {
            transform: Transform::new(&config.input),
            model: loaded.inference,
            categories,
            config,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks that a split names the classes this model was trained on
    /// (same category ids and names), so its results can be scored.
    pub fn check_split(&self, split: &LoadedSplit) -> Result<()> {
        let id_names = |c: &[CocoCategory]| c.iter().map(|c| (c.id, c.name.clone())).collect::<Vec<_>>();
        if id_names(split.dataset.categories.categories()) != id_names(self.categories.categories()) {
            bail!(
                "{}: its categories differ from the model's ({})",
                split.files.annotations.display(),
                self.config.data.classes.join(", ")
            );
        }
        Ok(())
    }

    /// Detections on one image, in its pixels, best score first.
    pub fn predict(&self, image: &RgbImage) -> Result<Detections> {
        let t = self.transform.apply(image, &[], Augment::NONE);
        let padded = self.transform.padded_size([(t.height, t.width)]);
        let pixels = pad_batch(&[&t], padded);
        let batch = Tensor::from_vec(pixels, (1, 3, padded.0, padded.1), &Device::Cpu)?;
        let sizes =
            ImageSizes { resized: (t.height, t.width), original: (image.height() as usize, image.width() as usize) };
        let mut detections = detect_images(&self.model, &batch, &[sizes], &self.device)?;
        Ok(detections.pop().expect("one image in, one out"))
    }
}
