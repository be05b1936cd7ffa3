//! keras-retinanet's CSV format: `classes.csv` with `class_name,id` rows,
//! and one annotation file per split (`train.csv`, or `annotations.csv`, and
//! `val.csv`) with `path,x1,y1,x2,y2,class_name` rows, one per box, in
//! pixels; `path,,,,,` lists an image without boxes. Image paths are
//! relative to the annotation file's folder; image sizes come from the
//! headers. Read into the COCO form (`CocoBuilder`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::coco::{check_corners, ClassBox, CocoBuilder, CocoJson, SplitFiles};
use super::image_io::image_size;

/// The class list `auto` looks for.
pub(super) const CLASSES_CSV: &str = "classes.csv";

/// Reads split `split` (`train`, `val`, or a `.csv` file relative to the
/// root) of the CSV dataset at `root`.
pub(super) fn read_split(root: &Path, split: &str) -> Result<(CocoJson, SplitFiles)> {
    let names = read_classes(&root.join(CLASSES_CSV))?;
    let candidates: Vec<PathBuf> = match split {
        "train" => vec![root.join("train.csv"), root.join("annotations.csv")],
        other => vec![root.join(format!("{other}.csv")), root.join(other)],
    };
    let Some(file) = candidates.iter().find(|f| f.is_file()) else {
        let names: Vec<String> = candidates.iter().map(|f| f.display().to_string()).collect();
        bail!("split {split}: no annotation file ({})", names.join(" or "));
    };
    let rows = read_rows(file, &names)?;
    let folder = file.parent().unwrap_or(Path::new("")).to_path_buf();
    // Images in the order they first appear, each with its boxes.
    let mut order: Vec<&str> = Vec::new();
    let mut boxes: HashMap<&str, Vec<ClassBox>> = HashMap::new();
    for (path, found) in &rows {
        let entry = boxes.entry(path).or_insert_with(|| {
            order.push(path);
            Vec::new()
        });
        entry.extend(found.iter().copied());
    }
    let sizes: Vec<(u32, u32)> = order
        .par_iter()
        .map(|path| image_size(&folder.join(path)).with_context(|| format!("{}: image {path}", file.display())))
        .collect::<Result<_>>()?;
    let mut builder = CocoBuilder::new(&names);
    for (path, (width, height)) in order.iter().zip(sizes) {
        let image_id = builder.add_image(path.to_string(), width, height);
        for &(class, corners) in &boxes[path] {
            builder.add_box(image_id, class, corners, false);
        }
    }
    Ok((builder.finish(), SplitFiles { annotations: file.clone(), images: folder }))
}

fn csv_reader(path: &Path) -> Result<csv::Reader<std::fs::File>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Class names ordered by their id.
fn read_classes(path: &Path) -> Result<Vec<String>> {
    let mut classes: Vec<(u64, String, u64)> = Vec::new();
    for record in csv_reader(path)?.records() {
        let record = record.with_context(|| format!("{}: not valid CSV", path.display()))?;
        let line = record.position().map_or(0, |p| p.line());
        let at = || format!("{}: line {line}", path.display());
        if record.len() != 2 {
            bail!("{}: expected class_name,id, got {} field(s)", at(), record.len());
        }
        let id: u64 = record[1].parse().with_context(|| format!("{}: id {:?} is not a number", at(), &record[1]))?;
        if let Some((_, name, first)) = classes.iter().find(|(other, name, _)| *other == id || *name == record[0]) {
            bail!("{}: {:?} or id {id} repeats line {first} ({name:?})", at(), &record[0]);
        }
        classes.push((id, record[0].to_string(), line));
    }
    if classes.is_empty() {
        bail!("{}: no classes", path.display());
    }
    classes.sort();
    Ok(classes.into_iter().map(|(_, name, _)| name).collect())
}

/// `(image path, boxes)` of every row, in file order.
fn read_rows(path: &Path, names: &[String]) -> Result<Vec<(String, Vec<ClassBox>)>> {
    let mut rows = Vec::new();
    for record in csv_reader(path)?.records() {
        let record = record.with_context(|| format!("{}: not valid CSV", path.display()))?;
        let at = || format!("{}: line {}", path.display(), record.position().map_or(0, |p| p.line()));
        if record.len() != 6 {
            bail!("{}: expected path,x1,y1,x2,y2,class_name, got {} field(s)", at(), record.len());
        }
        if record[0].is_empty() {
            bail!("{}: empty image path", at());
        }
        if record.iter().skip(1).all(str::is_empty) {
            rows.push((record[0].to_string(), Vec::new())); // an image without boxes
            continue;
        }
        let mut corners = [0f64; 4];
        for (value, text) in corners.iter_mut().zip(record.iter().skip(1)) {
            *value = text.parse().with_context(|| format!("{}: {text:?} is not a number", at()))?;
        }
        check_corners(corners).with_context(at)?;
        let class = (names.iter().position(|n| *n == record[5]))
            .with_context(|| format!("{}: class {:?} is not in {CLASSES_CSV}", at(), &record[5]))?;
        rows.push((record[0].to_string(), vec![(class, corners)]));
    }
    Ok(rows)
}
