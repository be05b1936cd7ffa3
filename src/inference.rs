//! Running a model over batches: detections mapped back to original image
//! pixels, as COCO results, and scored on a split.

use candle_core::{Device, Result, Tensor};

use crate::data::coco::{CategoryMap, CocoJson};
use crate::data::loader::{Batch, Loader};
use crate::data::transforms::scale_boxes;
use crate::eval::{evaluate, Detection, EvalParams, EvalResult};
use crate::model::retinanet::RetinaNet;
use crate::ops::boxes::BoxXyxy;

/// One image's detections in original pixels, best score first.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDetections {
    pub image_id: u64,
    /// `[x1, y1, x2, y2]` in original image pixels.
    pub boxes: Vec<BoxXyxy>,
    pub scores: Vec<f32>,
    pub labels: Vec<usize>,
}

/// Which image a row of a batch is, and its `(height, width)` sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageInfo {
    pub image_id: u64,
    /// After resizing, before padding.
    pub resized: (usize, usize),
    pub original: (usize, usize),
}

/// Runs the model (eval mode) on a batch on `device`.
pub fn detect_batch(model: &RetinaNet, batch: &Batch, device: &Device) -> Result<Vec<ImageDetections>> {
    let infos: Vec<ImageInfo> = batch
        .targets
        .iter()
        .map(|t| ImageInfo { image_id: t.image_id, resized: t.resized_size, original: t.original_size })
        .collect();
    detect_images(model, &batch.images, &infos, device)
}

/// Runs the model on padded `images [n, 3, h, w]`, one [`ImageInfo`] per
/// image.
pub fn detect_images(
    model: &RetinaNet,
    images: &Tensor,
    infos: &[ImageInfo],
    device: &Device,
) -> Result<Vec<ImageDetections>> {
    let outputs = model.forward(&images.to_device(device)?, false)?;
    let resized: Vec<(usize, usize)> = infos.iter().map(|i| i.resized).collect();
    let detections = model.postprocess(&outputs, &resized)?;
    Ok(detections
        .into_iter()
        .zip(infos)
        .map(|(mut d, info)| {
            scale_boxes(&mut d.boxes, info.resized, info.original);
            ImageDetections { image_id: info.image_id, boxes: d.boxes, scores: d.scores, labels: d.labels }
        })
        .collect())
}

/// COCO results (`[x, y, w, h]`, category ids); labels that map to no
/// category are left out.
pub fn to_coco_results(images: &[ImageDetections], categories: &CategoryMap) -> Vec<Detection> {
    let mut results = Vec::new();
    for im in images {
        for ((b, &score), &label) in im.boxes.iter().zip(&im.scores).zip(&im.labels) {
            let Some(category_id) = categories.category_id_of(label) else { continue };
            let [x1, y1, x2, y2] = b.map(f64::from);
            results.push(Detection {
                image_id: im.image_id,
                category_id,
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: score as f64,
            });
        }
    }
    results
}

/// Runs the model over every batch of `loader` (epoch 0, unshuffled) and
/// scores the detections against `ground_truth`; `on_batch` is told the
/// number of images done after each batch (for progress).
pub fn evaluate_split(
    model: &RetinaNet,
    loader: &Loader,
    ground_truth: &CocoJson,
    categories: &CategoryMap,
    device: &Device,
    mut on_batch: impl FnMut(usize),
) -> anyhow::Result<(EvalResult, Vec<Detection>)> {
    let mut detections = Vec::new();
    let mut done = 0;
    for batch in loader.epoch(0, 0)? {
        let batch = batch?;
        let images = detect_batch(model, &batch, device)?;
        detections.extend(to_coco_results(&images, categories));
        done += batch.targets.len();
        on_batch(done);
    }
    let result = evaluate(ground_truth, &detections, &EvalParams::default())?;
    Ok((result, detections))
}
