//! Dataset checks for `retinanet inspect`: counts per class and COCO size
//! bucket, images that do not decode or whose size disagrees with the
//! annotations, the anchor coverage of the boxes, and sample drawings.

mod coverage;

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;

pub use coverage::{Coverage, CoverageTable, BUCKETS};

use crate::config::Config;
use crate::data::{load_rgb, Dataset, ImageEntry, Loader, LoaderOptions, Transform};
use crate::viz::draw::{class_colour, draw_labeled_box};

/// What a split holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitStats {
    pub images: usize,
    /// Images without any box (negatives).
    pub empty_images: usize,
    pub boxes: usize,
    pub crowd_boxes: usize,
    /// Boxes per image: (min, mean, max); `None` for a split of no image.
    pub boxes_per_image: Option<(usize, f64, usize)>,
    /// `[label][bucket]` box counts, buckets as [`BUCKETS`].
    pub per_class: Vec<[usize; 4]>,
}

/// Counts boxes per class and COCO size bucket (on the original box).
pub fn statistics(dataset: &Dataset) -> SplitStats {
    let mut per_class = vec![[0usize; 4]; dataset.categories.num_labels()];
    let mut crowd_boxes = 0;
    for image in &dataset.images {
        for ((b, &label), &crowd) in image.boxes.iter().zip(&image.labels).zip(&image.crowd) {
            let bucket = coverage::area_bucket((b[2] - b[0]) * (b[3] - b[1]));
            per_class[label][0] += 1;
            per_class[label][bucket] += 1;
            crowd_boxes += usize::from(crowd);
        }
    }
    let per_image: Vec<usize> = dataset.images.iter().map(|im| im.boxes.len()).collect();
    let boxes: usize = per_image.iter().sum();
    let boxes_per_image = match (per_image.iter().min(), per_image.iter().max()) {
        (Some(&min), Some(&max)) => Some((min, boxes as f64 / per_image.len() as f64, max)),
        _ => None,
    };
    SplitStats {
        images: dataset.images.len(),
        empty_images: per_image.iter().filter(|&&n| n == 0).count(),
        boxes,
        crowd_boxes,
        boxes_per_image,
        per_class,
    }
}

/// What stops or changes training besides unreadable images: a split
/// without images, or without a box to learn from.
pub fn split_problems(dataset: &Dataset) -> Vec<String> {
    if dataset.images.is_empty() {
        return vec!["the split has no images".into()];
    }
    if !dataset.has_boxes_to_learn() {
        let n = dataset.images.len();
        return vec![format!("none of the {n} images has a box to learn from (crowd boxes do not count)")];
    }
    Vec::new()
}

/// Decodes every image in parallel; one problem line per unreadable image
/// or size that disagrees with the annotations, in dataset order.
/// `on_image` is called after each image (for a progress bar).
pub fn image_problems(images: &[ImageEntry], dir: &Path, on_image: impl Fn() + Sync) -> Vec<String> {
    let mut problems: Vec<(usize, String)> = images
        .par_iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let problem = image_problem(entry, dir);
            on_image();
            problem.map(|p| (i, p))
        })
        .collect();
    problems.sort();
    problems.into_iter().map(|(_, p)| p).collect()
}

fn image_problem(entry: &ImageEntry, dir: &Path) -> Option<String> {
    let path = dir.join(&entry.file_name);
    match load_rgb(&path) {
        Err(err) => Some(format!("{err:#}")),
        Ok(image) if (image.width(), image.height()) != (entry.width, entry.height) => Some(format!(
            "{}: image is {}x{} but the annotations say {}x{} (image id {})",
            path.display(),
            image.width(),
            image.height(),
            entry.width,
            entry.height,
            entry.id
        )),
        Ok(_) => None,
    }
}

/// Images the coverage check looks at, evenly spread over the split.
const COVERAGE_IMAGES: usize = 2000;

/// The anchor coverage of a split's boxes (see [`CoverageTable`]) at the
/// evaluation size of `config`, over at most 2000 of its images; returns
/// the number of images looked at and the table.
pub fn anchor_coverage(config: &Config, dataset: &Dataset) -> (usize, CoverageTable) {
    let step = dataset.images.len().div_ceil(COVERAGE_IMAGES).max(1);
    let sample: Vec<ImageEntry> = dataset.images.iter().step_by(step).cloned().collect();
    let transform = Transform::new(&config.input);
    let labels = dataset.categories.num_labels();
    (sample.len(), coverage::anchor_coverage(&sample, &transform, &config.model.anchors, labels))
}

/// Draws up to `count` images, evenly spread over the split, with their
/// boxes and class names into `out` (`<stem>.jpg`); returns how many.
/// Images that do not decode are passed over (`image_problems` names them).
pub fn draw_samples(dataset: &Dataset, images_dir: &Path, out: &Path, count: usize) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let step = dataset.images.len().div_ceil(count).max(1);
    let mut drawn = 0;
    for entry in dataset.images.iter().step_by(step) {
        let Ok(mut image) = load_rgb(&images_dir.join(&entry.file_name)) else {
            continue;
        };
        for ((b, &label), &crowd) in entry.boxes.iter().zip(&entry.labels).zip(&entry.crowd) {
            let name = dataset.categories.name_of(label);
            let caption = if crowd { format!("{name} (crowd)") } else { name };
            draw_labeled_box(&mut image, *b, &caption, class_colour(label));
        }
        let path = out.join(format!("{}.jpg", file_stem(entry)));
        image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        drawn += 1;
    }
    Ok(drawn)
}

/// Draws the first `count` training images of epoch 0 as the loader hands
/// them to the model (augmented, resized, with the boxes that survived the
/// augmentations) into `out` (`<stem>-augmented.jpg`); returns how many.
pub fn draw_augmented_samples(
    config: &Config,
    dataset: &Dataset,
    images_dir: &Path,
    out: &Path,
    count: usize,
) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let options = LoaderOptions { drop_last: false, ..LoaderOptions::for_config(config, true) };
    let loader = Loader::new(dataset.images.clone(), images_dir.to_path_buf(), Transform::new(&config.input), options);
    let stems: std::collections::HashMap<u64, String> = dataset.images.iter().map(|e| (e.id, file_stem(e))).collect();
    let mut drawn = 0;
    for batch in loader.epoch(0, 0)? {
        let batch = batch?;
        for (n, target) in batch.targets.iter().enumerate() {
            if drawn == count {
                return Ok(drawn);
            }
            let (height, width) = target.resized_size;
            let chw = batch.images.get(n)?.narrow(1, 0, height)?.narrow(2, 0, width)?;
            let mut image = denormalize(&chw.flatten_all()?.to_vec1::<f32>()?, height, width, &config.input);
            for (b, &label) in target.boxes.iter().zip(&target.labels) {
                draw_labeled_box(&mut image, *b, &dataset.categories.name_of(label), class_colour(label));
            }
            let path = out.join(format!("{}-augmented.jpg", stems[&target.image_id]));
            image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
            drawn += 1;
        }
    }
    Ok(drawn)
}

/// Normalised `[3, height, width]` floats back to RGB bytes.
fn denormalize(chw: &[f32], height: usize, width: usize, input: &crate::config::InputConfig) -> image::RgbImage {
    let plane = height * width;
    image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        image::Rgb(
            [0, 1, 2]
                .map(|c| ((chw[c * plane + i] * input.std[c] + input.mean[c]) * 255.0).round().clamp(0.0, 255.0) as u8),
        )
    })
}

fn file_stem(entry: &ImageEntry) -> String {
    Path::new(&entry.file_name).file_stem().map_or_else(|| entry.id.to_string(), |s| s.to_string_lossy().into_owned())
}
