//! Per-category accumulation of per-image results into precision and
//! recall, exactly as pycocotools' `accumulate`.

use super::image_eval::{ImageEval, Outcome};
use super::params::EvalParams;

/// `np.spacing(1)`: the gap between 1.0 and the next double.
const EPS: f64 = f64::EPSILON;

/// One category's curves; -1 where the category has no ground truth in
/// that area range (or no image with boxes at all).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct CategoryCurves {
    /// `[T, R, A, M]` interpolated precision at each recall threshold.
    pub precision: Vec<f64>,
    /// `[T, A, M]` final recall.
    pub recall: Vec<f64>,
}

/// Accumulates one category. `evals` are the non-empty image results in
/// image-id order (pycocotools' `E`).
pub(super) fn accumulate_category(evals: &[ImageEval], params: &EvalParams) -> CategoryCurves {
    let (t_len, r_len) = (params.iou_thresholds.len(), params.recall_thresholds.len());
    let (a_len, m_len) = (params.area_ranges.len(), params.max_dets.len());
    let mut curves = CategoryCurves {
        precision: vec![-1.0; t_len * r_len * a_len * m_len],
        recall: vec![-1.0; t_len * a_len * m_len],
    };
    let ranked = rank_detections(evals);
    for a in 0..a_len {
        let npig: usize = evals.iter().map(|e| e.not_ignored[a]).sum();
        if npig == 0 {
            continue;
        }
        // [N, T] outcomes in ranked order, gathered once per area range.
        let table: Vec<Outcome> =
            (ranked.iter()).flat_map(|&(e, d)| evals[e as usize].outcomes_at(a, d as usize)).copied().collect();
        for (m, &max_det) in params.max_dets.iter().enumerate() {
            let kept: Vec<usize> = (0..ranked.len()).filter(|&n| (ranked[n].1 as usize) < max_det).collect();
            for t in 0..t_len {
                let outcomes = kept.iter().map(|&n| table[n * t_len + t]);
                let (recall, precision) = curve(outcomes, npig, &params.recall_thresholds);
                curves.recall[(t * a_len + a) * m_len + m] = recall;
                for (r, p) in precision.into_iter().enumerate() {
                    curves.precision[((t * r_len + r) * a_len + a) * m_len + m] = p;
                }
            }
        }
    }
    curves
}

/// `(image, detection)` pairs of all images concatenated in image order,
/// then sorted by score, best first, ties in concatenation order (numpy's
/// mergesort of `-dtScores`). Restricting this order to the first `maxDet`
/// detections per image gives the order pycocotools sorts for `maxDet`.
fn rank_detections(evals: &[ImageEval]) -> Vec<(u32, u32)> {
    let mut ranked: Vec<(f64, u32, u32)> = evals
        .iter()
        .enumerate()
        .flat_map(|(e, ev)| ev.scores.iter().enumerate().map(move |(d, &s)| (s, e as u32, d as u32)))
        .collect();
    ranked.sort_by(|x, y| y.0.partial_cmp(&x.0).unwrap_or(std::cmp::Ordering::Equal));
    ranked.into_iter().map(|(_, e, d)| (e, d)).collect()
}

/// For outcomes in ranked order: the final recall (0 without detections)
/// and `[R]` precision sampled at the recall thresholds, equal bit for bit
/// to pycocotools' arrays: `rc = tp / npig`, `pr = tp / (fp + tp + eps)`
/// over cumulative counts, precision made non-increasing from the right,
/// `q = pr[searchsorted(rc, recThrs, 'left')]`, and 0 from the first
/// threshold past the last detection on.
///
/// Only true positives raise `pr` (a false positive lowers it, an ignored
/// detection repeats it), so the right-to-left maximum at any position is
/// the maximum over the true positives from there on, and the first
/// position with `rc >= r` is that of the k-th true positive, k the least
/// count with `k / npig >= r`. That needs `pr` at true positives only.
fn curve(outcomes: impl Iterator<Item = Outcome>, npig: usize, rec_thrs: &[f64]) -> (f64, Vec<f64>) {
    let (mut tp, mut fp, mut detections) = (0usize, 0usize, 0usize);
    // pr at the 1st, 2nd, ... true positive.
    let mut tp_precision = Vec::new();
    for outcome in outcomes {
        detections += 1;
        match outcome {
            Outcome::TruePositive => {
                tp += 1;
                tp_precision.push(tp as f64 / (fp as f64 + tp as f64 + EPS));
            }
            Outcome::FalsePositive => fp += 1,
            Outcome::Ignored => {}
        }
    }
    let recall = if detections == 0 { 0.0 } else { tp as f64 / npig as f64 };
    for i in (1..tp_precision.len()).rev() {
        if tp_precision[i] > tp_precision[i - 1] {
            tp_precision[i - 1] = tp_precision[i];
        }
    }
    let mut q = vec![0.0; rec_thrs.len()];
    for (ri, &r) in rec_thrs.iter().enumerate() {
        match least_count_reaching(r, npig) {
            Some(0) if detections > 0 => q[ri] = tp_precision.first().copied().unwrap_or(0.0),
            Some(k) if k > 0 && k <= tp => q[ri] = tp_precision[k - 1],
            _ => break,
        }
    }
    (recall, q)
}

/// The least count `k` with `k as f64 / npig as f64 >= r`, `None` when even
/// `npig` falls short (`r > 1`).
fn least_count_reaching(r: f64, npig: usize) -> Option<usize> {
    if r > 1.0 {
        return None;
    }
    let n = npig as f64;
    let reaches = |k: usize| k as f64 / n >= r;
    let mut k = (r * n).floor().clamp(0.0, n) as usize;
    while k > 0 && reaches(k - 1) {
        k -= 1;
    }
    while !reaches(k) {
        k += 1;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn precision_is_interpolated_from_the_right() {
        // tp, fp, tp with 2 ground-truth boxes: rc = .5 .5 1, pr = 1 .5 .667.
        let (recall, q) = curve([TruePositive, FalsePositive, TruePositive].into_iter(), 2, &[0.0, 0.5, 0.6, 1.0]);
        assert_eq!(recall, 1.0);
        let two_thirds = 2.0 / (3.0 + EPS);
        assert_eq!(q, vec![1.0 / (1.0 + EPS), 1.0 / (1.0 + EPS), two_thirds, two_thirds]);
    }

    #[test]
    fn thresholds_past_the_last_recall_get_zero() {
        let (recall, q) = curve([FalsePositive, TruePositive].into_iter(), 4, &[0.0, 0.25, 0.26]);
        assert_eq!(recall, 0.25);
        // pr = [0, 1 / (2 + eps)], made non-increasing from the right.
        let half = 1.0 / (2.0 + EPS);
        assert_eq!(q, vec![half, half, 0.0]);
        let (recall, q) = curve(std::iter::empty(), 4, &[0.0, 0.5]);
        assert_eq!((recall, q), (0.0, vec![0.0, 0.0]));
    }

    /// The curve as pycocotools writes it, over every position.
    fn numpy_curve(outcomes: &[Outcome], npig: usize, rec_thrs: &[f64]) -> (f64, Vec<f64>) {
        let (mut tp, mut fp) = (0.0f64, 0.0f64);
        let (mut rc, mut pr) = (Vec::new(), Vec::new());
        for o in outcomes {
            match o {
                TruePositive => tp += 1.0,
                FalsePositive => fp += 1.0,
                Ignored => {}
            }
            rc.push(tp / npig as f64);
            pr.push(tp / (fp + tp + EPS));
        }
        for i in (1..pr.len()).rev() {
            if pr[i] > pr[i - 1] {
                pr[i - 1] = pr[i];
            }
        }
        let mut q = vec![0.0; rec_thrs.len()];
        for (ri, &r) in rec_thrs.iter().enumerate() {
            let pi = rc.partition_point(|&x| x < r);
            if pi >= pr.len() {
                break;
            }
            q[ri] = pr[pi];
        }
        (rc.last().copied().unwrap_or(0.0), q)
    }

    #[test]
    fn true_positive_shortcut_equals_the_full_arrays() {
        let rec_thrs = crate::eval::params::linspace(0.0, 1.0, 101);
        let mut state = 12345u64;
        for case in 0..500 {
            let len = case % 40;
            let outcomes: Vec<Outcome> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    [TruePositive, FalsePositive, Ignored][(state >> 33) as usize % 3]
                })
                .collect();
            let tps = outcomes.iter().filter(|&&o| o == TruePositive).count();
            for npig in [tps.max(1), tps + 1, tps + 7, 3 * tps + 13] {
                let ours = curve(outcomes.iter().copied(), npig, &rec_thrs);
                assert_eq!(ours, numpy_curve(&outcomes, npig, &rec_thrs), "{outcomes:?} npig {npig}");
            }
        }
    }

    #[test]
    fn ranking_is_stable_across_images() {
        let eval = |scores: Vec<f64>| ImageEval { scores, outcomes: vec![], thresholds: 1, not_ignored: vec![] };
        let ranked = rank_detections(&[eval(vec![0.9, 0.5]), eval(vec![0.9, 0.7])]);
        assert_eq!(ranked, vec![(0, 0), (1, 0), (1, 1), (0, 1)]);
    }
}
