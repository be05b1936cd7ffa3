//! `retinanet inspect`: validates a dataset, decoding every image, and
//! prints what a person needs to know about it (or one JSON object), then
//! exits 1 if it found a problem that would stop or change training.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Result};
use candle_retinanet::config::Config;
use candle_retinanet::data::{load_split, Dataset, LoadedSplit, SplitFiles};
use candle_retinanet::inspect::{self, Coverage, CoverageTable, SplitStats, BUCKETS};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::InspectArgs;

/// Images drawn with `--out`.
const SAMPLES: usize = 16;
/// Below this share of boxes with an IoU >= 0.5 anchor, a hint is printed.
const COVERAGE_HINT: f64 = 0.9;

pub(super) fn run(args: InspectArgs) -> Result<()> {
    let config = Config::resolve(args.config.config.as_deref(), &args.config.overrides)?;
    let LoadedSplit { dataset, files, .. } = load_split(&config.data, &args.split)?;
    let warnings = dataset.report.warnings(&files.annotations);
    let mut problems = inspect::split_problems(&dataset);
    problems.extend(decode_all(&dataset, &files.images));
    let stats = inspect::statistics(&dataset);
    let coverage = inspect::anchor_coverage(&config, &dataset);
    if args.json {
        println!("{}", json_report(&dataset, &files, &stats, &coverage, &warnings, &problems));
    } else {
        println!("annotations: {}", files.annotations.display());
        println!("{}", statistics_table(&dataset, &stats, &files.images));
        println!("{}", coverage_table(&dataset, &coverage));
        print_list("warnings", &warnings);
        print_list("problems", &problems);
    }
    if let Some(out) = &args.out {
        let drawn = match args.augmented {
            true => inspect::draw_augmented_samples(&config, &dataset, &files.images, out, SAMPLES)?,
            false => inspect::draw_samples(&dataset, &files.images, out, SAMPLES)?,
        };
        let what = if args.augmented { "augmented training" } else { "sample" };
        eprintln!("drew {drawn} {what} image(s) into {}", out.display());
    }
    if !problems.is_empty() {
        bail!("{}: {} problem(s) that would stop or change training", files.annotations.display(), problems.len());
    }
    Ok(())
}

/// `name: none`, or `name (N):` and one indented line each.
fn print_list(name: &str, lines: &[String]) {
    if lines.is_empty() {
        println!("{name}: none");
        return;
    }
    println!("{name} ({}):", lines.len());
    for line in lines {
        println!("  {line}");
    }
}

/// The whole report as one JSON object.
fn json_report(
    dataset: &Dataset,
    files: &SplitFiles,
    stats: &SplitStats,
    (sampled, table): &(usize, CoverageTable),
    warnings: &[String],
    problems: &[String],
) -> serde_json::Value {
    let map = &dataset.categories;
    let classes: Vec<serde_json::Value> = (map.categories().iter())
        .map(|category| {
            let label = map.label_of(category.id).expect("every category has a label");
            let [boxes, small, medium, large] = stats.per_class[label];
            let coverage: Vec<serde_json::Value> = (BUCKETS.iter().zip(&table[label]))
                .filter(|(_, c)| c.boxes > 0)
                .map(
                    |(size, c)| json!({"size": size, "boxes": c.boxes, "iou_05": c.share_05(), "iou_04": c.share_04()}),
                )
                .collect();
            json!({"label": label, "category_id": category.id, "name": category.name, "boxes": boxes,
                   "small": small, "medium": medium, "large": large, "anchor_coverage": coverage})
        })
        .collect();
    let per_image = stats.boxes_per_image.map(|(min, mean, max)| json!({"min": min, "mean": mean, "max": max}));
    json!({
        "annotations": files.annotations.display().to_string(),
        "images_dir": files.images.display().to_string(),
        "images": stats.images,
        "empty_images": stats.empty_images,
        "boxes": stats.boxes,
        "crowd_boxes": stats.crowd_boxes,
        "boxes_per_image": per_image,
        "classes": classes,
        "anchor_coverage_images": sampled,
        "warnings": warnings,
        "problems": problems,
    })
}

/// Every image decoded, with a progress bar.
fn decode_all(dataset: &Dataset, images_dir: &Path) -> Vec<String> {
    let bar = ProgressBar::new(dataset.images.len() as u64).with_style(
        ProgressStyle::with_template("decoding {bar:30} {pos}/{len} images {eta}").expect("valid template"),
    );
    let problems = inspect::image_problems(&dataset.images, images_dir, || bar.inc(1));
    bar.finish_and_clear();
    problems
}

/// Counts per class and size bucket, empty images, boxes per image.
fn statistics_table(dataset: &Dataset, stats: &SplitStats, images_dir: &Path) -> String {
    let mut s = String::new();
    let (images, empty) = (stats.images, stats.empty_images);
    let _ = writeln!(s, "images:      {images} ({empty} without boxes) in {}", images_dir.display());
    let _ = writeln!(s, "boxes:       {} ({} crowd)", stats.boxes, stats.crowd_boxes);
    if let Some((min, mean, max)) = stats.boxes_per_image {
        let _ = writeln!(s, "per image:   min {min}, mean {mean:.1}, max {max}");
    }
    let _ = writeln!(s, "{:<6} {:<20} {:>8} {:>8} {:>8} {:>8}", "label", "class", "boxes", "small", "medium", "large");
    let map = &dataset.categories;
    for category in map.categories() {
        let label = map.label_of(category.id).expect("every category has a label");
        let [total, small, medium, large] = stats.per_class[label];
        let _ = writeln!(s, "{label:<6} {:<20} {total:>8} {small:>8} {medium:>8} {large:>8}", category.name);
    }
    s.trim_end().to_string()
}

/// The anchor coverage table, with a hint when anchors miss many boxes.
fn coverage_table(dataset: &Dataset, (sampled, table): &(usize, CoverageTable)) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "anchor coverage: best anchor IoU per box at the evaluation size ({sampled} of {} images)",
        dataset.images.len()
    );
    let _ = writeln!(s, "{:<20} {:<8} {:>8} {:>9} {:>9}", "class", "size", "boxes", "IoU>=0.5", "IoU>=0.4");
    let mut total = Coverage::default();
    let mut weak = Vec::new();
    let map = &dataset.categories;
    for category in map.categories() {
        let label = map.label_of(category.id).expect("every category has a label");
        for (bucket, c) in BUCKETS.iter().zip(&table[label]) {
            if c.boxes == 0 {
                continue;
            }
            let (a, b) = (100.0 * c.share_05(), 100.0 * c.share_04());
            let _ = writeln!(s, "{:<20} {bucket:<8} {:>8} {a:>8.1}% {b:>8.1}%", category.name, c.boxes);
            if *bucket != "all" && c.share_05() < COVERAGE_HINT {
                weak.push(format!("{} {bucket}", category.name));
            }
        }
        total = total.merge(table[label][0]);
    }
    let (a, b) = (100.0 * total.share_05(), 100.0 * total.share_04());
    let _ = write!(s, "{:<20} {:<8} {:>8} {a:>8.1}% {b:>8.1}%", "all", "all", total.boxes);
    if !weak.is_empty() {
        let _ = write!(
            s,
            "\nhint: under {:.0}% of boxes have an anchor with IoU >= 0.5 in: {}. Fit model.anchors.sizes \
             (one per level P3-P7) and model.anchors.ratios (h/w) to these boxes, or change input.min_size.",
            100.0 * COVERAGE_HINT,
            weak.join(", ")
        );
    }
    s
}
