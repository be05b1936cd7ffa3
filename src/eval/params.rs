//! Evaluation parameters with pycocotools' `Params.setDetParams` defaults.

use anyhow::{bail, Result};

/// COCO's object sizes: small below 32² square pixels, large above 96².
pub(crate) const SMALL_AREA: f64 = 32.0 * 32.0;
pub(crate) const LARGE_AREA: f64 = 96.0 * 96.0;

/// A named object-area range; a box is inside when `lo <= area <= hi`.
#[derive(Debug, Clone, PartialEq)]
pub struct AreaRange {
    /// Label used by the summary (`all`, `small`, `medium`, `large`).
    pub name: String,
    pub lo: f64,
    pub hi: f64,
}

impl AreaRange {
    pub fn new(name: &str, lo: f64, hi: f64) -> Self {
        Self { name: name.to_string(), lo, hi }
    }

    /// True when `area` lies outside `[lo, hi]` (pycocotools' ignore test).
    pub fn excludes(&self, area: f64) -> bool {
        area < self.lo || area > self.hi
    }
}

/// What pycocotools' `Params` lets a user change for bbox evaluation.
///
/// The 12-number summary follows pycocotools' `summarize`, which assumes
/// the defaults: AP uses `maxDets == 100` literally, the other stats use
/// `max_dets[0..3]`, and areas are looked up by the names `all`, `small`,
/// `medium`, `large`. A stat whose IoU threshold (0.5, 0.75), area name or
/// max-dets entry is missing is -1 (where pycocotools would crash on
/// fewer than three max-dets, or also print -1).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalParams {
    /// `[T]` IoU thresholds, default `np.linspace(.5, .95, 10)`.
    pub iou_thresholds: Vec<f64>,
    /// `[R]` recall points, default `np.linspace(0, 1, 101)`.
    pub recall_thresholds: Vec<f64>,
    /// `[M]` detections kept per image, sorted ascending (as `evaluate` sorts them).
    pub max_dets: Vec<usize>,
    /// `[A]` area ranges.
    pub area_ranges: Vec<AreaRange>,
}

impl Default for EvalParams {
    fn default() -> Self {
        Self {
            iou_thresholds: linspace(0.5, 0.95, 10),
            recall_thresholds: linspace(0.0, 1.0, 101),
            max_dets: vec![1, 10, 100],
            area_ranges: vec![
                AreaRange::new("all", 0.0, 1e10),
                AreaRange::new("small", 0.0, SMALL_AREA),
                AreaRange::new("medium", SMALL_AREA, LARGE_AREA),
                AreaRange::new("large", LARGE_AREA, 1e10),
            ],
        }
    }
}

impl EvalParams {
    /// Checks the parameters and sorts `max_dets` ascending, as
    /// pycocotools' `evaluate` does. Duplicate max-dets or area names are
    /// rejected (pycocotools' summary indexing is ill-defined for them).
    pub fn validated(&self) -> Result<Self> {
        let mut params = self.clone();
        params.max_dets.sort_unstable();
        if params.iou_thresholds.is_empty() || params.recall_thresholds.is_empty() {
            bail!("evaluation parameters: IoU and recall thresholds must not be empty");
        }
        if params.max_dets.is_empty() || params.max_dets.windows(2).any(|w| w[0] == w[1]) {
            bail!("evaluation parameters: max_dets must be non-empty and distinct, got {:?}", self.max_dets);
        }
        if params.area_ranges.is_empty() {
            bail!("evaluation parameters: area_ranges must not be empty");
        }
        for (i, a) in params.area_ranges.iter().enumerate() {
            if params.area_ranges[..i].iter().any(|b| b.name == a.name) {
                bail!("evaluation parameters: duplicate area range name {:?}", a.name);
            }
        }
        let all = params.iou_thresholds.iter().chain(&params.recall_thresholds);
        if all.clone().any(|v| !v.is_finite()) {
            bail!("evaluation parameters: thresholds must be finite");
        }
        Ok(params)
    }

    /// The largest max-dets: detections per image and category kept at all.
    pub fn max_det(&self) -> usize {
        self.max_dets.iter().copied().max().unwrap_or(0)
    }
}

/// `np.linspace(start, stop, num)` bit for bit: `i * step + start` with
/// `step = (stop - start) / (num - 1)`, and the last value set to `stop`.
pub(super) fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_thresholds_match_numpy_bits() {
        // From numpy 2.4: [float(x).hex() for x in np.linspace(.5, .95, 10)].
        let numpy = [
            "0x1.0000000000000p-1",
            "0x1.199999999999ap-1",
            "0x1.3333333333333p-1",
            "0x1.4cccccccccccdp-1",
            "0x1.6666666666666p-1",
            "0x1.8000000000000p-1",
            "0x1.999999999999ap-1",
            "0x1.b333333333333p-1",
            "0x1.cccccccccccccp-1",
            "0x1.e666666666666p-1",
        ];
        let ours = EvalParams::default().iou_thresholds;
        for (v, hex) in ours.iter().zip(numpy) {
            assert_eq!(*v, parse_hex(hex), "{hex}");
        }
        assert_eq!(ours[5], 0.75, "summary looks 0.75 up by equality");
    }

    #[test]
    fn recall_thresholds_are_i_times_a_hundredth() {
        let r = EvalParams::default().recall_thresholds;
        assert_eq!(r.len(), 101);
        assert_eq!(r[35], 35.0 * 0.01);
        assert_ne!(r[35], 0.35, "numpy's value is 0.35000000000000003");
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn validation_sorts_and_rejects_duplicates() {
        let p = EvalParams { max_dets: vec![100, 1, 10], ..Default::default() };
        assert_eq!(p.validated().unwrap().max_dets, vec![1, 10, 100]);
        let p = EvalParams { max_dets: vec![10, 10], ..Default::default() };
        assert!(p.validated().is_err());
    }

    /// Parses `0x1.<13 hex digits>p<exp>` as printed by Python's float.hex.
    fn parse_hex(s: &str) -> f64 {
        let (mantissa, exp) = s.trim_start_matches("0x1.").split_once('p').unwrap();
        let m = u64::from_str_radix(mantissa, 16).unwrap();
        let e: i32 = exp.parse().unwrap();
        (1.0 + m as f64 / (1u64 << 52) as f64) * 2f64.powi(e)
    }
}
