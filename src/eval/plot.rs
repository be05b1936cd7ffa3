//! Precision-recall curves, one PNG per category, from the `precision`
//! array of an [`EvalResult`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;

use super::coco_eval::{ClassAp, EvalResult};
use crate::viz::plot::{write_panels, Panel, Series};

const SIZE: (u32, u32) = (640, 480);

/// Writes `pr_<category id>_<name>.png` into `dir` for every category with
/// ground truth; returns the paths written. Curves: IoU 0.50, 0.75 and the
/// mean over all thresholds, area `all`, the largest max-dets.
pub fn write_pr_plots(result: &EvalResult, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    (result.per_class.par_iter().enumerate())
        .filter(|(_, class)| class.ap > -1.0)
        .map(|(k, class)| {
            let path = dir.join(file_name(class));
            draw_pr_plot(&path, class, &pr_series(result, k))
                .with_context(|| format!("cannot draw {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// `pr_<id>_<name>.png` with the name reduced to letters, digits, `-` and `_`.
fn file_name(class: &ClassAp) -> String {
    let slug: String =
        class.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("pr_{}_{slug}.png", class.category_id)
}

/// The curves of category index `k`.
fn pr_series(result: &EvalResult, k: usize) -> Vec<Series> {
    let p = &result.params;
    let a = p.area_ranges.iter().position(|r| r.name == "all").unwrap_or(0);
    let m = p.max_dets.len() - 1;
    let at = |t: usize| -> Vec<f64> {
        (0..p.recall_thresholds.len()).map(|r| result.precision.get([t, r, k, a, m])).collect()
    };
    let points = |values: Vec<f64>| p.recall_thresholds.iter().copied().zip(values).collect();
    let mut series: Vec<Series> = [0.5, 0.75]
        .iter()
        .filter_map(|&x| p.iou_thresholds.iter().position(|&t| t == x))
        .map(|t| (format!("IoU {:.2}", p.iou_thresholds[t]), points(at(t))))
        .collect();
    let t_len = p.iou_thresholds.len();
    let mean: Vec<f64> = (0..p.recall_thresholds.len())
        .map(|r| (0..t_len).map(|t| result.precision.get([t, r, k, a, m])).sum::<f64>() / t_len as f64)
        .collect();
    let first_last = (p.iou_thresholds[0], p.iou_thresholds[t_len - 1]);
    series.push((format!("mean IoU {:.2}:{:.2}", first_last.0, first_last.1), points(mean)));
    series
}

/// One chart per category with the bundled font.
fn draw_pr_plot(path: &Path, class: &ClassAp, series: &[Series]) -> Result<()> {
    let title = format!("{} (id {}): AP {:.3}, AP50 {:.3}", class.name, class.category_id, class.ap, class.ap50);
    let panel = Panel { title, x_desc: "recall".into(), y_desc: "precision".into(), series: series.to_vec() };
    write_panels(path, &[panel], SIZE)
}
