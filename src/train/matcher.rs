//! Anchor-to-ground-truth matching with torchvision's semantics
//! (`_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)`).
//!
//! Label semantics of [`Matcher::assign`]'s output, one entry per anchor:
//! `k >= 0` foreground matched to ground-truth box `k`; [`BACKGROUND`] (-1);
//! [`IGNORE`] (-2, no loss of either kind).

/// Anchor whose best IoU is below the low threshold.
pub(super) const BACKGROUND: i64 = -1;
/// Anchor between the thresholds, or covered by a crowd box.
pub(super) const IGNORE: i64 = -2;

/// An anchor covered at least this much (intersection over anchor area) by a
/// crowd box is ignored rather than background.
pub(super) const CROWD_COVER_IGNORE: f32 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Matcher {
    /// IoU >= this is foreground.
    pub high_threshold: f32,
    /// IoU < this is background; in between is ignored.
    pub low_threshold: f32,
    /// Each ground-truth box also keeps the anchors of its highest IoU, even
    /// below `high_threshold` (ties included).
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// Matches anchors against the non-crowd boxes of one image.
    ///
    /// `iou` is the `[num_gt, num_anchors]` IoU matrix, row-major. An image
    /// without boxes gives all-background. Each anchor's match is the first
    /// box of highest IoU, as `torch.max(dim=0)`.
    pub(super) fn assign(&self, iou: &[f32], num_gt: usize, num_anchors: usize) -> Vec<i64> {
        assert_eq!(iou.len(), num_gt * num_anchors, "iou is not [num_gt, num_anchors]");
        if num_gt == 0 {
            return vec![BACKGROUND; num_anchors];
        }
        let (best_iou, best_gt) = best_per_anchor(iou, num_gt, num_anchors);
        let mut matches: Vec<i64> = best_iou
            .iter()
            .zip(&best_gt)
            .map(|(&v, &g)| {
                if v < self.low_threshold {
                    BACKGROUND
                } else if v < self.high_threshold {
                    IGNORE
                } else {
                    g as i64
                }
            })
            .collect();
        if self.allow_low_quality_matches {
            restore_low_quality_matches(&mut matches, &best_gt, iou, num_anchors);
        }
        matches
    }
}

/// For each anchor, its highest IoU and the first box reaching it.
fn best_per_anchor(iou: &[f32], num_gt: usize, num_anchors: usize) -> (Vec<f32>, Vec<usize>) {
    let mut best_iou = iou[..num_anchors].to_vec();
    let mut best_gt = vec![0usize; num_anchors];
    for g in 1..num_gt {
        let row = &iou[g * num_anchors..][..num_anchors];
        for ((b, bg), &v) in best_iou.iter_mut().zip(best_gt.iter_mut()).zip(row) {
            if v > *b {
                (*b, *bg) = (v, g);
            }
        }
    }
    (best_iou, best_gt)
}

/// torchvision's `set_low_quality_matches_`: every anchor tied at a box's
/// highest IoU gets back its best match. A box that overlaps no anchor at
/// all (highest IoU 0) would "tie" with every anchor; it is skipped.
fn restore_low_quality_matches(matches: &mut [i64], best_gt: &[usize], iou: &[f32], num_anchors: usize) {
    for row in iou.chunks_exact(num_anchors) {
        let highest = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if highest <= 0.0 {
            continue;
        }
        for (a, &v) in row.iter().enumerate() {
            if v == highest {
                matches[a] = best_gt[a] as i64;
            }
        }
    }
}

/// Marks background anchors that crowd boxes cover as ignored.
///
/// `anchors` and `crowd_boxes` are `[x1, y1, x2, y2]`.
pub(super) fn ignore_crowd_covered(matches: &mut [i64], anchors: &[[f32; 4]], crowd_boxes: &[[f32; 4]]) {
    if crowd_boxes.is_empty() {
        return;
    }
    for (m, a) in matches.iter_mut().zip(anchors) {
        if *m != BACKGROUND {
            continue;
        }
        let area = (a[2] - a[0]) * (a[3] - a[1]);
        let covered = crowd_boxes.iter().any(|c| {
            let w = (a[2].min(c[2]) - a[0].max(c[0])).max(0.0);
            let h = (a[3].min(c[3]) - a[1].max(c[1])).max(0.0);
            area > 0.0 && w * h / area >= CROWD_COVER_IGNORE
        });
        if covered {
            *m = IGNORE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TV: Matcher = Matcher { high_threshold: 0.5, low_threshold: 0.4, allow_low_quality_matches: true };

    #[test]
    fn thresholds_split_foreground_ignore_and_background() {
        let strict = Matcher { allow_low_quality_matches: false, ..TV };
        // One box, five anchors.
        let iou = [0.7, 0.5, 0.45, 0.4, 0.39];
        assert_eq!(strict.assign(&iou, 1, 5), vec![0, 0, IGNORE, IGNORE, BACKGROUND]);
    }

    #[test]
    fn low_quality_matches_restore_ties_to_their_best_box() {
        // Box 0 peaks at 0.3 on anchors 0 and 2 (a tie); anchor 2 is box 1's
        // at 0.35, so it goes back to box 1, its own argmax.
        let iou = [
            0.3, 0.1, 0.3, 0.0, //
            0.0, 0.2, 0.35, 0.0,
        ];
        assert_eq!(TV.assign(&iou, 2, 4), vec![0, BACKGROUND, 1, BACKGROUND]);
    }

    #[test]
    fn boxes_touching_no_anchor_do_not_claim_every_anchor() {
        let iou = [0.0, 0.0, 0.0];
        assert_eq!(TV.assign(&iou, 1, 3), vec![BACKGROUND; 3]);
    }

    #[test]
    fn empty_images_are_all_background() {
        assert_eq!(TV.assign(&[], 0, 3), vec![BACKGROUND; 3]);
    }

    #[test]
    fn argmax_ties_take_the_first_box() {
        let iou = [0.6, 0.6];
        assert_eq!(TV.assign(&iou, 2, 1), vec![0]);
    }

    #[test]
    fn crowd_covered_background_is_ignored() {
        let mut matches = vec![BACKGROUND, BACKGROUND, 0];
        let anchors = [[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]];
        ignore_crowd_covered(&mut matches, &anchors, &[[0.0, 0.0, 100.0, 5.0]]);
        assert_eq!(matches, vec![IGNORE, BACKGROUND, 0], "half-covered anchor ignored, foreground untouched");
    }
}
