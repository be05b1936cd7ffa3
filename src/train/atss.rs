//! Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap
//! Between Anchor-based and Anchor-free Detection via Adaptive Training
//! Sample Selection", CVPR 2020), with the semantics of mmdetection's
//! `ATSSAssigner(topk=9)`.
//!
//! For each ground-truth box: on every pyramid level, the `topk` anchors
//! whose centres lie closest to the box's centre are candidates; the box's
//! IoU threshold is the mean plus the (unbiased) standard deviation of the
//! candidates' IoUs; a candidate at or above it whose centre lies inside the
//! box is foreground. An anchor claimed by several boxes goes to the one of
//! highest IoU (the first on ties). Every other anchor is background: there
//! is no ignore band, and the threshold adapts to each box's size and shape
//! where a fixed IoU cut leaves small boxes with few or no anchors.

use super::matcher::BACKGROUND;
use crate::ops::boxes::BoxXyxy;

/// An anchor centre must lie this far inside the box (mmdetection's `eps`).
const MIN_INSIDE_DISTANCE: f32 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Atss {
    /// Candidates per pyramid level and box (`loss.atss_topk`).
    pub topk: usize,
}

impl Atss {
    /// Assigns the anchors of one image, with the label semantics of
    /// [`super::matcher::Matcher::assign`] (box index, or [`BACKGROUND`]).
    ///
    /// `iou` is `[gt.len(), anchors.len()]`, row-major; boxes with `usable`
    /// false (no area) claim nothing. `level_sizes` are the anchors per
    /// level, in the order of `anchors` (P3 first).
    pub(super) fn assign(
        &self,
        iou: &[f32],
        gt: &[&BoxXyxy],
        usable: &[bool],
        anchors: &[BoxXyxy],
        level_sizes: &[usize],
    ) -> Vec<i64> {
        let num_anchors = anchors.len();
        assert_eq!(iou.len(), gt.len() * num_anchors, "iou is not [num_gt, num_anchors]");
        assert_eq!(level_sizes.iter().sum::<usize>(), num_anchors, "level sizes do not cover the anchors");
        let centres: Vec<[f32; 2]> = anchors.iter().map(centre).collect();
        // The IoU with the box that currently holds each anchor.
        let mut held_iou = vec![f32::NEG_INFINITY; num_anchors];
        let mut matches = vec![BACKGROUND; num_anchors];
        for (g, gt_box) in gt.iter().enumerate() {
            if !usable[g] {
                continue;
            }
            let row = &iou[g * num_anchors..][..num_anchors];
            let candidates = self.candidates(centre(gt_box), &centres, level_sizes);
            let threshold = mean_plus_std(candidates.iter().map(|&a| row[a]));
            for a in candidates {
                let positive = row[a] >= threshold && inside_distance(&centres[a], gt_box) > MIN_INSIDE_DISTANCE;
                if positive && row[a] > held_iou[a] {
                    held_iou[a] = row[a];
                    matches[a] = g as i64;
                }
            }
        }
        matches
    }

    /// The `topk` anchors of each level nearest to `point` (by centre
    /// distance; the lower index first on ties), as flat anchor indices.
    fn candidates(&self, point: [f32; 2], centres: &[[f32; 2]], level_sizes: &[usize]) -> Vec<usize> {
        let mut candidates = Vec::with_capacity(self.topk * level_sizes.len());
        let mut start = 0;
        for &size in level_sizes {
            let mut level: Vec<(f32, usize)> =
                (start..start + size).map(|a| (squared_distance(&centres[a], &point), a)).collect();
            let k = self.topk.min(size);
            if k > 0 && k < size {
                level.select_nth_unstable_by(k - 1, |x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            }
            candidates.extend(level[..k].iter().map(|&(_, a)| a));
            start += size;
        }
        candidates
    }
}

fn centre(b: &BoxXyxy) -> [f32; 2] {
    [(b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0]
}

fn squared_distance(a: &[f32; 2], b: &[f32; 2]) -> f32 {
    (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)
}

/// How far `point` lies inside `b`: the smallest of its distances to the
/// four sides (negative outside).
fn inside_distance(point: &[f32; 2], b: &BoxXyxy) -> f32 {
    (point[0] - b[0]).min(point[1] - b[1]).min(b[2] - point[0]).min(b[3] - point[1])
}

/// Mean plus the unbiased standard deviation (`torch.std`'s default); the
/// deviation of a single value is taken as 0 (torch gives NaN, and then no
/// anchor would pass).
fn mean_plus_std(values: impl Iterator<Item = f32> + Clone) -> f32 {
    let n = values.clone().count();
    if n == 0 {
        return f32::INFINITY;
    }
    let mean = values.clone().map(f64::from).sum::<f64>() / n as f64;
    let variance =
        if n > 1 { values.map(|v| (f64::from(v) - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
    (mean + variance.sqrt()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::boxes::iou;

    fn iou_matrix(gt: &[&BoxXyxy], anchors: &[BoxXyxy]) -> Vec<f32> {
        gt.iter().flat_map(|g| anchors.iter().map(move |a| iou(g, a))).collect()
    }

    /// A level of 10x10 px anchors on a 4x4 grid of stride 8, and a level of
    /// 20x20 px anchors on a 2x2 grid of stride 16.
    fn two_levels() -> (Vec<BoxXyxy>, Vec<usize>) {
        let mut anchors = Vec::new();
        for (stride, side, cells) in [(8.0, 10.0, 4), (16.0, 20.0, 2)] {
            for y in 0..cells {
                for x in 0..cells {
                    let (cx, cy) = ((x as f32 + 0.5) * stride, (y as f32 + 0.5) * stride);
                    anchors.push([cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0]);
                }
            }
        }
        (anchors, vec![16, 4])
    }

    #[test]
    fn candidates_are_the_nearest_per_level_with_ties_to_the_lower_index() {
        let (anchors, levels) = two_levels();
        let centres: Vec<[f32; 2]> = anchors.iter().map(centre).collect();
        // (8, 8) is equally far from the centres (4, 4), (12, 4), (4, 12) and
        // (12, 12): indices 0, 1, 4, 5 on level 0; on level 1 it is (8, 8)
        // itself, index 16.
        let mut got = Atss { topk: 3 }.candidates([8.0, 8.0], &centres, &levels);
        got.sort();
        assert_eq!(got, vec![0, 1, 4, 16, 17, 18]);
    }

    #[test]
    fn a_small_box_gets_the_anchors_above_its_own_threshold() {
        let (anchors, levels) = two_levels();
        let gt = [0.0, 0.0, 14.0, 14.0];
        let gts = [&gt];
        let iou = iou_matrix(&gts, &anchors);
        let matches = Atss { topk: 3 }.assign(&iou, &gts, &[true], &anchors, &levels);
        let positives: Vec<usize> = (0..anchors.len()).filter(|&a| matches[a] == 0).collect();
        // Candidates: anchors 0, 1, 4 (level 0, IoU 0.377, 0.270, 0.270) and
        // 16, 17, 18 (level 1, IoU 0.49, 0, 0): threshold 0.235 + 0.199 =
        // 0.434, which only anchor 16 (centre (8, 8), inside the box) passes.
        assert_eq!(positives, vec![16]);
        assert!(matches.iter().all(|&m| m == 0 || m == BACKGROUND), "no ignored anchors");
    }

    #[test]
    fn an_anchor_claimed_twice_goes_to_the_higher_iou_and_empty_boxes_claim_nothing() {
        let anchors = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]];
        let (near, far, empty) = ([0.0, 0.0, 10.0, 11.0], [0.0, 0.0, 12.0, 12.0], [5.0, 5.0, 5.0, 5.0]);
        let gts = [&far, &near, &empty];
        let iou = iou_matrix(&gts, &anchors);
        let matches = Atss { topk: 1 }.assign(&iou, &gts, &[true, true, false], &anchors, &[2]);
        assert_eq!(matches, vec![1, BACKGROUND]);
    }

    #[test]
    fn centres_outside_the_box_are_background_however_high_the_iou() {
        // The anchor's centre (5, 5) lies on the box's left edge.
        let anchors = [[0.0, 0.0, 10.0, 10.0]];
        let gt = [5.0, 0.0, 15.0, 10.0];
        let gts = [&gt];
        let matches = Atss { topk: 9 }.assign(&iou_matrix(&gts, &anchors), &gts, &[true], &anchors, &[1]);
        assert_eq!(matches, vec![BACKGROUND]);
    }

    #[test]
    fn threshold_is_mean_plus_unbiased_std() {
        // torch.tensor([0.1, 0.2, 0.6]).mean() + .std() = 0.3 + 0.26458
        let t = mean_plus_std([0.1f32, 0.2, 0.6].into_iter());
        assert!((t - 0.564_575_1).abs() < 1e-6, "{t}");
        assert_eq!(mean_plus_std([0.4f32].into_iter()), 0.4);
    }
}
