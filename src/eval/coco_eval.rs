//! COCO bbox evaluation with pycocotools' semantics: [`evaluate`] runs
//! `evaluate`, `accumulate` and `summarize` in one call; [`read_results`]
//! reads a results file as `loadRes` does.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::accumulate::{accumulate_category, CategoryCurves};
use super::grid::Grid;
use super::image_eval::{evaluate_image, ImageEval};
use super::index::{images_with_boxes, EvalIndex};
use super::params::EvalParams;
use super::results::{parse_results, Detection};
use super::summary::{mean_of, stat_line, stat_specs, stats};
use crate::data::CocoJson;

/// AP of one category, the same slices as stats 0 and 1 restricted to it:
/// IoU .50:.95 / .50, area `all`, maxDets 100; -1 without ground truth.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassAp {
    pub category_id: u64,
    pub name: String,
    pub ap: f64,
    pub ap50: f64,
}

/// Everything pycocotools computes for bbox evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalResult {
    /// The parameters used (max-dets sorted).
    pub params: EvalParams,
    /// `[I]` evaluated image ids, ascending.
    pub image_ids: Vec<u64>,
    /// AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
    pub stats: [f64; 12],
    /// `[K]` per category, ascending by category id.
    pub per_class: Vec<ClassAp>,
    /// `[T, R, K, A, M]` interpolated precision, -1 where a category has no
    /// ground truth in an area range.
    pub precision: Grid<5>,
    /// `[T, K, A, M]` final recall, -1 likewise.
    pub recall: Grid<4>,
}

/// Reads a COCO results file and checks every entry against `gt`.
///
/// An empty list is valid. Any problem (not a list, a missing or mistyped
/// field, a non-finite number, an image id or category id that `gt` lacks)
/// is one error naming the file and the entry index, e.g.
/// `dt.json: entry 17: image_id 999 is not in the ground truth`.
/// Fields other than the four above are ignored, as pycocotools ignores them.
pub fn read_results(path: &Path, gt: &CocoJson) -> Result<Vec<Detection>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let detections = parse_results(&bytes).with_context(|| path.display().to_string())?;
    let index = EvalIndex::new(gt);
    for (i, d) in detections.iter().enumerate() {
        index.detection_key(d).with_context(|| format!("entry {i}")).with_context(|| path.display().to_string())?;
    }
    Ok(detections)
}

/// Evaluates detections against COCO ground truth exactly as pycocotools'
/// `COCOeval(gt, gt.loadRes(dts), 'bbox')` does, over all ground-truth
/// images and categories. Parallel over categories and images.
///
/// Errors: invalid parameters, a repeated annotation id, a detection with
/// a non-finite number or an image or category id the ground truth lacks.
pub fn evaluate(gt: &CocoJson, dts: &[Detection], params: &EvalParams) -> Result<EvalResult> {
    let params = params.validated()?;
    let index = EvalIndex::new(gt);
    let gts = index.ground_truth(gt)?;
    let dts = index.detections(dts)?;
    let curves: Vec<CategoryCurves> = (0..index.categories.len())
        .into_par_iter()
        .map(|k| {
            // Images in id order, as pycocotools concatenates them.
            let evals: Vec<ImageEval> = images_with_boxes(&gts, &dts, k)
                .into_par_iter()
                .filter_map(|(g, d)| evaluate_image(g, d, &params))
                .collect();
            accumulate_category(&evals, &params)
        })
        .collect();
    let (precision, recall) = assemble(&curves, &params);
    let stats = stats(&precision, &recall, &params);
    let specs = stat_specs(&params);
    let per_class = (index.categories.iter().enumerate())
        .map(|(k, (id, name))| ClassAp {
            category_id: *id,
            name: name.clone(),
            ap: mean_of(&specs[0], &precision, &recall, &params, Some(k)),
            ap50: mean_of(&specs[1], &precision, &recall, &params, Some(k)),
        })
        .collect();
    Ok(EvalResult { params, image_ids: index.image_ids, stats, per_class, precision, recall })
}

/// Stacks per-category curves into `precision [T, R, K, A, M]` and
/// `recall [T, K, A, M]`.
fn assemble(curves: &[CategoryCurves], params: &EvalParams) -> (Grid<5>, Grid<4>) {
    let (t_len, r_len) = (params.iou_thresholds.len(), params.recall_thresholds.len());
    let (a_len, m_len, k_len) = (params.area_ranges.len(), params.max_dets.len(), curves.len());
    let mut precision = Grid::filled([t_len, r_len, k_len, a_len, m_len], -1.0);
    let mut recall = Grid::filled([t_len, k_len, a_len, m_len], -1.0);
    for (k, c) in curves.iter().enumerate() {
        for t in 0..t_len {
            for a in 0..a_len {
                for m in 0..m_len {
                    recall.set([t, k, a, m], c.recall[(t * a_len + a) * m_len + m]);
                    for r in 0..r_len {
                        precision.set([t, r, k, a, m], c.precision[((t * r_len + r) * a_len + a) * m_len + m]);
                    }
                }
            }
        }
    }
    (precision, recall)
}

impl EvalResult {
    /// pycocotools' 12 printed summary lines.
    pub fn summary_lines(&self) -> Vec<String> {
        let specs = stat_specs(&self.params);
        specs.iter().zip(self.stats).map(|(spec, value)| stat_line(spec, &self.params, value)).collect()
    }

    /// A per-category table: id, name, AP, AP50 ("-" without ground truth).
    pub fn class_table(&self) -> Vec<String> {
        let width = self.per_class.iter().map(|c| c.name.chars().count()).max().unwrap_or(0).max(8);
        let cell = |v: f64| {
            if v > -1.0 {
                format!("{v:.3}")
            } else {
                "-".to_string()
            }
        };
        let mut lines = vec![format!("{:>11}  {:<width$}  {:>6}  {:>6}", "category_id", "name", "AP", "AP50")];
        lines.extend(
            self.per_class
                .iter()
                .map(|c| format!("{:>11}  {:<width$}  {:>6}  {:>6}", c.category_id, c.name, cell(c.ap), cell(c.ap50))),
        );
        lines
    }
}
