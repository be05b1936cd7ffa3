//! The model's input transform, matching torchvision's
//! `GeneralizedRCNNTransform` exactly: normalise with mean/std, resize with
//! `scale = min(min_size / short, max_size / long)` and torch's bilinear
//! interpolation, zero-pad the batch to a multiple of `size_divisible`; plus
//! the training-time augmentations (`input.augment`, see [`super::augment`])
//! and horizontal flip, and the map of predicted boxes back to original
//! pixels.

use std::borrow::Cow;

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::augment::{crop_boxes, crop_chw, iou_crop, photometric, random_window, zoom_out, Sample};
use crate::config::{AugmentConfig, InputConfig};

/// Random choices for one training image; evaluation uses [`Augment::NONE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augment {
    /// Index into `min_size`; `None` takes the last, as torchvision's eval.
    pub min_size_index: Option<usize>,
    pub hflip: bool,
    /// Seed of the draws of `input.augment` for this image; `None` applies
    /// none of them.
    pub seed: Option<u64>,
}

impl Augment {
    pub const NONE: Self = Self { min_size_index: None, hflip: false, seed: None };
}

/// One image after the transform, before batching.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformedImage {
    /// Normalised pixels, `[3, height, width]` row-major.
    pub chw: Vec<f32>,
    /// Size after resizing (before padding).
    pub height: usize,
    pub width: usize,
    /// Boxes `[x1, y1, x2, y2]` in resized pixels.
    pub boxes: Vec<[f32; 4]>,
    /// For each of `boxes`, its index among the boxes given (crops drop
    /// some).
    pub kept: Vec<usize>,
}

/// Input transform parameters (see [`InputConfig`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub min_size: Vec<u32>,
    pub max_size: u32,
    pub size_divisible: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub augment: AugmentConfig,
}

impl Transform {
    pub fn new(cfg: &InputConfig) -> Self {
        Self {
            min_size: cfg.min_size.clone(),
            max_size: cfg.max_size,
            size_divisible: cfg.size_divisible,
            mean: cfg.mean,
            std: cfg.std,
            augment: cfg.augment.clone(),
        }
    }

    /// Size after resizing an `height x width` image to `min_size`:
    /// `floor(side * scale)` in f64, as torch's `interpolate` computes it.
    pub fn resized_size(&self, height: usize, width: usize, min_size: u32) -> (usize, usize) {
        let short = height.min(width) as f64;
        let long = height.max(width) as f64;
        let scale = (min_size as f64 / short).min(self.max_size as f64 / long);
        ((height as f64 * scale).floor() as usize, (width as f64 * scale).floor() as usize)
    }

    /// Augments (as `augment` says), normalises and resizes one image with
    /// its boxes (`[x1, y1, x2, y2]` in original pixels).
    pub fn apply(&self, image: &RgbImage, boxes: &[[f32; 4]], augment: Augment) -> TransformedImage {
        // Without any augmentation on, the image is not copied for them.
        let mut rng = augment.seed.filter(|_| self.augment.any()).map(ChaCha8Rng::seed_from_u64);
        let (image, mut boxes, kept) = match rng.as_mut() {
            Some(rng) => {
                let sample = self.augment_pixels(image, boxes, rng);
                (Cow::Owned(sample.image), sample.boxes, sample.kept)
            }
            None => (Cow::Borrowed(image), boxes.to_vec(), (0..boxes.len()).collect()),
        };
        let (width, height) = (image.width() as usize, image.height() as usize);
        let chw = if augment.hflip {
            hflip_boxes(&mut boxes, width as f32);
            self.normalize(&image::imageops::flip_horizontal(image.as_ref()))
        } else {
            self.normalize(&image)
        };
        let jitter = rng.as_mut().and_then(|rng| self.draw_scale_jitter(rng).map(|scale| (scale, rng)));
        if let Some((scale, rng)) = jitter {
            return self.scale_jitter(chw, (height, width), boxes, kept, scale, rng);
        }
        let min_size = match augment.min_size_index {
            Some(i) => self.min_size[i],
            None => *self.min_size.last().expect("min_size is validated non-empty"),
        };
        let (out_h, out_w) = self.resized_size(height, width, min_size);
        let chw = resize_bilinear(&chw, 3, height, width, out_h, out_w);
        scale_boxes(&mut boxes, (height, width), (out_h, out_w));
        TransformedImage { chw, height: out_h, width: out_w, boxes, kept }
    }

    /// The augmentations on bytes, in their order: photometric distortion,
    /// zoom-out, minimum-IoU crop. Each draws whether it applies first.
    fn augment_pixels(&self, image: &RgbImage, boxes: &[[f32; 4]], rng: &mut ChaCha8Rng) -> Sample {
        let cfg = &self.augment;
        let mut sample = Sample::new(image.clone(), boxes);
        if rng.random::<f32>() < cfg.photometric.prob {
            photometric(&mut sample.image, &cfg.photometric, rng);
        }
        if rng.random::<f32>() < cfg.zoom_out.prob {
            let fill = self.mean.map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8);
            zoom_out(&mut sample, &cfg.zoom_out, fill, rng);
        }
        if rng.random::<f32>() < cfg.iou_crop.prob {
            iou_crop(&mut sample, &cfg.iou_crop, cfg.min_visible, rng);
        }
        sample
    }

    /// The scale jitter's factor when this image gets it.
    fn draw_scale_jitter(&self, rng: &mut ChaCha8Rng) -> Option<f32> {
        let cfg = &self.augment.scale_jitter;
        let applies = rng.random::<f32>() < cfg.prob;
        applies.then(|| rng.random_range(cfg.min_scale..=cfg.max_scale))
    }

    /// The side of the scale jitter's square.
    fn jitter_size(&self) -> usize {
        match self.augment.scale_jitter.size {
            0 => self.max_size as usize,
            size => size as usize,
        }
    }

    /// Large-scale jitter on a normalised `[3, height, width]` image: resize
    /// to fit the square times `scale` (sides floored, as torchvision's
    /// `ScaleJitter`), then keep a random window of at most the square.
    fn scale_jitter(
        &self,
        chw: Vec<f32>,
        (height, width): (usize, usize),
        mut boxes: Vec<[f32; 4]>,
        kept: Vec<usize>,
        scale: f32,
        rng: &mut ChaCha8Rng,
    ) -> TransformedImage {
        let size = self.jitter_size();
        let fit = (size as f64 / height as f64).min(size as f64 / width as f64) * scale as f64;
        let out_h = ((height as f64 * fit) as usize).max(1);
        let out_w = ((width as f64 * fit) as usize).max(1);
        let resized = resize_bilinear(&chw, 3, height, width, out_h, out_w);
        scale_boxes(&mut boxes, (height, width), (out_h, out_w));
        let window = random_window(out_h, out_w, size, rng);
        let chw = crop_chw(&resized, 3, out_h, out_w, window);
        let (boxes, kept) = crop_boxes(&boxes, &kept, window, self.augment.min_visible);
        TransformedImage { chw, height: window.height, width: window.width, boxes, kept }
    }

    /// RGB bytes to `[3, h, w]` floats: `(v / 255 - mean) / std`.
    fn normalize(&self, image: &RgbImage) -> Vec<f32> {
        let plane = image.width() as usize * image.height() as usize;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in image.pixels().enumerate() {
            for c in 0..3 {
                chw[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        chw
    }

    /// Padded batch size: the largest height and width rounded up to a
    /// multiple of `size_divisible`.
    pub fn padded_size(&self, sizes: impl IntoIterator<Item = (usize, usize)>) -> (usize, usize) {
        let d = self.size_divisible as usize;
        let (h, w) = sizes.into_iter().fold((0, 0), |(h, w), (ih, iw)| (h.max(ih), w.max(iw)));
        (h.div_ceil(d) * d, w.div_ceil(d) * d)
    }
}

/// Copies images into one zero-padded `[n, 3, pad_h, pad_w]` buffer.
pub fn pad_batch(images: &[&TransformedImage], (pad_h, pad_w): (usize, usize)) -> Vec<f32> {
    let image_len = 3 * pad_h * pad_w;
    let mut out = vec![0f32; images.len() * image_len];
    for (n, im) in images.iter().enumerate() {
        for c in 0..3 {
            for y in 0..im.height {
                let src = &im.chw[(c * im.height + y) * im.width..][..im.width];
                let dst = n * image_len + (c * pad_h + y) * pad_w;
                out[dst..dst + im.width].copy_from_slice(src);
            }
        }
    }
    out
}

/// Mirrors boxes in an image `width` pixels wide.
pub fn hflip_boxes(boxes: &mut [[f32; 4]], width: f32) {
    for b in boxes {
        *b = [width - b[2], b[1], width - b[0], b[3]];
    }
}

/// Rescales boxes from an image of size `from` to `to` (both `(h, w)`), as
/// torchvision's `resize_boxes`: ratios `to / from` computed in f32.
pub fn scale_boxes(boxes: &mut [[f32; 4]], from: (usize, usize), to: (usize, usize)) {
    let ratio_h = to.0 as f32 / from.0 as f32;
    let ratio_w = to.1 as f32 / from.1 as f32;
    for b in boxes {
        *b = [b[0] * ratio_w, b[1] * ratio_h, b[2] * ratio_w, b[3] * ratio_h];
    }
}

/// Per output index along one axis: the two source indices and weights of
/// torch's bilinear interpolation with `align_corners=False` (the scale is
/// recomputed from the sizes, as `recompute_scale_factor=True` does).
fn linear_taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|dst| {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_size - 1);
            let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
            let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - lambda1, lambda1)
        })
        .collect()
}

/// Bilinear resize of `[c, h, w]` to `[c, out_h, out_w]`, equal to
/// `torch.nn.functional.interpolate(x, size=(out_h, out_w), mode="bilinear",
/// align_corners=False)` on CPU, in the same order of operations:
/// `(x00 * w0 + x01 * w1) * h0 + (x10 * w0 + x11 * w1) * h1`.
///
/// Written here because the `image` crate's filters and candle's
/// `upsample_bilinear2d` do not reproduce torch's sampling positions.
pub fn resize_bilinear(src: &[f32], c: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(src.len(), c * h * w, "resize_bilinear: buffer is not [c, h, w]");
    if (out_h, out_w) == (h, w) {
        return src.to_vec(); // torch's weights are then exactly (1, 0)
    }
    let rows = linear_taps(h, out_h);
    let cols = linear_taps(w, out_w);
    let mut out = vec![0f32; c * out_h * out_w];
    for ch in 0..c {
        let plane = &src[ch * h * w..][..h * w];
        let out_plane = &mut out[ch * out_h * out_w..][..out_h * out_w];
        for (y, &(y0, y1, hw0, hw1)) in rows.iter().enumerate() {
            let (r0, r1) = (&plane[y0 * w..][..w], &plane[y1 * w..][..w]);
            let out_row = &mut out_plane[y * out_w..][..out_w];
            for (o, &(x0, x1, ww0, ww1)) in out_row.iter_mut().zip(&cols) {
                let top = r0[x0] * ww0 + r0[x1] * ww1;
                let bottom = r1[x0] * ww0 + r1[x1] * ww1;
                *o = top * hw0 + bottom * hw1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transform(min_size: u32, max_size: u32) -> Transform {
        Transform::new(&InputConfig { min_size: vec![min_size], max_size, ..InputConfig::default() })
    }

    #[test]
    fn resized_size_follows_torchvision() {
        // 480x640 at 800/1333: scale 800/480, long side 1066.67 -> 1066.
        assert_eq!(transform(800, 1333).resized_size(480, 640, 800), (800, 1066));
        // The long side caps the scale: 1333/2000.
        assert_eq!(transform(800, 1333).resized_size(500, 2000, 800), (333, 1333));
        assert_eq!(transform(192, 192).resized_size(192, 192, 192), (192, 192));
    }

    #[test]
    fn padded_size_rounds_up_each_side() {
        let t = transform(800, 1333);
        assert_eq!(t.padded_size([(800, 1066), (600, 1100)]), (800, 1120));
        assert_eq!(t.padded_size([(33, 64)]), (64, 64));
    }

    #[test]
    fn identity_resize_is_exact() {
        let src: Vec<f32> = (0..2 * 3 * 5).map(|v| v as f32 * 0.37).collect();
        assert_eq!(resize_bilinear(&src, 2, 3, 5, 3, 5), src);
    }
}
