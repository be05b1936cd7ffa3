//! Detections from head outputs, as torchvision's
//! `RetinaNet.postprocess_detections`: per level, sigmoid scores over the
//! flattened (anchor, class) pairs, keep those above `score_thresh`, take the
//! top `topk_candidates`, decode and clip; then class-wise NMS over all
//! levels (or NMS across classes, `class_agnostic_nms`) and the best
//! `detections_per_img`.
//!
//! Runs on the CPU after one transfer of the head outputs.

use candle_core::{DType, Device, Result, Tensor};

use crate::config::PostprocessConfig;
use crate::model::anchors::Anchors;
use crate::model::box_coder::BoxCoder;
use crate::ops::boxes::{batched_nms, clip_to_image, BoxXyxy};

/// One image's detections, best score first, in resized-image pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    pub boxes: Vec<BoxXyxy>,
    pub scores: Vec<f32>,
    /// Class index in 0..num_classes.
    pub labels: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct PostProcessor {
    score_thresh: f32,
    topk_candidates: usize,
    nms_thresh: f32,
    class_agnostic_nms: bool,
    detections_per_img: usize,
    box_coder: BoxCoder,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// A candidate: score and flat (anchor * K + class) index within its level.
type Candidate = (f32, usize);

/// Best score first; ties by lower index (a total order).
fn best_first(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl PostProcessor {
    pub(super) fn new(cfg: &PostprocessConfig, box_coder: BoxCoder) -> Self {
        Self {
            score_thresh: cfg.score_thresh as f32,
            topk_candidates: cfg.topk_candidates,
            nms_thresh: cfg.nms_thresh as f32,
            class_agnostic_nms: cfg.class_agnostic_nms,
            detections_per_img: cfg.detections_per_img,
            box_coder,
        }
    }

    /// `cls_logits` [n, num_anchors, K] and `bbox_regression` [n, num_anchors, 4]
    /// for a batch whose anchors are `anchors`; `image_sizes` are the
    /// (height, width) of each resized image before padding (boxes are
    /// clipped to them).
    pub(super) fn run(
        &self,
        cls_logits: &Tensor,
        bbox_regression: &Tensor,
        anchors: &Anchors,
        image_sizes: &[(usize, usize)],
    ) -> Result<Vec<Detections>> {
        let (n, num_anchors, k) = cls_logits.dims3()?;
        if bbox_regression.dims() != [n, num_anchors, 4] || anchors.boxes.len() != num_anchors {
            candle_core::bail!(
                "postprocess: cls_logits {:?}, bbox_regression {:?} and {} anchors disagree",
                cls_logits.dims(),
                bbox_regression.dims(),
                anchors.boxes.len()
            );
        }
        if image_sizes.len() != n {
            candle_core::bail!("postprocess: {} image sizes for a batch of {n}", image_sizes.len());
        }
        let to_cpu = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>();
        let logits = to_cpu(cls_logits)?;
        let deltas = to_cpu(bbox_regression)?;
        Ok((0..n)
            .map(|i| {
                let logits = &logits[i * num_anchors * k..(i + 1) * num_anchors * k];
                let deltas = &deltas[i * num_anchors * 4..(i + 1) * num_anchors * 4];
                self.image(logits, deltas, k, anchors, image_sizes[i])
            })
            .collect())
    }

    /// One image: logits [num_anchors * K], deltas [num_anchors * 4].
    fn image(&self, logits: &[f32], deltas: &[f32], k: usize, anchors: &Anchors, size: (usize, usize)) -> Detections {
        let mut all = Detections::default();
        let mut first_anchor = 0;
        for &level_len in &anchors.level_sizes {
            for (score, idx) in self.level_candidates(&logits[first_anchor * k..(first_anchor + level_len) * k]) {
                let anchor = first_anchor + idx / k;
                let b = self.box_coder.decode_one(&deltas[anchor * 4..anchor * 4 + 4], &anchors.boxes[anchor]);
                all.boxes.push(clip_to_image(&b, size));
                all.scores.push(score);
                all.labels.push(idx % k);
            }
            first_anchor += level_len;
        }
        // One NMS group for every class when the NMS is class-agnostic.
        let groups = if self.class_agnostic_nms { vec![0; all.labels.len()] } else { all.labels.clone() };
        let keep = batched_nms(&all.boxes, &all.scores, &groups, self.nms_thresh);
        let keep = &keep[..keep.len().min(self.detections_per_img)];
        Detections {
            boxes: keep.iter().map(|&i| all.boxes[i]).collect(),
            scores: keep.iter().map(|&i| all.scores[i]).collect(),
            labels: keep.iter().map(|&i| all.labels[i]).collect(),
        }
    }

    /// Scores above the threshold, the best `topk_candidates` of them, best first.
    fn level_candidates(&self, logits: &[f32]) -> Vec<Candidate> {
        let mut c: Vec<Candidate> =
            logits.iter().enumerate().map(|(i, &l)| (sigmoid(l), i)).filter(|&(s, _)| s > self.score_thresh).collect();
        if c.len() > self.topk_candidates {
            if self.topk_candidates > 0 {
                c.select_nth_unstable_by(self.topk_candidates - 1, best_first);
            }
            c.truncate(self.topk_candidates);
        }
        c.sort_unstable_by(best_first);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BoxCoderConfig;

    fn processor(score_thresh: f64, topk_candidates: usize) -> PostProcessor {
        let cfg = PostprocessConfig { score_thresh, topk_candidates, detections_per_img: 3, ..Default::default() };
        PostProcessor::new(&cfg, BoxCoder::new(&BoxCoderConfig::default()))
    }

    /// Two levels: 2 anchors then 1 anchor; K = 2.
    fn anchors() -> Anchors {
        Anchors {
            boxes: vec![[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 90.0, 90.0]],
            level_sizes: vec![2, 1],
            grid_sizes: vec![(1, 2), (1, 1)],
            strides: vec![(8, 8), (16, 16)],
        }
    }

    fn run(p: &PostProcessor, logits: &[f32]) -> Result<Vec<Detections>> {
        let dev = Device::Cpu;
        let cls = Tensor::from_slice(logits, (1, 3, 2), &dev)?;
        let reg = Tensor::zeros((1, 3, 4), DType::F32, &dev)?;
        p.run(&cls, &reg, &anchors(), &[(80, 85)])
    }

    #[test]
    fn thresholds_nms_and_clipping() -> Result<()> {
        // Anchor 0 class 1 (0.88) suppresses anchor 1 class 1 (0.73, IoU 0.82);
        // class 0 of anchor 1 survives; the P4 box is clipped to 85 x 80.
        let d = &run(&processor(0.5, 1000), &[-5.0, 2.0, 0.5, 1.0, 0.1, -3.0])?[0];
        assert_eq!(d.labels, vec![1, 0, 0]);
        assert_eq!(d.boxes, vec![[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 85.0, 80.0]]);
        assert!((d.scores[0] - sigmoid(2.0)).abs() < 1e-7);
        Ok(())
    }

    #[test]
    fn class_agnostic_nms_suppresses_across_classes() -> Result<()> {
        let cfg = PostprocessConfig {
            score_thresh: 0.5,
            detections_per_img: 3,
            class_agnostic_nms: true,
            ..Default::default()
        };
        let p = PostProcessor::new(&cfg, BoxCoder::new(&BoxCoderConfig::default()));
        // As `thresholds_nms_and_clipping`, where anchor 1's class 0 (0.62)
        // survives class-wise NMS: anchor 0's class 1 (0.88) now suppresses it.
        let d = &run(&p, &[-5.0, 2.0, 0.5, 1.0, 0.1, -3.0])?[0];
        assert_eq!(d.labels, vec![1, 0]);
        assert_eq!(d.boxes, vec![[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 85.0, 80.0]]);
        Ok(())
    }

    #[test]
    fn topk_is_per_level() -> Result<()> {
        let d = &run(&processor(0.0, 1), &[-5.0, 2.0, 0.5, 1.0, 0.1, -3.0])?[0];
        // One candidate per level: (anchor 0, class 1) and (anchor 2, class 0).
        assert_eq!(d.labels, vec![1, 0]);
        assert_eq!(d.boxes[1], [50.0, 50.0, 85.0, 80.0]);
        Ok(())
    }

    #[test]
    fn empty_inputs() -> Result<()> {
        assert_eq!(run(&processor(0.99, 1000), &[0.0; 6])?, vec![Detections::default()]);
        let dev = Device::Cpu;
        let empty = Anchors { boxes: vec![], level_sizes: vec![0], grid_sizes: vec![(0, 0)], strides: vec![(8, 8)] };
        let cls = Tensor::zeros((0, 0, 2), DType::F32, &dev)?;
        let reg = Tensor::zeros((0, 0, 4), DType::F32, &dev)?;
        assert!(processor(0.05, 10).run(&cls, &reg, &empty, &[])?.is_empty());
        let two_anchors = Tensor::zeros((1, 2, 2), DType::F32, &dev)?;
        let reg = Tensor::zeros((1, 2, 4), DType::F32, &dev)?;
        assert!(processor(0.05, 10).run(&two_anchors, &reg, &anchors(), &[(8, 8)]).is_err());
        Ok(())
    }
}
