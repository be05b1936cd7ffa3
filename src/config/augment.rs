//! The `input.augment` table: the training-time augmentations, each off
//! until its `prob` is set, with the ranges of the recipes they come from
//! (torchvision's `transforms.v2`, SSD, detectron2's large-scale jitter).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Training-time augmentations (`input.augment`), applied in this order:
/// photometric distortion, zoom-out, minimum-IoU crop, horizontal flip,
/// then either the scale jitter with its crop or the `min_size` resize.
/// Each is drawn from the seed and the image's position in the epoch.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    pub photometric: PhotometricConfig,
    pub zoom_out: ZoomOutConfig,
    pub iou_crop: IouCropConfig,
    pub scale_jitter: ScaleJitterConfig,
    /// A box that a crop cuts is kept when at least this fraction of its
    /// area stays in the image (0: any box wider and taller than a pixel).
    pub min_visible: f32,
}

/// Brightness, contrast, saturation and hue, as torchvision's
/// `ColorJitter`: all four in a random order, each factor drawn uniformly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhotometricConfig {
    /// Probability of distorting an image.
    pub prob: f32,
    /// Brightness factor from `[1 - brightness, 1 + brightness]`.
    pub brightness: f32,
    /// Contrast factor from `[1 - contrast, 1 + contrast]`.
    pub contrast: f32,
    /// Saturation factor from `[1 - saturation, 1 + saturation]`.
    pub saturation: f32,
    /// Hue shift from `[-hue, hue]` of a full turn (at most 0.5).
    pub hue: f32,
}

impl Default for PhotometricConfig {
    fn default() -> Self {
        // The ranges of torchvision's RandomPhotometricDistort (SSD's recipe).
        Self { prob: 0.0, brightness: 0.125, contrast: 0.5, saturation: 0.5, hue: 0.05 }
    }
}

/// SSD's expand (torchvision's `RandomZoomOut`): the image placed at a
/// random spot of a canvas up to `max_ratio` times its sides, filled with
/// `input.mean`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ZoomOutConfig {
    pub prob: f32,
    /// The canvas side over the image side is drawn from `[1, max_ratio]`.
    pub max_ratio: f32,
}

impl Default for ZoomOutConfig {
    fn default() -> Self {
        Self { prob: 0.0, max_ratio: 4.0 }
    }
}

/// SSD's minimum-IoU random crop (torchvision's `RandomIoUCrop`): a
/// required IoU is drawn from `min_ious` (1.0: no crop), then up to
/// `trials` crops are drawn until one overlaps a box by that much. Boxes
/// whose centre falls outside the crop are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IouCropConfig {
    pub prob: f32,
    /// Each crop side over the image side, from `[min_scale, max_scale]`.
    pub min_scale: f32,
    pub max_scale: f32,
    /// The crop's width over height must lie in `[min_aspect, max_aspect]`.
    pub min_aspect: f32,
    pub max_aspect: f32,
    pub min_ious: Vec<f32>,
    pub trials: usize,
}

impl Default for IouCropConfig {
    fn default() -> Self {
        Self {
            prob: 0.0,
            min_scale: 0.3,
            max_scale: 1.0,
            min_aspect: 0.5,
            max_aspect: 2.0,
            min_ious: vec![0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
            trials: 40,
        }
    }
}

/// Large-scale jitter (detectron2's `ResizeScale` + `FixedSizeCrop`,
/// torchvision's `ScaleJitter`): the image is resized to fit a
/// `size x size` square times a factor from `[min_scale, max_scale]`, then
/// a random `size x size` window of it is kept (smaller images are padded
/// with the batch). Replaces the `min_size` resize for the images it picks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleJitterConfig {
    pub prob: f32,
    pub min_scale: f32,
    pub max_scale: f32,
    /// The square's side; 0 takes `input.max_size`.
    pub size: u32,
}

impl Default for ScaleJitterConfig {
    fn default() -> Self {
        Self { prob: 0.0, min_scale: 0.1, max_scale: 2.0, size: 0 }
    }
}

impl AugmentConfig {
    /// Whether any augmentation can apply (a `prob` above 0).
    pub fn any(&self) -> bool {
        [self.photometric.prob, self.zoom_out.prob, self.iou_crop.prob, self.scale_jitter.prob].iter().any(|&p| p > 0.0)
    }

    /// Checks each augmentation's ranges, naming the key.
    pub fn validate(&self) -> Result<()> {
        let probability = |key: &str, p: f32| -> Result<()> {
            if !(0.0..=1.0).contains(&p) {
                bail!("config key input.augment.{key}: expected a probability in [0, 1], got {p}");
            }
            Ok(())
        };
        let (photo, zoom, crop, jitter) = (&self.photometric, &self.zoom_out, &self.iou_crop, &self.scale_jitter);
        probability("photometric.prob", photo.prob)?;
        probability("zoom_out.prob", zoom.prob)?;
        probability("iou_crop.prob", crop.prob)?;
        probability("scale_jitter.prob", jitter.prob)?;
        probability("min_visible", self.min_visible)?;
        for (key, v) in
            [("brightness", photo.brightness), ("contrast", photo.contrast), ("saturation", photo.saturation)]
        {
            if !(0.0..=1.0).contains(&v) {
                bail!("config key input.augment.photometric.{key}: expected a value in [0, 1], got {v}");
            }
        }
        if !(0.0..=0.5).contains(&photo.hue) {
            bail!("config key input.augment.photometric.hue: expected a value in [0, 0.5], got {}", photo.hue);
        }
        if zoom.max_ratio < 1.0 {
            bail!("config key input.augment.zoom_out.max_ratio: expected at least 1, got {}", zoom.max_ratio);
        }
        if !(crop.min_scale > 0.0 && crop.min_scale <= crop.max_scale && crop.max_scale <= 1.0) {
            bail!("config key input.augment.iou_crop.min_scale / max_scale: expected 0 < min_scale <= max_scale <= 1");
        }
        if !(crop.min_aspect > 0.0 && crop.min_aspect <= crop.max_aspect) {
            bail!("config key input.augment.iou_crop.min_aspect / max_aspect: expected 0 < min_aspect <= max_aspect");
        }
        if crop.min_ious.is_empty() || crop.min_ious.iter().any(|v| !(0.0..=1.0).contains(v)) {
            bail!("config key input.augment.iou_crop.min_ious: expected a non-empty list of values in [0, 1]");
        }
        if crop.trials == 0 {
            bail!("config key input.augment.iou_crop.trials: expected a positive integer");
        }
        if !(jitter.min_scale > 0.0 && jitter.min_scale <= jitter.max_scale) {
            bail!("config key input.augment.scale_jitter.min_scale / max_scale: expected 0 < min_scale <= max_scale");
        }
        Ok(())
    }
}
