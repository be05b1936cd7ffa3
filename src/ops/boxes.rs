//! Box geometry in (x1, y1, x2, y2) pixels, as torchvision.ops.boxes: no +1
//! in widths, IoU, clipping and class-wise NMS on the CPU in f32 (matching,
//! postprocess), and the GIoU of tensors, differentiable on any device (the
//! GIoU box loss).

use candle_core::{Result, Tensor, D};

/// A box as (x1, y1, x2, y2).
pub type BoxXyxy = [f32; 4];

/// Width times height, without the +1 pixel convention.
pub(crate) fn area(b: &BoxXyxy) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Intersection over union of two boxes, computed like torchvision's CPU
/// NMS kernel (`inter / (area_a + area_b - inter)`).
pub(crate) fn iou(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (area(a) + area(b) - inter)
}

/// Clamps x to [0, width] and y to [0, height] (torchvision's
/// `clip_boxes_to_image`, with the image size as (height, width)).
pub(crate) fn clip_to_image(b: &BoxXyxy, (height, width): (usize, usize)) -> BoxXyxy {
    let (w, h) = (width as f32, height as f32);
    [b[0].clamp(0.0, w), b[1].clamp(0.0, h), b[2].clamp(0.0, w), b[3].clamp(0.0, h)]
}

/// Indices of `scores` sorted best first; ties keep the lower index first
/// (torchvision's CPU NMS sorts with `stable=True`).
fn order_by_score(scores: &[f32], indices: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut order: Vec<usize> = indices.collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
    order
}

/// Greedy NMS over `indices`: visits boxes best score first and suppresses
/// every later box whose IoU with a kept one is above `iou_thresh`.
/// Returns the kept indices, best first.
fn nms_subset(boxes: &[BoxXyxy], scores: &[f32], indices: impl Iterator<Item = usize>, iou_thresh: f32) -> Vec<usize> {
    let order = order_by_score(scores, indices);
    let mut suppressed = vec![false; order.len()];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[pos] {
            continue;
        }
        keep.push(i);
        for (later, &j) in order.iter().enumerate().skip(pos + 1) {
            if !suppressed[later] && iou(&boxes[i], &boxes[j]) > iou_thresh {
                suppressed[later] = true;
            }
        }
    }
    keep
}

/// torchvision.ops.batched_nms: NMS within each label only. Returns the
/// kept indices sorted best score first (ties: lower index first).
pub(crate) fn batched_nms(boxes: &[BoxXyxy], scores: &[f32], labels: &[usize], iou_thresh: f32) -> Vec<usize> {
    let mut by_label: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, &label) in labels.iter().enumerate() {
        by_label.entry(label).or_default().push(i);
    }
    let mut keep: Vec<usize> = Vec::new();
    for members in by_label.values() {
        keep.extend(nms_subset(boxes, scores, members.iter().copied(), iou_thresh));
    }
    keep.sort_unstable();
    order_by_score(scores, keep.into_iter())
}

/// Splits a `[.., 4]` tensor into its four coordinate columns `[..]`.
fn unbind_xyxy(boxes: &Tensor) -> Result<[Tensor; 4]> {
    let col = |i| boxes.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1);
    Ok([col(0)?, col(1)?, col(2)?, col(3)?])
}

/// Generalised IoU of matching rows: `a` [n, 4], `b` [n, 4] -> [n];
/// differentiable, for the GIoU box loss (`1 - giou`).
pub(crate) fn elementwise_generalized_iou(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let [ax1, ay1, ax2, ay2] = unbind_xyxy(a)?;
    let [bx1, by1, bx2, by2] = unbind_xyxy(b)?;
    let w = (ax2.minimum(&bx2)? - ax1.maximum(&bx1)?)?.relu()?;
    let h = (ay2.minimum(&by2)? - ay1.maximum(&by1)?)?.relu()?;
    let inter = (w * h)?;
    let area_a = ((&ax2 - &ax1)? * (&ay2 - &ay1)?)?;
    let area_b = ((&bx2 - &bx1)? * (&by2 - &by1)?)?;
    let union = ((area_a + area_b)? - &inter)?;
    let hull = ((ax2.maximum(&bx2)? - ax1.minimum(&bx1)?)? * (ay2.maximum(&by2)? - ay1.minimum(&by1)?)?)?;
    let iou = (inter / &union)?;
    iou - ((&hull - union)? / hull)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torchvision.ops.nms: batched NMS with one label.
    fn nms(boxes: &[BoxXyxy], scores: &[f32], iou_thresh: f32) -> Vec<usize> {
        batched_nms(boxes, scores, &vec![0; boxes.len()], iou_thresh)
    }

    /// Generalised IoU: IoU minus the share of the enclosing box that neither
    /// box covers; in [-1, 1].
    fn generalized_iou(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
        let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = w * h;
        let union = area(a) + area(b) - inter;
        let hull = (a[2].max(b[2]) - a[0].min(b[0])) * (a[3].max(b[3]) - a[1].min(b[1]));
        inter / union - (hull - union) / hull
    }

    #[test]
    fn iou_of_shifted_squares() {
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [5.0, 0.0, 15.0, 10.0];
        assert_eq!(iou(&a, &b), 50.0 / 150.0);
        assert_eq!(iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        assert_eq!(iou(&a, &a), 1.0);
    }

    #[test]
    fn giou_of_disjoint_boxes_is_negative() {
        let a = [0.0, 0.0, 1.0, 1.0];
        let b = [2.0, 0.0, 3.0, 1.0];
        // Hull 3x1, union 2: giou = 0 - (3 - 2) / 3.
        assert!((generalized_iou(&a, &b) + 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(generalized_iou(&a, &a), 1.0);
    }

    #[test]
    fn clip_uses_height_then_width() {
        assert_eq!(clip_to_image(&[-5.0, -1.0, 120.0, 90.0], (80, 100)), [0.0, 0.0, 100.0, 80.0]);
    }

    #[test]
    fn nms_suppresses_only_above_threshold() {
        // IoU(a, b) = 50 / 150 = 1/3 exactly representable comparisons.
        let boxes = [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 9.0]];
        let scores = [0.9, 0.8, 0.7];
        // IoU(a, c) = 0.9: suppressed at 0.5; IoU(a, b) = 1/3 is not above 1/3.
        assert_eq!(nms(&boxes, &scores, 0.5), vec![0, 1]);
        assert_eq!(nms(&boxes, &scores, iou(&boxes[0], &boxes[1])), vec![0, 1]);
        assert_eq!(nms(&boxes, &scores, 0.3), vec![0]);
    }

    #[test]
    fn nms_ties_keep_the_lower_index() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]];
        let scores = [0.5, 0.5, 0.5];
        assert_eq!(nms(&boxes, &scores, 0.5), vec![0, 2]);
    }

    #[test]
    fn batched_nms_is_class_wise_and_sorted_by_score() {
        let boxes = [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]];
        let scores = [0.6, 0.9, 0.7, 0.8];
        let labels = [0, 1, 0, 1];
        // Label 0: box 2 (0.7) suppresses box 0; label 1: both kept.
        assert_eq!(batched_nms(&boxes, &scores, &labels, 0.5), vec![1, 3, 2]);
        assert!(batched_nms(&[], &[], &[], 0.5).is_empty());
    }

    #[test]
    fn tensor_giou_matches_the_slice_version() -> Result<()> {
        let a = [[0.0f32, 0.0, 10.0, 10.0], [2.0, 3.0, 8.0, 12.0]];
        let b = [[5.0f32, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 31.0], [1.0, 1.0, 9.0, 9.0]];
        let ta = Tensor::new(&a, &Device::Cpu)?;
        let tb = Tensor::new(&b, &Device::Cpu)?;
        let g = elementwise_generalized_iou(&ta, &tb.narrow(0, 0, 2)?)?.to_vec1::<f32>()?;
        for (i, v) in g.iter().enumerate() {
            assert!((v - generalized_iou(&a[i], &b[i])).abs() < 1e-6);
        }
        Ok(())
    }
}
