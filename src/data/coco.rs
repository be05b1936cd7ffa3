//! COCO detection annotations: the JSON as written on disk (`Coco*` types),
//! and the validated dataset the trainer reads (`Dataset`).
//!
//! Label semantics: a detector predicts a *label* in `0..num_classes`. By
//! default labels are contiguous (categories sorted by id get 0, 1, 2, ...);
//! with `data.label_mode = "category_id"` the label *is* the COCO category
//! id, which is what torchvision's COCO weights use (91 classes, label 0
//! unused).
//! [`CategoryMap`] converts both ways.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, LabelMode};

/// One COCO annotation file as written on disk. Unknown fields are ignored,
/// as pycocotools ignores them.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CocoJson {
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    pub categories: Vec<CocoCategory>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CocoAnnotation {
    /// Optional in the wild; when present it must be unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels, top-left origin.
    pub bbox: [f64; 4],
    /// Segment area for COCO; `w * h` when absent (used by evaluation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<f64>,
    #[serde(default, deserialize_with = "flag_from_int_or_bool")]
    pub iscrowd: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

/// `iscrowd` is an integer in COCO but a boolean in some exporters.
fn flag_from_int_or_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Int(i64),
        Bool(bool),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Int(v) => v != 0,
        Flag::Bool(v) => v,
    })
}

/// Reads and parses a COCO annotation file. Errors name the file, and for
/// malformed JSON the line and column (serde_json's message carries them).
pub fn read_coco_json(path: &Path) -> Result<CocoJson> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a valid COCO file", path.display()))
}

/// The files a split was read from, in any format.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFiles {
    /// What describes the split: the COCO or CSV file, the VOC list or
    /// annotation folder, the YOLO label folder.
    pub annotations: PathBuf,
    /// The folder the images' `file_name`s are relative to.
    pub images: PathBuf,
}

/// A class index (0-based) and its box `[x1, y1, x2, y2]` in pixels, as
/// the readers of other formats find them.
pub(super) type ClassBox = (usize, [f64; 4]);

/// The COCO form of a split that another format (Pascal VOC, YOLO, CSV)
/// describes, so that every format is validated, trained on and evaluated
/// as one. Category ids are 1-based class indices; image and annotation
/// ids count from 1 in the order things are added.
pub(super) struct CocoBuilder {
    coco: CocoJson,
}

impl CocoBuilder {
    pub(super) fn new(class_names: &[String]) -> Self {
        let categories = (class_names.iter().enumerate())
            .map(|(i, name)| CocoCategory { id: i as u64 + 1, name: name.clone(), supercategory: None })
            .collect();
        Self { coco: CocoJson { images: Vec::new(), annotations: Vec::new(), categories } }
    }

    /// Adds an image (`file_name` relative to the split's image folder) and
    /// returns its id.
    pub(super) fn add_image(&mut self, file_name: String, width: u32, height: u32) -> u64 {
        let id = self.coco.images.len() as u64 + 1;
        self.coco.images.push(CocoImage { id, file_name, width, height });
        id
    }

    /// Adds a box `[x1, y1, x2, y2]` in pixels of class index `class` (0-based).
    pub(super) fn add_box(&mut self, image_id: u64, class: usize, [x1, y1, x2, y2]: [f64; 4], crowd: bool) {
        let id = self.coco.annotations.len() as u64 + 1;
        let bbox = [x1, y1, x2 - x1, y2 - y1];
        let annotation = CocoAnnotation {
            id: Some(id),
            image_id,
            category_id: class as u64 + 1,
            bbox,
            area: Some(bbox[2] * bbox[3]),
            iscrowd: crowd,
        };
        self.coco.annotations.push(annotation);
    }

    pub(super) fn finish(self) -> CocoJson {
        self.coco
    }
}

/// Checks the corners a reader found: finite, and `x2 >= x1`, `y2 >= y1`
/// (a box of no width is dropped later, with a warning).
pub(super) fn check_corners([x1, y1, x2, y2]: [f64; 4]) -> Result<()> {
    if [x1, y1, x2, y2].iter().any(|v| !v.is_finite()) {
        bail!("box [{x1}, {y1}, {x2}, {y2}] is not finite");
    }
    if x2 < x1 {
        bail!("x2 {x2} is below x1 {x1}");
    }
    if y2 < y1 {
        bail!("y2 {y2} is below y1 {y1}");
    }
    Ok(())
}

/// Two-way map between COCO category ids and model labels.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryMap {
    mode: LabelMode,
    /// Categories sorted by id.
    categories: Vec<CocoCategory>,
    index_by_id: HashMap<u64, usize>,
}

impl CategoryMap {
    /// Builds the map; category ids must be unique.
    pub fn new(categories: &[CocoCategory], mode: LabelMode) -> Result<Self> {
        let mut sorted = categories.to_vec();
        sorted.sort_by_key(|c| c.id);
        let mut index_by_id = HashMap::new();
        for (i, c) in sorted.iter().enumerate() {
            if index_by_id.insert(c.id, i).is_some() {
                bail!("categories: duplicate id {}", c.id);
            }
        }
        Ok(Self { mode, categories: sorted, index_by_id })
    }

    /// The label map a config records (`data.classes`,
    /// `data.category_ids`, `data.label_mode`), so that a trained model
    /// names its classes without its dataset.
    pub fn from_config(cfg: &DataConfig) -> Result<Self> {
        if cfg.classes.is_empty() || cfg.classes.len() != cfg.category_ids.len() {
            bail!(
                "config keys data.classes and data.category_ids: expected one category id per class name \
                 ({} names, {} ids)",
                cfg.classes.len(),
                cfg.category_ids.len()
            );
        }
        let categories: Vec<CocoCategory> = (cfg.category_ids.iter().zip(&cfg.classes))
            .map(|(&id, name)| CocoCategory { id, name: name.clone(), supercategory: None })
            .collect();
        Self::new(&categories, cfg.label_mode)
    }

    /// Number of model outputs needed: categories, or max id + 1 by id.
    pub fn num_labels(&self) -> usize {
        match self.mode {
            LabelMode::Contiguous => self.categories.len(),
            LabelMode::CategoryId => self.categories.last().map_or(0, |c| c.id as usize + 1),
        }
    }

    pub fn label_of(&self, category_id: u64) -> Option<usize> {
        let index = *self.index_by_id.get(&category_id)?;
        Some(match self.mode {
            LabelMode::Contiguous => index,
            LabelMode::CategoryId => category_id as usize,
        })
    }

    pub fn category_id_of(&self, label: usize) -> Option<u64> {
        match self.mode {
            LabelMode::Contiguous => self.categories.get(label).map(|c| c.id),
            LabelMode::CategoryId => self.index_by_id.contains_key(&(label as u64)).then_some(label as u64),
        }
    }

    /// Display name of a label ("label N" when it maps to no category).
    pub fn name_of(&self, label: usize) -> String {
        self.category_id_of(label)
            .and_then(|id| self.index_by_id.get(&id))
            .map(|&i| self.categories[i].name.clone())
            .unwrap_or_else(|| format!("label {label}"))
    }

    /// Categories sorted by id.
    pub fn categories(&self) -> &[CocoCategory] {
        &self.categories
    }
}

/// One image with its boxes, ready for the transforms.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
    /// `[x1, y1, x2, y2]` in original pixels, clipped to the image.
    pub boxes: Vec<[f32; 4]>,
    /// Model label of each box (see [`CategoryMap`]).
    pub labels: Vec<usize>,
    /// Crowd boxes are never foreground; anchors they cover are ignored.
    pub crowd: Vec<bool>,
}

impl ImageEntry {
    /// True when the image has no box at all (a negative sample).
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}

/// Options for [`Dataset::from_coco`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    pub label_mode: LabelMode,
    /// Drop images without annotations (detectron2's FILTER_EMPTY_ANNOTATIONS).
    pub drop_empty: bool,
}

/// What loading repaired or dropped; commands print it as warnings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Boxes with w or h <= 0 after clipping, or non-finite coordinates.
    pub degenerate_boxes: usize,
    /// Boxes partly outside their image, clipped to it.
    pub clipped_boxes: usize,
    /// Images without annotations (kept unless `drop_empty`).
    pub empty_images: usize,
    /// Images removed by `drop_empty`.
    pub dropped_empty_images: usize,
    /// Up to a few examples of what was repaired, for the warning text.
    pub examples: Vec<String>,
}

impl LoadReport {
    const MAX_EXAMPLES: usize = 5;

    fn note(&mut self, example: String) {
        if self.examples.len() < Self::MAX_EXAMPLES {
            self.examples.push(example);
        }
    }

    /// Warning lines for a person, empty when nothing was repaired.
    pub fn warnings(&self, file: &Path) -> Vec<String> {
        let mut lines = Vec::new();
        if self.degenerate_boxes > 0 {
            lines.push(format!(
                "{}: dropped {} degenerate box(es) (w or h <= 0 after clipping, or not finite)",
                file.display(),
                self.degenerate_boxes
            ));
        }
        if self.clipped_boxes > 0 {
            lines.push(format!(
                "{}: clipped {} box(es) partly outside their image",
                file.display(),
                self.clipped_boxes
            ));
        }
        if self.dropped_empty_images > 0 {
            lines.push(format!(
                "{}: dropped {} image(s) without annotations",
                file.display(),
                self.dropped_empty_images
            ));
        }
        lines.extend(self.examples.iter().map(|e| format!("{}:   {e}", file.display())));
        lines
    }
}

/// A validated detection dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<ImageEntry>,
    pub categories: CategoryMap,
    pub report: LoadReport,
}

impl Dataset {
    /// True when some image has a box that is not a crowd region: images
    /// without boxes are welcome as negatives, but a split of nothing else
    /// has nothing to learn.
    pub fn has_boxes_to_learn(&self) -> bool {
        self.images.iter().any(|image| image.crowd.iter().any(|&crowd| !crowd))
    }

    /// Reads and validates an annotation file (see [`Dataset::from_coco`]).
    pub fn load(path: &Path, options: LoadOptions) -> Result<Self> {
        let coco = read_coco_json(path)?;
        Self::from_coco(&coco, options).with_context(|| path.display().to_string())
    }

    /// Validates COCO annotations. Errors (the file is unusable): duplicate
    /// image, annotation or category ids; an annotation whose image or
    /// category does not exist; an image of zero width or height. Repairs,
    /// counted in [`LoadReport`]: boxes clipped to their image, degenerate
    /// boxes dropped. Images keep file order; boxes keep annotation order.
    pub fn from_coco(coco: &CocoJson, options: LoadOptions) -> Result<Self> {
        let categories = CategoryMap::new(&coco.categories, options.label_mode)?;
        let mut images = Vec::with_capacity(coco.images.len());
        let mut index_by_id = HashMap::new();
        for (i, img) in coco.images.iter().enumerate() {
            if img.width == 0 || img.height == 0 {
                bail!("images[{i}] (id {}, {}): zero width or height", img.id, img.file_name);
            }
            if index_by_id.insert(img.id, i).is_some() {
                bail!("images[{i}]: duplicate image id {}", img.id);
            }
            images.push(ImageEntry {
                id: img.id,
                file_name: img.file_name.clone(),
                width: img.width,
                height: img.height,
                boxes: Vec::new(),
                labels: Vec::new(),
                crowd: Vec::new(),
            });
        }
        let mut report = LoadReport::default();
        let mut annotation_ids = HashSet::new();
        for (i, ann) in coco.annotations.iter().enumerate() {
            let name = match ann.id {
                Some(id) => format!("annotations[{i}] (id {id})"),
                None => format!("annotations[{i}]"),
            };
            if let Some(id) = ann.id {
                if !annotation_ids.insert(id) {
                    bail!("{name}: duplicate annotation id {id}");
                }
            }
            let Some(&image_index) = index_by_id.get(&ann.image_id) else {
                bail!("{name}: image_id {} is not in images", ann.image_id);
            };
            let Some(label) = categories.label_of(ann.category_id) else {
                bail!("{name}: category_id {} is not in categories", ann.category_id);
            };
            let image = &mut images[image_index];
            match clip_box(ann.bbox, image.width, image.height) {
                ClippedBox::Inside(b) => image_push(image, b, label, ann.iscrowd),
                ClippedBox::Clipped(b) => {
                    report.clipped_boxes += 1;
                    report.note(format!(
                        "{name}: bbox {:?} clipped to the {}x{} image",
                        ann.bbox, image.width, image.height
                    ));
                    image_push(image, b, label, ann.iscrowd);
                }
                ClippedBox::Degenerate => {
                    report.degenerate_boxes += 1;
                    report.note(format!("{name}: degenerate bbox {:?} dropped", ann.bbox));
                }
            }
        }
        report.empty_images = images.iter().filter(|im| im.is_empty()).count();
        if options.drop_empty {
            images.retain(|im| !im.is_empty());
            report.dropped_empty_images = report.empty_images;
        }
        Ok(Self { images, categories, report })
    }
}

fn image_push(image: &mut ImageEntry, b: [f32; 4], label: usize, crowd: bool) {
    image.boxes.push(b);
    image.labels.push(label);
    image.crowd.push(crowd);
}

enum ClippedBox {
    Inside([f32; 4]),
    Clipped([f32; 4]),
    Degenerate,
}

/// COCO `[x, y, w, h]` to `[x1, y1, x2, y2]` clipped to `[0, W] x [0, H]`.
fn clip_box(bbox: [f64; 4], width: u32, height: u32) -> ClippedBox {
    if bbox.iter().any(|v| !v.is_finite()) {
        return ClippedBox::Degenerate;
    }
    let [x, y, w, h] = bbox;
    let (x1, y1, x2, y2) = (x, y, x + w, y + h);
    let (w_max, h_max) = (width as f64, height as f64);
    let cx1 = x1.clamp(0.0, w_max);
    let cy1 = y1.clamp(0.0, h_max);
    let cx2 = x2.clamp(0.0, w_max);
    let cy2 = y2.clamp(0.0, h_max);
    if cx2 <= cx1 || cy2 <= cy1 {
        return ClippedBox::Degenerate;
    }
    let b = [cx1 as f32, cy1 as f32, cx2 as f32, cy2 as f32];
    if (cx1, cy1, cx2, cy2) == (x1, y1, x2, y2) {
        ClippedBox::Inside(b)
    } else {
        ClippedBox::Clipped(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coco(annotations: &str) -> CocoJson {
        let text = format!(
            r#"{{"images": [{{"id": 7, "file_name": "a.png", "width": 100, "height": 50}},
                          {{"id": 9, "file_name": "b.png", "width": 10, "height": 10}}],
                "categories": [{{"id": 90, "name": "zebra"}}, {{"id": 3, "name": "cat"}}],
                "annotations": [{annotations}]}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn non_contiguous_ids_map_to_sorted_labels_and_back() {
        let c = coco("");
        let map = CategoryMap::new(&c.categories, LabelMode::Contiguous).unwrap();
        assert_eq!(map.num_labels(), 2);
        assert_eq!(map.label_of(3), Some(0));
        assert_eq!(map.label_of(90), Some(1));
        assert_eq!(map.label_of(4), None);
        for label in 0..2 {
            assert_eq!(map.label_of(map.category_id_of(label).unwrap()), Some(label));
        }
        assert_eq!(map.name_of(1), "zebra");
        let by_id = CategoryMap::new(&c.categories, LabelMode::CategoryId).unwrap();
        assert_eq!(by_id.num_labels(), 91);
        assert_eq!(by_id.label_of(90), Some(90));
        assert_eq!(by_id.category_id_of(5), None);
    }

    #[test]
    fn boxes_are_clipped_and_degenerate_ones_dropped() {
        let c = coco(
            r#"{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 5]},
               {"id": 2, "image_id": 7, "category_id": 90, "bbox": [90, 40, 20, 20], "iscrowd": 1},
               {"id": 3, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 4]},
               {"id": 4, "image_id": 7, "category_id": 3, "bbox": [120, 5, 4, 4]}"#,
        );
        let d = Dataset::from_coco(&c, LoadOptions::default()).unwrap();
        let im = &d.images[0];
        assert_eq!(im.boxes, vec![[10.0, 10.0, 30.0, 15.0], [90.0, 40.0, 100.0, 50.0]]);
        assert_eq!(im.labels, vec![0, 1]);
        assert_eq!(im.crowd, vec![false, true]);
        assert_eq!(d.report.clipped_boxes, 1);
        assert_eq!(d.report.degenerate_boxes, 2);
        assert_eq!(d.report.empty_images, 1);
        assert!(d.images[1].is_empty(), "images without annotations are kept as negatives");
    }

    #[test]
    fn drop_empty_removes_negatives() {
        let c = coco(r#"{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 5]}"#);
        let options = LoadOptions { drop_empty: true, ..Default::default() };
        let d = Dataset::from_coco(&c, options).unwrap();
        assert_eq!(d.images.len(), 1);
        assert_eq!(d.report.dropped_empty_images, 1);
    }

    #[test]
    fn broken_references_name_the_annotation() {
        for (ann, expected) in [
            (
                r#"{"id": 5, "image_id": 8, "category_id": 3, "bbox": [0, 0, 1, 1]}"#,
                "annotations[0] (id 5): image_id 8 is not in images",
            ),
            (
                r#"{"id": 5, "image_id": 7, "category_id": 4, "bbox": [0, 0, 1, 1]}"#,
                "annotations[0] (id 5): category_id 4 is not in categories",
            ),
            (
                r#"{"id": 5, "image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}, {"id": 5, "image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1]}"#,
                "annotations[1] (id 5): duplicate annotation id 5",
            ),
        ] {
            let err = Dataset::from_coco(&coco(ann), LoadOptions::default()).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
    }
}
