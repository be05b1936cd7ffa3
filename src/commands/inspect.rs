//! `retinanet inspect`: validates a dataset, decoding every image, and
//! prints what a person needs to know about it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::cli::InspectArgs;
use crate::config::Config;
use crate::data::coco::{Dataset, ImageEntry};
use crate::data::image_io::load_rgb;
use crate::data::source::{load_split, LoadedSplit};
use crate::data::transforms::Transform;
use crate::model::coverage::{anchor_coverage, area_bucket, Coverage, BUCKETS};
use crate::viz::draw::{class_colour, draw_labeled_box};

/// Images drawn with `--out`.
const SAMPLES: usize = 16;

pub fn run(args: InspectArgs) -> Result<()> {
    let config = Config::resolve(args.config.config.as_deref(), &args.config.overrides)?;
    let LoadedSplit { dataset, files, .. } = load_split(&config.data, &args.split)?;
    let mut problems = dataset.report.warnings(&files.annotations);
    problems.extend(check_images(&dataset.images, &files.images));
    println!("{}", statistics(&dataset, &files.annotations, &files.images));
    println!("{}", coverage_report(&config, &dataset));
    if problems.is_empty() {
        println!("problems: none");
    } else {
        println!("problems ({}):", problems.len());
        for p in &problems {
            println!("  {p}");
        }
    }
    if let Some(out) = &args.out {
        draw_samples(&dataset, &files.images, out)?;
        eprintln!("drew {} sample image(s) into {}", SAMPLES.min(dataset.images.len()), out.display());
    }
    Ok(())
}

/// Counts per class and size bucket, empty images, boxes per image.
pub fn statistics(dataset: &Dataset, annotations: &Path, images_dir: &Path) -> String {
    let map = &dataset.categories;
    let labels = map.num_labels();
    let mut per_class = vec![[0usize; 4]; labels]; // total, small, medium, large
    let mut crowd = 0;
    for image in &dataset.images {
        for ((b, &label), &is_crowd) in image.boxes.iter().zip(&image.labels).zip(&image.crowd) {
            let area = (b[2] - b[0]) * (b[3] - b[1]);
            let bucket = area_bucket(area);
            per_class[label][0] += 1;
            per_class[label][bucket] += 1;
            crowd += usize::from(is_crowd);
        }
    }
    let boxes: usize = per_class.iter().map(|c| c[0]).sum();
    let per_image: Vec<usize> = dataset.images.iter().map(|im| im.boxes.len()).collect();
    let empty = per_image.iter().filter(|&&n| n == 0).count();
    let mut s = String::new();
    let _ = writeln!(s, "annotations: {}", annotations.display());
    let _ = writeln!(s, "images:      {} ({} without boxes) in {}", dataset.images.len(), empty, images_dir.display());
    let _ = writeln!(s, "boxes:       {boxes} ({crowd} crowd)");
    if let (Some(min), Some(max)) = (per_image.iter().min(), per_image.iter().max()) {
        let mean = boxes as f64 / per_image.len() as f64;
        let _ = writeln!(s, "per image:   min {min}, mean {mean:.1}, max {max}");
    }
    let _ = writeln!(s, "{:<6} {:<20} {:>8} {:>8} {:>8} {:>8}", "label", "class", "boxes", "small", "medium", "large");
    for category in map.categories() {
        let label = map.label_of(category.id).expect("every category has a label");
        let [total, small, medium, large] = per_class[label];
        let _ = writeln!(s, "{label:<6} {:<20} {total:>8} {small:>8} {medium:>8} {large:>8}", category.name);
    }
    s.trim_end().to_string()
}

/// Images the coverage check looks at, evenly spread over the split.
const COVERAGE_IMAGES: usize = 2000;
/// Below this share of boxes with an IoU >= 0.5 anchor, a hint is printed.
const COVERAGE_HINT: f64 = 0.9;

/// The anchor coverage table (see [`anchor_coverage`]), with a hint when
/// anchors miss many boxes.
fn coverage_report(config: &Config, dataset: &Dataset) -> String {
    let step = dataset.images.len().div_ceil(COVERAGE_IMAGES).max(1);
    let sample: Vec<ImageEntry> = dataset.images.iter().step_by(step).cloned().collect();
    let transform = Transform::new(&config.input);
    let map = &dataset.categories;
    let table = anchor_coverage(&sample, &transform, &config.model.anchors, map.num_labels());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "anchor coverage: best anchor IoU per box at the evaluation size ({} of {} images)",
        sample.len(),
        dataset.images.len()
    );
    let _ = writeln!(s, "{:<20} {:<8} {:>8} {:>9} {:>9}", "class", "size", "boxes", "IoU>=0.5", "IoU>=0.4");
    let mut total = Coverage::default();
    let mut weak = Vec::new();
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
    let _ = write!(
        s,
        "{:<20} {:<8} {:>8} {:>8.1}% {:>8.1}%",
        "all",
        "all",
        total.boxes,
        100.0 * total.share_05(),
        100.0 * total.share_04()
    );
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

/// Decodes every image in parallel; one problem line per unreadable image
/// or size that disagrees with the annotations.
fn check_images(images: &[ImageEntry], dir: &Path) -> Vec<String> {
    let bar = ProgressBar::new(images.len() as u64).with_style(
        ProgressStyle::with_template("decoding {bar:30} {pos}/{len} images {eta}").expect("valid template"),
    );
    let mut problems: Vec<(usize, String)> = images
        .par_iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let result = image_problem(entry, dir);
            bar.inc(1);
            result.map(|p| (i, p))
        })
        .collect();
    bar.finish_and_clear();
    problems.sort();
    problems.into_iter().map(|(_, p)| p).collect()
}

fn image_problem(entry: &ImageEntry, dir: &Path) -> Option<String> {
    match load_rgb(&dir.join(&entry.file_name)) {
        Err(err) => Some(format!("{err:#}")),
        Ok(image) if (image.width(), image.height()) != (entry.width, entry.height) => Some(format!(
            "{}: image is {}x{} but the annotations say {}x{} (image id {})",
            dir.join(&entry.file_name).display(),
            image.width(),
            image.height(),
            entry.width,
            entry.height,
            entry.id
        )),
        Ok(_) => None,
    }
}

/// Draws up to [`SAMPLES`] images, evenly spread over the split, with their
/// boxes and class names.
fn draw_samples(dataset: &Dataset, images_dir: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let n = dataset.images.len();
    let step = n.div_ceil(SAMPLES).max(1);
    for entry in dataset.images.iter().step_by(step) {
        let Ok(mut image) = load_rgb(&images_dir.join(&entry.file_name)) else {
            continue;
        };
        for ((b, &label), &crowd) in entry.boxes.iter().zip(&entry.labels).zip(&entry.crowd) {
            let name = dataset.categories.name_of(label);
            let caption = if crowd { format!("{name} (crowd)") } else { name };
            draw_labeled_box(&mut image, *b, &caption, class_colour(label));
        }
        let stem = Path::new(&entry.file_name)
            .file_stem()
            .map_or_else(|| entry.id.to_string(), |s| s.to_string_lossy().into_owned());
        let path = out.join(format!("{stem}.jpg"));
        image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
