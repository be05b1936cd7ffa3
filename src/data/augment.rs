//! Training-time augmentations that change pixels and boxes together:
//! photometric distortion, zoom-out, the minimum-IoU crop (SSD's recipe, as
//! torchvision's `transforms.v2` draws them) and the crop window of the
//! large-scale jitter (detectron2's `FixedSizeCrop`). The scale jitter's
//! resize itself is in [`super::transforms`], with the other resizes.
//!
//! Every function draws from the generator it is handed, in a fixed order,
//! so an image's augmentation depends only on the seed the loader derives
//! from `(seed, epoch, position)`.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::{IouCropConfig, PhotometricConfig, ZoomOutConfig};
use crate::ops::boxes::iou;

/// An image with its boxes while it is augmented.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Sample {
    pub(super) image: RgbImage,
    /// `[x1, y1, x2, y2]` in this image's pixels.
    pub(super) boxes: Vec<[f32; 4]>,
    /// For each box, its index among the boxes the sample started with.
    pub(super) kept: Vec<usize>,
}

impl Sample {
    pub(super) fn new(image: RgbImage, boxes: &[[f32; 4]]) -> Self {
        Self { image, boxes: boxes.to_vec(), kept: (0..boxes.len()).collect() }
    }
}

/// A window of an image: `[left, top)` plus its size, in whole pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) left: usize,
    pub(super) top: usize,
    pub(super) width: usize,
    pub(super) height: usize,
}

/// Brightness, contrast, saturation and hue in a random order, each with a
/// factor drawn uniformly from its range (torchvision's `ColorJitter`), on
/// RGB in [0, 1]; rounded back to bytes once at the end.
pub(super) fn photometric(image: &mut RgbImage, cfg: &PhotometricConfig, rng: &mut ChaCha8Rng) {
    let factor = |rng: &mut ChaCha8Rng, range: f32| rng.random_range(1.0 - range..=1.0 + range);
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let brightness = factor(rng, cfg.brightness);
    let contrast = factor(rng, cfg.contrast);
    let saturation = factor(rng, cfg.saturation);
    let hue = rng.random_range(-cfg.hue..=cfg.hue);
    let mut rgb: Vec<[f32; 3]> =
        image.pixels().map(|p| [p[0] as f32 / 255.0, p[1] as f32 / 255.0, p[2] as f32 / 255.0]).collect();
    for op in order {
        match op {
            0 => rgb.iter_mut().for_each(|px| *px = blend(*px, [0.0; 3], brightness)),
            1 => {
                let mean = rgb.iter().map(|&px| gray(px)).sum::<f32>() / rgb.len().max(1) as f32;
                rgb.iter_mut().for_each(|px| *px = blend(*px, [mean; 3], contrast));
            }
            2 => rgb.iter_mut().for_each(|px| *px = blend(*px, [gray(*px); 3], saturation)),
            _ => rgb.iter_mut().for_each(|px| *px = shift_hue(*px, hue)),
        }
    }
    for (p, px) in image.pixels_mut().zip(&rgb) {
        *p = Rgb(px.map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8));
    }
}

/// `factor * a + (1 - factor) * b`, clamped to [0, 1] (torchvision's `_blend`).
fn blend(a: [f32; 3], b: [f32; 3], factor: f32) -> [f32; 3] {
    [0, 1, 2].map(|c| (factor * a[c] + (1.0 - factor) * b[c]).clamp(0.0, 1.0))
}

/// ITU-R 601 luma, as torchvision's `rgb_to_grayscale`.
fn gray([r, g, b]: [f32; 3]) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

/// Rotates the hue by `shift` of a full turn through HSV.
fn shift_hue([r, g, b]: [f32; 3], shift: f32) -> [f32; 3] {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    if chroma == 0.0 {
        return [r, g, b]; // grey has no hue
    }
    let hue = if max == r {
        ((g - b) / chroma).rem_euclid(6.0)
    } else if max == g {
        (b - r) / chroma + 2.0
    } else {
        (r - g) / chroma + 4.0
    } / 6.0;
    let hue = (hue + shift).rem_euclid(1.0) * 6.0;
    let x = chroma * (1.0 - ((hue % 2.0) - 1.0).abs());
    let (r1, g1, b1) = match hue as u32 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    [r1 + min, g1 + min, b1 + min]
}

/// Places the image at a random spot of a canvas whose sides are a factor
/// from `[1, max_ratio]` times its own, filled with `fill` (torchvision's
/// `RandomZoomOut`); boxes move with it.
pub(super) fn zoom_out(sample: &mut Sample, cfg: &ZoomOutConfig, fill: [u8; 3], rng: &mut ChaCha8Rng) {
    let ratio = rng.random_range(1.0..=cfg.max_ratio);
    let (w, h) = (sample.image.width(), sample.image.height());
    let (canvas_w, canvas_h) = ((w as f32 * ratio) as u32, (h as f32 * ratio) as u32);
    let left = ((canvas_w - w) as f32 * rng.random::<f32>()) as u32;
    let top = ((canvas_h - h) as f32 * rng.random::<f32>()) as u32;
    let mut canvas = RgbImage::from_pixel(canvas_w, canvas_h, Rgb(fill));
    image::imageops::replace(&mut canvas, &sample.image, left as i64, top as i64);
    sample.image = canvas;
    let (dx, dy) = (left as f32, top as f32);
    for b in &mut sample.boxes {
        *b = [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy];
    }
}

/// SSD's crop (torchvision's `RandomIoUCrop`): draws a required IoU from
/// `min_ious` (1.0 or more: leave the image), then up to `trials` windows
/// of the allowed scales and aspects, until one contains a box centre and
/// overlaps one of those boxes by that IoU. Boxes whose centre lies outside
/// the window are dropped, the others clipped. An image without boxes is
/// left as it is; so is one for which no window is found in `max_rounds`
/// draws of the IoU (torchvision would keep drawing).
pub(super) fn iou_crop(sample: &mut Sample, cfg: &IouCropConfig, min_visible: f32, rng: &mut ChaCha8Rng) {
    const MAX_ROUNDS: usize = 50;
    if sample.boxes.is_empty() {
        return;
    }
    let (w, h) = (sample.image.width() as f32, sample.image.height() as f32);
    for _ in 0..MAX_ROUNDS {
        let min_iou = cfg.min_ious[rng.random_range(0..cfg.min_ious.len())];
        if min_iou >= 1.0 {
            return;
        }
        for _ in 0..cfg.trials {
            let new_w = (w * rng.random_range(cfg.min_scale..=cfg.max_scale)) as usize;
            let new_h = (h * rng.random_range(cfg.min_scale..=cfg.max_scale)) as usize;
            if new_w == 0 || new_h == 0 || !(cfg.min_aspect..=cfg.max_aspect).contains(&(new_w as f32 / new_h as f32)) {
                continue;
            }
            let left = ((w - new_w as f32) * rng.random::<f32>()) as usize;
            let top = ((h - new_h as f32) * rng.random::<f32>()) as usize;
            let window = Window { left, top, width: new_w, height: new_h };
            let rect = [left as f32, top as f32, (left + new_w) as f32, (top + new_h) as f32];
            let inside: Vec<bool> = sample.boxes.iter().map(|b| centre_inside(b, &rect)).collect();
            let best_iou = sample
                .boxes
                .iter()
                .zip(&inside)
                .filter(|(_, &inside)| inside)
                .map(|(b, _)| iou(b, &rect))
                .fold(f32::NEG_INFINITY, f32::max);
            if best_iou == f32::NEG_INFINITY || best_iou < min_iou {
                continue;
            }
            crop_sample(sample, window, &inside, min_visible);
            return;
        }
    }
}

fn centre_inside(b: &[f32; 4], rect: &[f32; 4]) -> bool {
    let (cx, cy) = ((b[0] + b[2]) * 0.5, (b[1] + b[3]) * 0.5);
    rect[0] < cx && cx < rect[2] && rect[1] < cy && cy < rect[3]
}

/// Crops the sample's image to `window`; boxes marked in `candidates`
/// are clipped and kept by [`crop_boxes`]'s rule, the others dropped.
fn crop_sample(sample: &mut Sample, window: Window, candidates: &[bool], min_visible: f32) {
    let image = image::imageops::crop_imm(
        &sample.image,
        window.left as u32,
        window.top as u32,
        window.width as u32,
        window.height as u32,
    );
    sample.image = image.to_image();
    let (boxes, kept): (Vec<_>, Vec<_>) =
        sample.boxes.iter().zip(&sample.kept).zip(candidates).filter(|(_, &c)| c).map(|(p, _)| p).unzip();
    let (boxes, kept) = crop_boxes(&boxes, &kept, window, min_visible);
    sample.boxes = boxes;
    sample.kept = kept;
}

/// Moves boxes into `window`'s coordinates and clips them to it. A box
/// stays when its clipped width and height are positive and at least a
/// pixel (or its own size, if smaller), and at least `min_visible` of its
/// area is left; `kept` follows the boxes that stay.
pub(super) fn crop_boxes(
    boxes: &[[f32; 4]],
    kept: &[usize],
    window: Window,
    min_visible: f32,
) -> (Vec<[f32; 4]>, Vec<usize>) {
    let (dx, dy) = (window.left as f32, window.top as f32);
    let (w, h) = (window.width as f32, window.height as f32);
    boxes
        .iter()
        .zip(kept)
        .filter_map(|(b, &k)| {
            let moved = [b[0] - dx, b[1] - dy, b[2] - dx, b[3] - dy];
            let clipped =
                [moved[0].clamp(0.0, w), moved[1].clamp(0.0, h), moved[2].clamp(0.0, w), moved[3].clamp(0.0, h)];
            let (bw, bh) = (b[2] - b[0], b[3] - b[1]);
            let (cw, ch) = (clipped[2] - clipped[0], clipped[3] - clipped[1]);
            let big_enough = cw > 0.0 && ch > 0.0 && cw >= bw.min(1.0) && ch >= bh.min(1.0);
            let visible = cw * ch / (bw * bh).max(f32::MIN_POSITIVE);
            (big_enough && visible >= min_visible).then_some((clipped, k))
        })
        .unzip()
}

/// A random `size x size` window of a `height x width` image (the whole
/// side where it is shorter), with the offset of detectron2's
/// `FixedSizeCrop`: `round(max_offset * U(0, 1))`.
pub(super) fn random_window(height: usize, width: usize, size: usize, rng: &mut ChaCha8Rng) -> Window {
    let (crop_h, crop_w) = (height.min(size), width.min(size));
    let top = ((height - crop_h) as f32 * rng.random::<f32>()).round() as usize;
    let left = ((width - crop_w) as f32 * rng.random::<f32>()).round() as usize;
    Window { left, top, width: crop_w, height: crop_h }
}

/// The `window` of a `[c, h, w]` buffer, as `[c, window.height, window.width]`.
pub(super) fn crop_chw(src: &[f32], c: usize, h: usize, w: usize, window: Window) -> Vec<f32> {
    assert_eq!(src.len(), c * h * w, "crop_chw: buffer is not [c, h, w]");
    let mut out = Vec::with_capacity(c * window.height * window.width);
    for ch in 0..c {
        for y in window.top..window.top + window.height {
            let row = (ch * h + y) * w;
            out.extend_from_slice(&src[row + window.left..row + window.left + window.width]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hue_shift_of_a_full_turn_is_the_identity_and_grey_has_none() {
        let px = [0.8, 0.3, 0.1];
        let back = shift_hue(px, 1.0);
        for c in 0..3 {
            assert!((back[c] - px[c]).abs() < 1e-5, "{back:?}");
        }
        assert_eq!(shift_hue([0.4; 3], 0.3), [0.4; 3]);
        // Red rotated by a third of a turn is green.
        let green = shift_hue([1.0, 0.0, 0.0], 1.0 / 3.0);
        assert!((green[1] - 1.0).abs() < 1e-5 && green[0].abs() < 1e-5 && green[2].abs() < 1e-5, "{green:?}");
    }

    #[test]
    fn crop_boxes_clips_and_drops_by_visible_fraction() {
        let window = Window { left: 10, top: 10, width: 20, height: 20 };
        let boxes = [[12.0, 12.0, 18.0, 18.0], [0.0, 12.0, 14.0, 28.0], [0.0, 0.0, 5.0, 5.0], [25.0, 25.0, 35.0, 35.0]];
        let (out, kept) = crop_boxes(&boxes, &[0, 1, 2, 3], window, 0.2);
        // Box 1 keeps 4 of its 14 columns (0.29); box 3 a quarter; box 2 leaves.
        assert_eq!(kept, vec![0, 1, 3]);
        assert_eq!(out, vec![[2.0, 2.0, 8.0, 8.0], [0.0, 2.0, 4.0, 18.0], [15.0, 15.0, 20.0, 20.0]]);
        let (_, kept) = crop_boxes(&boxes, &[0, 1, 2, 3], window, 0.3);
        assert_eq!(kept, vec![0]);
    }

    #[test]
    fn crop_chw_takes_the_window_of_every_channel() {
        let src: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
        let window = Window { left: 1, top: 1, width: 2, height: 2 };
        assert_eq!(crop_chw(&src, 2, 3, 4, window), vec![5.0, 6.0, 9.0, 10.0, 17.0, 18.0, 21.0, 22.0]);
    }
}
