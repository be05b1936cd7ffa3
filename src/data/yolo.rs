//! Ultralytics YOLO datasets: a `data.yaml` with `path`, `train`, `val` and
//! `names` (a list, or a map from class index to name); images in the
//! folders (or `.txt` lists of images) that `train` and `val` name, and for
//! each image a label file found by Ultralytics' rule: the last `images`
//! folder of its path becomes `labels`, the extension `.txt`. Each label
//! line is `class cx cy w h`, normalised to [0, 1]; an image without a
//! label file is a negative. Image sizes come from the image headers. Read
//! into the COCO form (`CocoBuilder`).

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use yaml_rust2::{Yaml, YamlLoader};

use super::coco::{check_corners, ClassBox, CocoBuilder, CocoJson, SplitFiles};
use super::image_io::{image_files, image_size};

/// The dataset file `auto` looks for.
pub(super) const DATA_YAML: &str = "data.yaml";

/// Reads split `split` (`train`, `val`, or another key of `data.yaml`) of
/// the YOLO dataset whose `data.yaml` is at `yaml`.
pub(super) fn read_split(yaml: &Path, split: &str) -> Result<(CocoJson, SplitFiles)> {
    let text = std::fs::read_to_string(yaml).with_context(|| format!("cannot read {}", yaml.display()))?;
    let docs = YamlLoader::load_from_str(&text).with_context(|| format!("{}: not valid YAML", yaml.display()))?;
    let doc = docs.first().with_context(|| format!("{}: empty", yaml.display()))?;
    let names = class_names(&doc["names"]).with_context(|| format!("{}: key names", yaml.display()))?;
    let folder = yaml.parent().unwrap_or(Path::new(""));
    let base = match doc["path"].as_str() {
        Some(path) => folder.join(path),
        None => folder.to_path_buf(),
    };
    let images = split_images(&base, &doc[split]).with_context(|| format!("{}: key {split}", yaml.display()))?;
    let labelled: Vec<(PathBuf, (u32, u32), Vec<ClassBox>)> = images
        .par_iter()
        .map(|image| {
            let size = image_size(image)?;
            Ok((image.clone(), size, read_labels(&label_path(image), size, names.len())?))
        })
        .collect::<Result<_>>()?;
    let mut builder = CocoBuilder::new(&names);
    for (image, (width, height), boxes) in labelled {
        let file_name = image.strip_prefix(&base).unwrap_or(&image).to_string_lossy().into_owned();
        let image_id = builder.add_image(file_name, width, height);
        for (class, corners) in boxes {
            builder.add_box(image_id, class, corners, false);
        }
    }
    let labels = images.first().map_or_else(|| base.clone(), |i| label_path(i).parent().unwrap_or(&base).to_path_buf());
    Ok((builder.finish(), SplitFiles { annotations: labels, images: base }))
}

/// `names` as a list, or as a map from index to name (indices 0..n).
fn class_names(names: &Yaml) -> Result<Vec<String>> {
    let text = |v: &Yaml| match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        _ => None,
    };
    match names {
        Yaml::Array(list) => list.iter().map(|v| text(v).context("expected a list of names")).collect(),
        Yaml::Hash(map) => {
            let mut names = vec![None; map.len()];
            for (key, value) in map {
                let index = key.as_i64().filter(|&i| i >= 0 && (i as usize) < map.len());
                let index = index.with_context(|| format!("expected class indices 0 to {}", map.len() - 1))?;
                names[index as usize] = Some(text(value).context("expected a name for each index")?);
            }
            Ok(names.into_iter().flatten().collect())
        }
        Yaml::BadValue => bail!("missing"),
        _ => bail!("expected a list of names or a map from index to name"),
    }
}

/// The images a split names: a folder (searched recursively), a `.txt`
/// list of image paths, or a list of either; paths relative to `base`.
fn split_images(base: &Path, value: &Yaml) -> Result<Vec<PathBuf>> {
    let entries: Vec<&str> = match value {
        Yaml::String(s) => vec![s.as_str()],
        Yaml::Array(list) => list.iter().map(|v| v.as_str().context("expected a path")).collect::<Result<_>>()?,
        Yaml::BadValue => bail!("missing"),
        _ => bail!("expected a folder, a .txt list of images, or a list of them"),
    };
    let mut images = Vec::new();
    for entry in entries {
        let path = base.join(entry);
        if path.is_dir() {
            images_under(&path, &mut images)?;
        } else if path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            images.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| base.join(l)));
        } else {
            bail!("{}: no such folder or file", path.display());
        }
    }
    Ok(images)
}

fn images_under(dir: &Path, images: &mut Vec<PathBuf>) -> Result<()> {
    images.extend(image_files(dir)?);
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    folders.iter().try_for_each(|folder| images_under(folder, images))
}

/// Ultralytics' rule: `.../images/.../x.jpg` -> `.../labels/.../x.txt`.
fn label_path(image: &Path) -> PathBuf {
    let parts: Vec<Component> = image.components().collect();
    let last_images = parts.iter().rposition(|c| c.as_os_str() == "images");
    let path: PathBuf = (parts.iter().enumerate())
        .map(|(i, c)| if Some(i) == last_images { Component::Normal("labels".as_ref()) } else { *c })
        .collect();
    path.with_extension("txt")
}

/// Below this many pixels outside the image, a corner is on the border:
/// normalised values written with a few decimals land a hair outside.
const ROUNDING_PX: f64 = 1e-3;

/// `value` moved onto 0 or `side` when it is only rounding away from it.
fn snap(value: f64, side: f64) -> f64 {
    match value {
        v if (-ROUNDING_PX..0.0).contains(&v) => 0.0,
        v if v > side && v - side <= ROUNDING_PX => side,
        v => v,
    }
}

/// The boxes of one label file in pixels of an image of `(width, height)`;
/// none when there is no file. Errors name the file and the line.
fn read_labels(path: &Path, (width, height): (u32, u32), classes: usize) -> Result<Vec<ClassBox>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let mut boxes = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}: line {}", path.display(), n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 5 {
            bail!("{}: expected 5 numbers (class cx cy w h), got {}", at(), fields.len());
        }
        let class: usize =
            fields[0].parse().with_context(|| format!("{}: class {:?} is not an index", at(), fields[0]))?;
        if class >= classes {
            bail!("{}: class {class} is not in names (0 to {})", at(), classes.saturating_sub(1));
        }
        let mut values = [0f64; 4];
        for (value, text) in values.iter_mut().zip(&fields[1..]) {
            *value = text.parse().with_context(|| format!("{}: {text:?} is not a number", at()))?;
            if !(0.0..=1.0).contains(value) {
                bail!("{}: {text} is outside [0, 1] (coordinates are normalised)", at());
            }
        }
        let [cx, cy, w, h] = values;
        let (w_px, h_px) = (f64::from(width), f64::from(height));
        let corners = [
            snap((cx - w / 2.0) * w_px, w_px),
            snap((cy - h / 2.0) * h_px, h_px),
            snap((cx + w / 2.0) * w_px, w_px),
            snap((cy + h / 2.0) * h_px, h_px),
        ];
        check_corners(corners).with_context(at)?;
        boxes.push((class, corners));
    }
    Ok(boxes)
}
