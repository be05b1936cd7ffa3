//! The `eval --json` object and `eval.json` (docs/FORMATS.md):
//! `{"stats": [12 numbers], "per_class": [{"category_id", "name", "ap",
//! "ap50"}...], "images": N, "seconds": S}`.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::coco_eval::{ClassAp, EvalResult};

/// One evaluation as written by `--json` and `eval.json`; -1 marks a
/// number without ground truth to measure against (pycocotools' convention).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport<'a> {
    /// pycocotools order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl.
    pub stats: [f64; 12],
    pub per_class: &'a [ClassAp],
    /// Number of evaluated images.
    pub images: usize,
    /// Wall time of the evaluation as the caller measured it.
    pub seconds: f64,
}

impl<'a> EvalReport<'a> {
    pub fn new(result: &'a EvalResult, seconds: f64) -> Self {
        Self { stats: result.stats, per_class: &result.per_class, images: result.image_ids.len(), seconds }
    }

    /// The object as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers and strings always serialise")
    }
}

/// Writes `result` to `path` (e.g. `runs/x/eval.json`) in the `--json` format.
pub fn write_eval_json(path: &Path, result: &EvalResult, seconds: f64) -> Result<()> {
    let text = EvalReport::new(result, seconds).to_json() + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
