//! Precision-recall curves, one PNG per category, from the `precision`
//! array of an [`EvalResult`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use plotters::style::register_font;
use rayon::prelude::*;

use super::coco_eval::{ClassAp, EvalResult};

/// DejaVu Sans, registered with plotters as "sans-serif".
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (640, 480);

/// Writes `pr_<category id>_<name>.png` into `dir` for every category with
/// ground truth; returns the paths written. Curves: IoU 0.50, 0.75 and the
/// mean over all thresholds, area `all`, the largest max-dets.
pub fn write_pr_plots(result: &EvalResult, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font_once()?;
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

fn register_font_once() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        bail!("assets/DejaVuSans.ttf is not a valid font")
    }
}

/// `pr_<id>_<name>.png` with the name reduced to letters, digits, `-` and `_`.
fn file_name(class: &ClassAp) -> String {
    let slug: String =
        class.name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    format!("pr_{}_{slug}.png", class.category_id)
}

/// A labelled curve: `(recall, precision)` points.
type Series = (String, Vec<(f64, f64)>);

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

/// Draws into an RGB buffer and saves it as PNG with the `image` crate.
fn draw_pr_plot(path: &Path, class: &ClassAp, series: &[Series]) -> Result<()> {
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_chart(&mut pixels, class, series)?;
    let image = image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels).context("plot buffer has the wrong size")?;
    image.save(path)?;
    Ok(())
}

/// Draws the chart into `pixels`, `[H, W, 3]` RGB bytes of `SIZE`.
fn draw_chart(pixels: &mut [u8], class: &ClassAp, series: &[Series]) -> Result<()> {
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("{} (id {}): AP {:.3}, AP50 {:.3}", class.name, class.category_id, class.ap, class.ap50);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(TRANSPARENT)
        .draw()?;
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];
    for ((label, points), color) in series.iter().zip(colors.iter().cycle()) {
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
