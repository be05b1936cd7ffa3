//! The training augmentations move boxes with the pixels: an image holds
//! one bright rectangle on a dark ground, its box is the rectangle, and
//! after each augmentation (many seeds each) the box that survives still
//! bounds the bright pixels tightly, the box a crop drops is the one whose
//! rectangle left the image, and the photometric distortion changes pixels
//! but no box.

use candle_retinanet::config::{AugmentConfig, InputConfig};
use candle_retinanet::data::{Augment, Transform, TransformedImage};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEEDS: u64 = 60;
/// How far (pixels) a box edge may sit from the bright pixels' edge: the
/// bilinear resize blurs an edge over about a pixel of the output.
const TOLERANCE: f32 = 2.0;

/// A transform that keeps the 120x160 test images at their size, with
/// identity normalisation (the pixels stay in [0, 1]).
fn transform(augment: AugmentConfig) -> Transform {
    let input = InputConfig {
        min_size: vec![120],
        max_size: 160,
        mean: [0.0; 3],
        std: [1.0; 3],
        augment,
        ..InputConfig::default()
    };
    Transform::new(&input)
}

/// A 160x120 dark image with one bright rectangle (random, from `seed`)
/// and its box.
fn image_with_box(seed: u64) -> (RgbImage, [f32; 4]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (w, h) = (rng.random_range(12..60u32), rng.random_range(12..60u32));
    let (x, y) = (rng.random_range(0..160 - w), rng.random_range(0..120 - h));
    let mut image = RgbImage::from_pixel(160, 120, Rgb([20, 30, 40]));
    for py in y..y + h {
        for px in x..x + w {
            image.put_pixel(px, py, Rgb([230, 220, 200]));
        }
    }
    (image, [x as f32, y as f32, (x + w) as f32, (y + h) as f32])
}

fn augmented(t: &Transform, seed: u64) -> (TransformedImage, [f32; 4]) {
    let (image, b) = image_with_box(seed);
    let augment = Augment { min_size_index: Some(0), hflip: seed % 2 == 1, seed: Some(seed * 7919) };
    (t.apply(&image, &[b], augment), b)
}

/// The bounding box of the pixels brighter than halfway between the
/// darkest and brightest, as `[x1, y1, x2, y2]` pixel edges, and their
/// count; `None` when nothing is bright.
fn bright_extent(t: &TransformedImage) -> Option<([f32; 4], usize)> {
    let plane = t.height * t.width;
    let sum: Vec<f32> = (0..plane).map(|i| t.chw[i] + t.chw[plane + i] + t.chw[2 * plane + i]).collect();
    let (lo, hi) = sum.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if hi - lo < 0.5 {
        return None; // one flat colour: the rectangle is not in the image
    }
    let mid = (lo + hi) / 2.0;
    let mut extent = [f32::MAX, f32::MAX, f32::MIN, f32::MIN];
    let mut count = 0;
    for (i, _) in sum.iter().enumerate().filter(|(_, &v)| v > mid) {
        let (x, y) = ((i % t.width) as f32, (i / t.width) as f32);
        extent = [extent[0].min(x), extent[1].min(y), extent[2].max(x + 1.0), extent[3].max(y + 1.0)];
        count += 1;
    }
    Some((extent, count))
}

fn assert_bounds(t: &TransformedImage, what: &str, seed: u64) {
    let b = t.boxes[0];
    let (extent, _) = bright_extent(t).unwrap_or_else(|| panic!("{what} seed {seed}: a kept box over no bright pixel"));
    for k in 0..4 {
        assert!(
            (extent[k] - b[k]).abs() <= TOLERANCE,
            "{what} seed {seed}: box {b:?} does not bound the rectangle's pixels {extent:?} ({}x{})",
            t.width,
            t.height
        );
    }
}

/// Runs `SEEDS` images through `augment`; every kept box must bound its
/// rectangle. Returns how many images changed size and how many lost
/// their box.
fn check(augment: AugmentConfig, what: &str) -> (usize, usize) {
    let t = transform(augment);
    let (mut resized, mut dropped) = (0, 0);
    for seed in 0..SEEDS {
        let (out, _) = augmented(&t, seed);
        assert_eq!(out.chw.len(), 3 * out.height * out.width);
        resized += usize::from((out.height, out.width) != (120, 160));
        match out.kept.as_slice() {
            [0] => assert_bounds(&out, what, seed),
            [] => dropped += 1,
            other => panic!("{what} seed {seed}: kept {other:?} of one box"),
        }
    }
    (resized, dropped)
}

#[test]
fn zoom_out_moves_and_shrinks_the_box_with_the_image() {
    let mut augment = AugmentConfig::default();
    augment.zoom_out.prob = 1.0;
    let (resized, dropped) = check(augment.clone(), "zoom_out");
    // The canvas is resized back to 120x160 or less; nothing leaves it.
    assert_eq!(dropped, 0);
    let t = transform(augment);
    let shrunk = (0..SEEDS)
        .filter(|&s| {
            let (out, b) = augmented(&t, s);
            out.boxes[0][2] - out.boxes[0][0] < 0.9 * (b[2] - b[0])
        })
        .count();
    assert!(shrunk > SEEDS as usize / 2, "zoom-out shrank only {shrunk} boxes (resized {resized})");
}

#[test]
fn iou_crop_keeps_boxes_on_their_pixels() {
    let mut augment = AugmentConfig::default();
    augment.iou_crop.prob = 1.0;
    augment.iou_crop.min_ious = vec![0.1, 0.3, 0.5];
    let (resized, dropped) = check(augment, "iou_crop");
    // Every crop holds the centre of the single box, so it always stays.
    assert_eq!(dropped, 0);
    // Crops change the aspect, so the resize to min_size 120 changes the size.
    assert!(resized > SEEDS as usize / 2, "only {resized} of {SEEDS} images were cropped");
}

#[test]
fn scale_jitter_crops_and_drops_boxes_mostly_cut_away() {
    let mut augment = AugmentConfig::default();
    augment.scale_jitter.prob = 1.0;
    augment.scale_jitter.min_scale = 0.5;
    augment.scale_jitter.max_scale = 3.0;
    augment.min_visible = 0.3;
    let t = transform(augment.clone());
    for seed in 0..SEEDS {
        let (out, _) = augmented(&t, seed);
        assert!(out.height <= 160 && out.width <= 160, "the window is at most the 160 px square");
        if out.kept.is_empty() {
            // Only a box the window cut is dropped: its pixels are gone or
            // reach the window's edge.
            if let Some((e, _)) = bright_extent(&out) {
                let (w, h) = (out.width as f32, out.height as f32);
                let at_edge = e[0] <= TOLERANCE || e[1] <= TOLERANCE || e[2] >= w - TOLERANCE || e[3] >= h - TOLERANCE;
                assert!(at_edge, "seed {seed}: dropped a box whose rectangle {e:?} lies inside the {w}x{h} window");
            }
        }
    }
    let (resized, dropped) = check(augment, "scale_jitter");
    assert!(resized > SEEDS as usize / 2, "only {resized} of {SEEDS} images were jittered");
    assert!(dropped > 0, "no box was ever cut away: the crop never bites");
}

/// Every augmentation, each on half of the images.
fn all_at_half() -> AugmentConfig {
    let mut augment = AugmentConfig::default();
    augment.photometric.prob = 0.5;
    augment.zoom_out.prob = 0.5;
    augment.iou_crop.prob = 0.5;
    augment.scale_jitter.prob = 0.5;
    augment
}

#[test]
fn everything_at_once_keeps_boxes_on_their_pixels() {
    check(all_at_half(), "all");
}

#[test]
fn photometric_distortion_changes_pixels_not_boxes() {
    let mut augment = AugmentConfig::default();
    augment.photometric.prob = 1.0;
    let t = transform(augment);
    let plain = transform(AugmentConfig::default());
    let mut changed = 0;
    for seed in 0..SEEDS {
        let (out, _) = augmented(&t, seed);
        let (reference, _) = augmented(&plain, seed);
        assert_eq!((out.height, out.width), (120, 160));
        assert_eq!(out.boxes, reference.boxes, "seed {seed}: a colour change moved a box");
        assert_eq!(out.kept, vec![0]);
        assert_bounds(&out, "photometric", seed);
        changed += usize::from(out.chw != reference.chw);
    }
    assert_eq!(changed, SEEDS as usize, "some images were not distorted");
}

#[test]
fn the_same_seed_gives_the_same_augmentation() {
    let t = transform(all_at_half());
    for seed in 0..10 {
        assert_eq!(augmented(&t, seed), augmented(&t, seed));
    }
}
