//! Running a model over batches: detections mapped back to original image
//! pixels, as COCO results, and scored on a split.

use candle_core::{Device, Result, Tensor};

use crate::data::{scale_boxes, Batch, CategoryMap, CocoJson, Loader};
use crate::eval::{evaluate, Detection, EvalParams, EvalResult};
use crate::model::{Detections, RetinaNet};

/// The `(height, width)` sizes of one image of a batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ImageSizes {
    /// After resizing, before padding.
    pub resized: (usize, usize),
    pub original: (usize, usize),
}

/// Runs the model (eval mode) on a batch on `device`; one [`Detections`]
/// per image of the batch, in original pixels.
pub fn detect_batch(model: &RetinaNet, batch: &Batch, device: &Device) -> Result<Vec<Detections>> {
    let sizes: Vec<ImageSizes> =
        batch.targets.iter().map(|t| ImageSizes { resized: t.resized_size, original: t.original_size }).collect();
    detect_images(model, &batch.images, &sizes, device)
}

/// Runs the model on padded `images [n, 3, h, w]`, one [`ImageSizes`] per
/// image; the boxes come back in original pixels, best score first.
pub(super) fn detect_images(
    model: &RetinaNet,
    images: &Tensor,
    sizes: &[ImageSizes],
    device: &Device,
) -> Result<Vec<Detections>> {
    let outputs = model.forward(&images.to_device(device)?, false)?;
    let resized: Vec<(usize, usize)> = sizes.iter().map(|s| s.resized).collect();
    let mut detections = model.postprocess(&outputs, &resized)?;
    for (d, s) in detections.iter_mut().zip(sizes) {
        scale_boxes(&mut d.boxes, s.resized, s.original);
    }
    Ok(detections)
}

/// One image's detections as COCO results (`[x, y, w, h]`, category ids);
/// labels that map to no category are left out.
pub fn to_coco_results(image_id: u64, detections: &Detections, categories: &CategoryMap) -> Vec<Detection> {
    let rows = detections.boxes.iter().zip(&detections.scores).zip(&detections.labels);
    rows.filter_map(|((b, &score), &label)| {
        let category_id = categories.category_id_of(label)?;
        let [x1, y1, x2, y2] = b.map(f64::from);
        Some(Detection { image_id, category_id, bbox: [x1, y1, x2 - x1, y2 - y1], score: score as f64 })
    })
    .collect()
}

/// Runs the model over every batch of `loader` (epoch 0, in file order):
/// each image's id and detections, in original pixels.
pub fn detect_split(model: &RetinaNet, loader: &Loader, device: &Device) -> anyhow::Result<Vec<(u64, Detections)>> {
    let mut all = Vec::with_capacity(loader.len_images());
    for batch in loader.epoch(0, 0)? {
        let batch = batch?;
        let detections = detect_batch(model, &batch, device)?;
        all.extend(batch.targets.iter().map(|t| t.image_id).zip(detections));
    }
    Ok(all)
}

/// Runs the model over `loader` ([`detect_split`]) and scores the
/// detections against `ground_truth`.
pub fn evaluate_split(
    model: &RetinaNet,
    loader: &Loader,
    ground_truth: &CocoJson,
    categories: &CategoryMap,
    device: &Device,
) -> anyhow::Result<(EvalResult, Vec<Detection>)> {
    let detections = detect_split(model, loader, device)?;
    let results: Vec<Detection> = detections.iter().flat_map(|(id, d)| to_coco_results(*id, d, categories)).collect();
    let result = evaluate(ground_truth, &results, &EvalParams::default())?;
    Ok((result, results))
}
