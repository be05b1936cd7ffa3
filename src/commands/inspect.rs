//! `retinanet inspect`: validates a dataset, decoding every image, and
//! prints what a person needs to know about it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use candle_retinanet::config::Config;
use candle_retinanet::data::{load_split, Dataset, LoadedSplit};
use candle_retinanet::inspect::{self, Coverage, SplitStats, BUCKETS};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::InspectArgs;

/// Images drawn with `--out`.
const SAMPLES: usize = 16;
/// Below this share of boxes with an IoU >= 0.5 anchor, a hint is printed.
const COVERAGE_HINT: f64 = 0.9;

pub(super) fn run(args: InspectArgs) -> Result<()> {
    let config = Config::resolve(args.config.config.as_deref(), &args.config.overrides)?;
    let LoadedSplit { dataset, files, .. } = load_split(&config.data, &args.split)?;
    let mut problems = dataset.report.warnings(&files.annotations);
    problems.extend(decode_all(&dataset, &files.images));
    println!("annotations: {}", files.annotations.display());
    println!("{}", statistics_table(&dataset, &inspect::statistics(&dataset), &files.images));
    println!("{}", coverage_table(&config, &dataset));
    if problems.is_empty() {
        println!("problems: none");
    } else {
        println!("problems ({}):", problems.len());
        for p in &problems {
            println!("  {p}");
        }
    }
    if let Some(out) = &args.out {
        let drawn = inspect::draw_samples(&dataset, &files.images, out, SAMPLES)?;
        eprintln!("drew {drawn} sample image(s) into {}", out.display());
    }
    Ok(())
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
fn coverage_table(config: &Config, dataset: &Dataset) -> String {
    let (sampled, table) = inspect::anchor_coverage(config, dataset);
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
