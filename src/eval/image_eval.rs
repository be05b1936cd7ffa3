//! One image and one category: IoUs and greedy matching, exactly as
//! pycocotools' `computeIoU` and `evaluateImg`.

use super::params::EvalParams;

/// A ground-truth box as the evaluator sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct GtBox {
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// The annotation's `area` field (`w * h` when absent).
    pub area: f64,
    /// `iscrowd`: always ignored, may match many detections, IoU over the
    /// detection's area.
    pub crowd: bool,
    /// The annotation id is 0. pycocotools stores the matched ground-truth
    /// id per detection and tests it against 0, so a match to such a box
    /// counts as no match (a false positive) while still using the box up.
    pub id_is_zero: bool,
}

/// A detection as the evaluator sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct DtBox {
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// `w * h`, as `loadRes` sets it.
    pub area: f64,
    pub score: f64,
}

/// What one detection counts as, at one IoU threshold and area range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Matched to an ignored box, or unmatched and outside the area range.
    Ignored,
    TruePositive,
    FalsePositive,
}

/// `evaluateImg` for every area range at once.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ImageEval {
    /// `[D]` detection scores, best first, `D <= max(max_dets)`.
    pub scores: Vec<f64>,
    /// `[A, D, T]` outcome of each detection, row-major.
    pub outcomes: Vec<Outcome>,
    /// `T`, the number of IoU thresholds.
    pub thresholds: usize,
    /// `[A]` ground-truth boxes not ignored in each area range.
    pub not_ignored: Vec<usize>,
}

impl ImageEval {
    /// `[T]` outcomes of detection `d` for area range `a`.
    pub(super) fn outcomes_at(&self, a: usize, d: usize) -> &[Outcome] {
        let start = (a * self.scores.len() + d) * self.thresholds;
        &self.outcomes[start..start + self.thresholds]
    }
}

/// Evaluates one image and category; `None` when it has neither ground
/// truth nor detections (pycocotools' `None` entry). `gts` and `dts` are in
/// file order.
pub(super) fn evaluate_image(gts: &[GtBox], dts: &[DtBox], params: &EvalParams) -> Option<ImageEval> {
    if gts.is_empty() && dts.is_empty() {
        return None;
    }
    let dts = best_first(dts, params.max_det());
    let ious = iou_matrix(&dts, gts);
    let thresholds = params.iou_thresholds.len();
    let per_area = dts.len() * thresholds;
    let mut outcomes = vec![Outcome::Ignored; params.area_ranges.len() * per_area];
    let mut not_ignored = Vec::with_capacity(params.area_ranges.len());
    for (a, range) in params.area_ranges.iter().enumerate() {
        let ignore: Vec<bool> = gts.iter().map(|g| g.crowd || range.excludes(g.area)).collect();
        let order = ignored_last(&ignore);
        not_ignored.push(ignore.iter().filter(|&&ig| !ig).count());
        let dt_outside: Vec<bool> = dts.iter().map(|d| range.excludes(d.area)).collect();
        let matcher = Matcher { gts, ious: &ious, order: &order, ignore: &ignore };
        let out = &mut outcomes[a * per_area..(a + 1) * per_area];
        matcher.match_all(&params.iou_thresholds, &dt_outside, out);
    }
    let scores = dts.iter().map(|d| d.score).collect();
    Some(ImageEval { scores, outcomes, thresholds, not_ignored })
}

/// Detections sorted by score, best first, ties in input order (numpy's
/// mergesort of `-score`), cut to `max_det`.
fn best_first(dts: &[DtBox], max_det: usize) -> Vec<DtBox> {
    let mut sorted = dts.to_vec();
    // partial_cmp keeps 0.0 and -0.0 equal, as numpy compares them; scores
    // are finite (checked by `evaluate`).
    sorted.sort_by(|a, b| b.score.partial_cmp(&a.score).unwrap_or(std::cmp::Ordering::Equal));
    sorted.truncate(max_det);
    sorted
}

/// Indices of the boxes, non-ignored first, input order kept within each group.
fn ignored_last(ignore: &[bool]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..ignore.len()).collect();
    order.sort_by_key(|&g| ignore[g]);
    order
}

/// `[D, G]` row-major IoUs between detections and ground truth.
fn iou_matrix(dts: &[DtBox], gts: &[GtBox]) -> Vec<f64> {
    dts.iter().flat_map(|d| gts.iter().map(move |g| box_iou(&d.bbox, &g.bbox, g.crowd))).collect()
}

/// pycocotools' `bbIou` (maskApi.c) for one pair of `[x, y, w, h]` boxes,
/// same operations in the same order: for a crowd box the union is the
/// detection's area.
pub(super) fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let da = d[2] * d[3];
    let union = if crowd { da } else { da + g[2] * g[3] - i };
    i / union
}

/// Greedy matching of one image, category and area range.
struct Matcher<'a> {
    gts: &'a [GtBox],
    /// `[D, G]` IoUs, ground truth in file order.
    ious: &'a [f64],
    /// Ground-truth indices, non-ignored first.
    order: &'a [usize],
    /// `[G]` ignore flag per ground-truth box, file order.
    ignore: &'a [bool],
}

impl Matcher<'_> {
    /// Fills `out`, `[D, T]`, with each detection's outcome at each IoU
    /// threshold; `dt_outside[d]` says whether detection `d` is outside
    /// the area range.
    fn match_all(&self, thresholds: &[f64], dt_outside: &[bool], out: &mut [Outcome]) {
        let mut taken = vec![false; self.gts.len()];
        for (t, &threshold) in thresholds.iter().enumerate() {
            taken.fill(false);
            for (d, &outside) in dt_outside.iter().enumerate() {
                let best = self.best_match(d, threshold, &taken);
                if let Some(g) = best {
                    taken[g] = true;
                }
                out[d * thresholds.len() + t] = self.outcome(best, outside);
            }
        }
    }

    /// The ground-truth box detection `d` matches, exactly as the loop in
    /// `evaluateImg`: skip boxes already taken unless crowd, stop at the
    /// first ignored box once a regular one matched, and take the box with
    /// the highest IoU >= `t` (a later box wins a tie).
    fn best_match(&self, d: usize, t: f64, taken: &[bool]) -> Option<usize> {
        let row = &self.ious[d * self.gts.len()..(d + 1) * self.gts.len()];
        let mut best_iou = t.min(1.0 - 1e-10);
        let mut best: Option<usize> = None;
        for &g in self.order {
            if taken[g] && !self.gts[g].crowd {
                continue;
            }
            if best.is_some_and(|m| !self.ignore[m]) && self.ignore[g] {
                break;
            }
            if row[g] < best_iou {
                continue;
            }
            best_iou = row[g];
            best = Some(g);
        }
        best
    }

    /// pycocotools: `dtIg = gtIg[m] or (dtm == 0 and outside)`, then
    /// tp = `dtm != 0 and not dtIg`, fp = `dtm == 0 and not dtIg`.
    fn outcome(&self, matched: Option<usize>, outside: bool) -> Outcome {
        let matched_id_nonzero = matched.is_some_and(|g| !self.gts[g].id_is_zero);
        if matched.is_some_and(|g| self.ignore[g]) || (!matched_id_nonzero && outside) {
            Outcome::Ignored
        } else if matched_id_nonzero {
            Outcome::TruePositive
        } else {
            Outcome::FalsePositive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(bbox: [f64; 4], crowd: bool) -> GtBox {
        GtBox { bbox, area: bbox[2] * bbox[3], crowd, id_is_zero: false }
    }

    fn dt(bbox: [f64; 4], score: f64) -> DtBox {
        DtBox { bbox, area: bbox[2] * bbox[3], score }
    }

    #[test]
    fn crowd_iou_divides_by_the_detection_area() {
        let d = [0.0, 0.0, 10.0, 10.0];
        let g = [5.0, 0.0, 100.0, 100.0];
        assert_eq!(box_iou(&d, &g, true), 0.5);
        assert_eq!(box_iou(&d, &g, false), 50.0 / (100.0 + 10000.0 - 50.0));
        assert_eq!(box_iou(&d, &[10.0, 0.0, 5.0, 5.0], false), 0.0, "touching boxes do not overlap");
    }

    #[test]
    fn one_box_matches_once_but_a_crowd_box_absorbs_many() {
        let params = EvalParams { iou_thresholds: vec![0.5], ..Default::default() };
        let dts = [dt([0.0, 0.0, 10.0, 10.0], 0.9), dt([0.0, 0.0, 10.0, 10.0], 0.8)];
        let e = evaluate_image(&[gt([0.0, 0.0, 10.0, 10.0], false)], &dts, &params).unwrap();
        assert_eq!(e.outcomes[..2], [Outcome::TruePositive, Outcome::FalsePositive]);
        let e = evaluate_image(&[gt([0.0, 0.0, 50.0, 50.0], true)], &dts, &params).unwrap();
        assert_eq!(e.outcomes[..2], [Outcome::Ignored, Outcome::Ignored]);
        assert_eq!(e.not_ignored[0], 0);
    }

    #[test]
    fn regular_match_is_preferred_over_a_better_ignored_one() {
        let params = EvalParams { iou_thresholds: vec![0.5], ..Default::default() };
        // The crowd box (file order first) overlaps fully, the regular one at 0.6.
        let gts = [gt([0.0, 0.0, 10.0, 10.0], true), gt([0.0, 0.0, 10.0, 6.0], false)];
        let e = evaluate_image(&gts, &[dt([0.0, 0.0, 10.0, 10.0], 0.5)], &params).unwrap();
        assert_eq!(e.outcomes[0], Outcome::TruePositive);
    }

    #[test]
    fn ties_keep_input_order_and_max_det_cuts() {
        let params = EvalParams { max_dets: vec![2], ..Default::default() };
        let dts = [dt([0.0; 4], 0.5), dt([1.0; 4], 0.7), dt([2.0; 4], 0.5)];
        let sorted = best_first(&dts, params.max_det());
        assert_eq!(sorted, vec![dts[1], dts[0]]);
    }

    #[test]
    fn unmatched_detection_outside_the_area_range_is_ignored() {
        let params = EvalParams { iou_thresholds: vec![0.5], ..Default::default() };
        let e = evaluate_image(&[], &[dt([0.0, 0.0, 100.0, 100.0], 0.5)], &params).unwrap();
        // Area ranges: all, small, medium, large; the box is large.
        let per_area: Vec<Outcome> = (0..4).map(|a| e.outcomes_at(a, 0)[0]).collect();
        use Outcome::*;
        assert_eq!(per_area, [FalsePositive, Ignored, Ignored, FalsePositive]);
    }
}
