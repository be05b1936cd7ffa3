//! Training targets of a batch: each image's boxes matched to the anchors
//! (on the CPU, where the boxes already are), then uploaded once as the
//! tensors [`LossTargets`] describes.

use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

use super::atss::Atss;
use super::loss::{LossTargets, Normalizer};
use super::matcher::{ignore_crowd_covered, Matcher, IGNORE};
use crate::config::{LossConfig, MatcherKind};
use crate::data::Target;
use crate::model::anchors::Anchors;
use crate::ops::boxes::{iou, BoxXyxy};

/// The rule of `loss.matcher` that assigns anchors to boxes; both give the
/// label semantics of [`Matcher::assign`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum AnchorMatcher {
    MaxIou(Matcher),
    Atss(Atss),
}

impl AnchorMatcher {
    pub(super) fn new(cfg: &LossConfig) -> Self {
        match cfg.matcher {
            MatcherKind::MaxIou => Self::MaxIou(Matcher {
                high_threshold: cfg.fg_iou_thresh as f32,
                low_threshold: cfg.bg_iou_thresh as f32,
                allow_low_quality_matches: cfg.allow_low_quality_matches,
            }),
            MatcherKind::Atss => Self::Atss(Atss { topk: cfg.atss_topk }),
        }
    }
}

/// Foreground counts per image, for logs and the non-finite-loss report.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MatchSummary {
    pub foreground_per_image: Vec<usize>,
}

/// Matches every image of a batch and builds the loss targets on `device`.
/// `anchors` are the batch's anchors (one per head output row) and
/// `num_classes` the classification width.
pub(super) fn build_targets(
    targets: &[Target],
    anchors: &Anchors,
    num_classes: usize,
    matcher: &AnchorMatcher,
    normalizer: &mut Normalizer,
    device: &Device,
) -> Result<(LossTargets, MatchSummary)> {
    let matches: Vec<Vec<i64>> = targets.par_iter().map(|t| match_image(t, anchors, matcher)).collect();
    let fg_per_image: Vec<usize> = matches.iter().map(|m| m.iter().filter(|&&v| v >= 0).count()).collect();
    let weights = normalizer.image_weights(&fg_per_image);

    let anchors = &anchors.boxes;
    let (n, a) = (targets.len(), anchors.len());
    let mut cls_targets = vec![0f32; n * a * num_classes];
    let mut cls_weights = vec![0f32; n * a];
    let mut fg_indices = Vec::new();
    let mut matched_boxes = Vec::new();
    let mut fg_anchors = Vec::new();
    let mut box_weights = Vec::new();
    for (i, (target, image_matches)) in targets.iter().zip(&matches).enumerate() {
        let gt: Vec<(usize, &BoxXyxy)> = non_crowd(target).collect();
        for (j, &m) in image_matches.iter().enumerate() {
            let row = i * a + j;
            if m != IGNORE {
                cls_weights[row] = weights[i];
            }
            if m < 0 {
                continue;
            }
            let (label, gt_box) = gt[m as usize];
            if label >= num_classes {
                candle_core::bail!(
                    "image {}: label {label} is outside the model's {num_classes} classes",
                    target.image_id
                );
            }
            cls_targets[row * num_classes + label] = 1.0;
            fg_indices.push(row as u32);
            matched_boxes.extend_from_slice(gt_box);
            fg_anchors.extend_from_slice(&anchors[j]);
            box_weights.push(weights[i]);
        }
    }
    let f = fg_indices.len();
    let targets = LossTargets {
        cls_targets: Tensor::from_vec(cls_targets, (n, a, num_classes), device)?,
        cls_weights: Tensor::from_vec(cls_weights, (n, a, 1), device)?,
        fg_indices: Tensor::from_vec(fg_indices, f, device)?,
        matched_boxes: Tensor::from_vec(matched_boxes, (f, 4), device)?,
        fg_anchors: Tensor::from_vec(fg_anchors, (f, 4), device)?,
        box_weights: Tensor::from_vec(box_weights, (f, 1), device)?,
    };
    Ok((targets, MatchSummary { foreground_per_image: fg_per_image }))
}

/// `(label, box)` of the boxes that can be foreground, in target order.
fn non_crowd(target: &Target) -> impl Iterator<Item = (usize, &BoxXyxy)> {
    target.boxes.iter().zip(&target.labels).zip(&target.crowd).filter(|(_, &c)| !c).map(|((b, &l), _)| (l, b))
}

/// One image's anchor assignment (see [`Matcher::assign`]); boxes of no area
/// are left out so they cannot claim anchors.
fn match_image(target: &Target, anchors: &Anchors, matcher: &AnchorMatcher) -> Vec<i64> {
    let (level_sizes, anchors) = (&anchors.level_sizes, &anchors.boxes);
    let gt: Vec<&BoxXyxy> = non_crowd(target).map(|(_, b)| b).collect();
    let usable: Vec<bool> = gt.iter().map(|b| b[2] > b[0] && b[3] > b[1]).collect();
    let mut quality = vec![0f32; gt.len() * anchors.len()];
    for (g, row) in quality.chunks_exact_mut(anchors.len().max(1)).enumerate() {
        if usable[g] {
            for (q, a) in row.iter_mut().zip(anchors) {
                *q = iou(gt[g], a);
            }
        }
    }
    let mut matches = match matcher {
        AnchorMatcher::MaxIou(m) => m.assign(&quality, gt.len(), anchors.len()),
        AnchorMatcher::Atss(m) => m.assign(&quality, &gt, &usable, anchors, level_sizes),
    };
    let crowd: Vec<BoxXyxy> = target.boxes.iter().zip(&target.crowd).filter(|(_, &c)| c).map(|(b, _)| *b).collect();
    ignore_crowd_covered(&mut matches, anchors, &crowd);
    matches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LossNormalizer;

    fn target(boxes: Vec<BoxXyxy>, labels: Vec<usize>, crowd: Vec<bool>) -> Target {
        Target { image_id: 1, boxes, labels, crowd, original_size: (64, 64), resized_size: (64, 64) }
    }

    const MATCHER: AnchorMatcher =
        AnchorMatcher::MaxIou(Matcher { high_threshold: 0.5, low_threshold: 0.4, allow_low_quality_matches: true });

    /// `boxes` as one pyramid level.
    fn one_level(boxes: &[BoxXyxy]) -> Anchors {
        Anchors { boxes: boxes.to_vec(), level_sizes: vec![boxes.len()], grid_sizes: vec![], strides: vec![] }
    }

    #[test]
    fn one_box_one_anchor_and_a_negative_image() {
        let anchors = [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 12.0, 10.0]];
        let batch = [target(vec![[0.0, 0.0, 10.0, 10.0]], vec![1], vec![false]), target(vec![], vec![], vec![])];
        let mut norm = Normalizer::new(LossNormalizer::PerImage);
        let (t, summary) = build_targets(&batch, &one_level(&anchors), 2, &MATCHER, &mut norm, &Device::Cpu).unwrap();
        // Anchor 2 has IoU 10/12 with the box: also foreground.
        assert_eq!(summary.foreground_per_image, vec![2, 0]);
        assert_eq!(t.fg_indices.to_vec1::<u32>().unwrap(), vec![0, 2]);
        let cls = t.cls_targets.to_vec3::<f32>().unwrap();
        assert_eq!(cls[0], vec![vec![0.0, 1.0], vec![0.0, 0.0], vec![0.0, 1.0]]);
        assert!(cls[1].iter().flatten().all(|&v| v == 0.0), "negative image: all background");
        // Per-image normaliser: image 0 has 2 foreground, image 1 none.
        let w = t.cls_weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![0.25, 0.25, 0.25, 0.5, 0.5, 0.5]);
    }

    #[test]
    fn atss_picks_foreground_without_thresholds_and_ignores_nothing() {
        // The box sits between two anchors of IoU 36/92 = 0.39 each: below
        // the max-IoU matcher's 0.4, but at ATSS's mean + std of the two.
        let anchors = [[0.0, 0.0, 8.0, 8.0], [7.0, 0.0, 15.0, 8.0], [40.0, 40.0, 48.0, 48.0]];
        let batch = [target(vec![[3.5, 0.0, 11.5, 8.0]], vec![0], vec![false])];
        let cfg = LossConfig { matcher: MatcherKind::Atss, atss_topk: 2, ..LossConfig::default() };
        let mut norm = Normalizer::new(LossNormalizer::PerImage);
        let matcher = AnchorMatcher::new(&cfg);
        let (t, summary) = build_targets(&batch, &one_level(&anchors), 1, &matcher, &mut norm, &Device::Cpu).unwrap();
        assert_eq!(summary.foreground_per_image, vec![2]);
        assert_eq!(t.fg_indices.to_vec1::<u32>().unwrap(), vec![0, 1]);
        let weights = t.cls_weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(weights.iter().all(|&w| w > 0.0), "ATSS ignores no anchor: {weights:?}");
    }

    #[test]
    fn crowd_boxes_are_never_foreground_and_cover_ignores() {
        let anchors = [[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]];
        let batch = [target(vec![[0.0, 0.0, 10.0, 10.0]], vec![0], vec![true])];
        let mut norm = Normalizer::new(LossNormalizer::PerImage);
        let (t, summary) = build_targets(&batch, &one_level(&anchors), 1, &MATCHER, &mut norm, &Device::Cpu).unwrap();
        assert_eq!(summary.foreground_per_image, vec![0]);
        assert_eq!(t.cls_weights.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.0, 1.0]);
    }
}
