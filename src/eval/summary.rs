//! pycocotools' `summarize`: the 12 numbers, their text lines, and the
//! same slices restricted to one category.

use super::grid::Grid;
use super::params::EvalParams;

/// Which slice of precision or recall one summary number averages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct StatSpec {
    /// Average precision (over `precision`) or recall (over `recall`).
    pub ap: bool,
    /// One IoU threshold (looked up by equality), or all of them.
    pub iou: Option<f64>,
    /// Area range name.
    pub area: &'static str,
    /// Max-dets value, `None` when the parameters have too few entries.
    pub max_dets: Option<usize>,
}

/// The 12 slices of `_summarizeDets`, in order: AP, AP50, AP75, APs, APm,
/// APl, AR1, AR10, AR100, ARs, ARm, ARl. The first uses maxDets 100
/// literally; the others `max_dets[0..3]`.
pub(super) fn stat_specs(params: &EvalParams) -> [StatSpec; 12] {
    let md = |i: usize| params.max_dets.get(i).copied();
    let spec = |ap, iou, area, max_dets| StatSpec { ap, iou, area, max_dets };
    [
        spec(true, None, "all", Some(100)),
        spec(true, Some(0.5), "all", md(2)),
        spec(true, Some(0.75), "all", md(2)),
        spec(true, None, "small", md(2)),
        spec(true, None, "medium", md(2)),
        spec(true, None, "large", md(2)),
        spec(false, None, "all", md(0)),
        spec(false, None, "all", md(1)),
        spec(false, None, "all", md(2)),
        spec(false, None, "small", md(2)),
        spec(false, None, "medium", md(2)),
        spec(false, None, "large", md(2)),
    ]
}

/// Mean of the entries > -1 in the slice `spec` selects (for one category
/// index when `category` is set), or -1 when there are none. The sum is
/// numpy's pairwise sum over the entries in C order, as `np.mean` does.
pub(super) fn mean_of(
    spec: &StatSpec,
    precision: &Grid<5>,
    recall: &Grid<4>,
    params: &EvalParams,
    category: Option<usize>,
) -> f64 {
    let a = params.area_ranges.iter().position(|r| r.name == spec.area);
    let m = spec.max_dets.and_then(|md| params.max_dets.iter().position(|&v| v == md));
    let (Some(a), Some(m)) = (a, m) else {
        return -1.0;
    };
    let thresholds: Vec<usize> =
        (0..params.iou_thresholds.len()).filter(|&t| spec.iou.is_none_or(|x| params.iou_thresholds[t] == x)).collect();
    let categories = match category {
        Some(k) => k..k + 1,
        None => 0..precision.shape[2],
    };
    let mut values = Vec::new();
    for &t in &thresholds {
        if spec.ap {
            for r in 0..precision.shape[1] {
                values.extend(categories.clone().map(|k| precision.get([t, r, k, a, m])));
            }
        } else {
            values.extend(categories.clone().map(|k| recall.get([t, k, a, m])));
        }
    }
    values.retain(|&v| v > -1.0);
    if values.is_empty() {
        -1.0
    } else {
        numpy_sum(&values) / values.len() as f64
    }
}

/// The 12 summary numbers.
pub(super) fn stats(precision: &Grid<5>, recall: &Grid<4>, params: &EvalParams) -> [f64; 12] {
    stat_specs(params).map(|spec| mean_of(&spec, precision, recall, params, None))
}

/// pycocotools' printed line for one stat, e.g.
/// ` Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.123`.
pub(super) fn stat_line(spec: &StatSpec, params: &EvalParams, value: f64) -> String {
    let (title, kind) = if spec.ap { ("Average Precision", "(AP)") } else { ("Average Recall", "(AR)") };
    let iou = match spec.iou {
        Some(x) => format!("{x:.2}"),
        None => {
            let t = &params.iou_thresholds;
            format!("{:.2}:{:.2}", t[0], t[t.len() - 1])
        }
    };
    let max_dets = spec.max_dets.map_or_else(|| "-".to_string(), |m| m.to_string());
    format!(" {title:<18} {kind} @[ IoU={iou:<9} | area={:>6} | maxDets={max_dets:>3} ] = {value:.3}", spec.area)
}

/// numpy's pairwise summation for float64 (`pairwise_sum_DOUBLE`): plain
/// below 8 values, 8 interleaved accumulators up to 128, halves above.
pub(super) fn numpy_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        values.iter().fold(0.0, |acc, &v| acc + v)
    } else if n <= 128 {
        let mut r: [f64; 8] = values[..8].try_into().expect("8 values");
        let whole = n - n % 8;
        for chunk in values[8..whole].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(chunk) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &values[whole..] {
            res += v;
        }
        res
    } else {
        let half = n / 2;
        let half = half - half % 8;
        numpy_sum(&values[..half]) + numpy_sum(&values[half..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_match_pycocotools_text() {
        let params = EvalParams::default();
        let specs = stat_specs(&params);
        assert_eq!(
            stat_line(&specs[0], &params, 0.1234),
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.123"
        );
        assert_eq!(
            stat_line(&specs[1], &params, -1.0),
            " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = -1.000"
        );
        assert_eq!(
            stat_line(&specs[6], &params, 0.5),
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.500"
        );
        assert_eq!(
            stat_line(&specs[9], &params, 0.0625),
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ] = 0.062"
        );
    }

    #[test]
    fn pairwise_sum_matches_numpy_on_awkward_lengths() {
        // Exact sums of small integers are order-independent.
        for n in [0, 1, 7, 8, 9, 127, 128, 129, 1000, 80800] {
            let v: Vec<f64> = (0..n).map(|i| (i % 13) as f64).collect();
            assert_eq!(numpy_sum(&v), v.iter().sum::<f64>(), "n = {n}");
        }
        // np.sum([0.1] * 10) == 1.0 (pairwise), while a plain loop gives 0.9999999999999999.
        assert_eq!(numpy_sum(&[0.1; 10]), 1.0);
    }
}
