//! Where a config's dataset lives and how it is read: the folder, its
//! format (COCO, Pascal VOC, YOLO or keras-retinanet's CSV; `auto` detects
//! it), and the annotations and images of a split. Every format is read
//! into COCO's form and validated by `Dataset::from_coco`, so training and
//! evaluation see one kind of dataset. The synthetic set is generated here
//! on first use.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::coco::{read_coco_json, CocoJson, Dataset, LoadOptions, SplitFiles};
use super::synthetic::{ensure_cached, SynthSpec};
use super::voc::VocLayout;
use super::{keras_csv, voc, yolo};
use crate::config::{DataConfig, DataFormat};

/// The dataset folder: `data.root`, or the cached synthetic set when empty.
pub(super) fn dataset_root(cfg: &DataConfig) -> Result<PathBuf> {
    if !cfg.root.is_empty() {
        let root = PathBuf::from(&cfg.root);
        if !root.is_dir() {
            bail!("data.root {}: no such folder", root.display());
        }
        return Ok(root);
    }
    let s = &cfg.synth;
    ensure_cached(SynthSpec { train: s.train, val: s.val, size: s.size, seed: s.seed })
}

/// A split as read: validated for training, raw for evaluation.
#[derive(Debug, Clone)]
pub struct LoadedSplit {
    pub dataset: Dataset,
    /// The split in COCO's form as read, before any repair (pycocotools'
    /// view, for evaluation and `convert`).
    pub coco: CocoJson,
    pub files: SplitFiles,
}

/// Loads and validates a split: `train`, `val`, or a file naming one
/// (relative to the root: a COCO JSON, a VOC list, a CSV file). Empty
/// images are dropped only from the training split, and only with
/// `data.drop_empty`.
pub fn load_split(cfg: &DataConfig, split: &str) -> Result<LoadedSplit> {
    let root = dataset_root(cfg)?;
    let (coco, files) = match find_layout(cfg, &root, split)? {
        Layout::Coco => read_coco_split(cfg, &root, split)?,
        Layout::Voc(layout) => voc::read_split(&root, &layout, split, cfg)?,
        Layout::Yolo => yolo::read_split(&root.join(yolo::DATA_YAML), split)?,
        Layout::Csv => keras_csv::read_split(&root, split)?,
    };
    let options = LoadOptions { label_mode: cfg.label_mode, drop_empty: cfg.drop_empty && split == "train" };
    let dataset = Dataset::from_coco(&coco, options).with_context(|| files.annotations.display().to_string())?;
    Ok(LoadedSplit { dataset, coco, files })
}

/// A dataset folder's format, with what reading it needs.
enum Layout {
    Coco,
    Voc(VocLayout),
    Yolo,
    Csv,
}

/// The layout `data.format` names, or for `auto` the first found under
/// `root`.
fn find_layout(cfg: &DataConfig, root: &Path, split: &str) -> Result<Layout> {
    let voc =
        || VocLayout::find(root).with_context(|| format!("data.root {}: no {}", root.display(), VocLayout::LOOKED_FOR));
    match cfg.format {
        DataFormat::Coco => return Ok(Layout::Coco),
        DataFormat::Voc => return Ok(Layout::Voc(voc()?)),
        DataFormat::Yolo => return Ok(Layout::Yolo),
        DataFormat::Csv => return Ok(Layout::Csv),
        DataFormat::Auto => {}
    }
    if coco_annotations(cfg, root, split).is_file() || split.ends_with(".json") {
        return Ok(Layout::Coco);
    }
    if let Some(layout) = VocLayout::find(root) {
        return Ok(Layout::Voc(layout));
    }
    if root.join(yolo::DATA_YAML).is_file() {
        return Ok(Layout::Yolo);
    }
    if root.join(keras_csv::CLASSES_CSV).is_file() {
        return Ok(Layout::Csv);
    }
    bail!(
        "data.root {}: no dataset found; looked for {} (COCO), {}, {} (YOLO) and {} (CSV); \
         set data.format to say which it is",
        root.display(),
        coco_annotations(cfg, root, split).display(),
        VocLayout::LOOKED_FOR,
        yolo::DATA_YAML,
        keras_csv::CLASSES_CSV
    )
}

/// The COCO annotation file of a split: `data.train`, `data.val`, or the
/// file `split` names, relative to the root.
fn coco_annotations(cfg: &DataConfig, root: &Path, split: &str) -> PathBuf {
    root.join(match split {
        "train" => cfg.train.as_str(),
        "val" => cfg.val.as_str(),
        other => other,
    })
}

fn read_coco_split(cfg: &DataConfig, root: &Path, split: &str) -> Result<(CocoJson, SplitFiles)> {
    let annotations = coco_annotations(cfg, root, split);
    if !annotations.is_file() {
        bail!("split {split}: annotation file {} not found", annotations.display());
    }
    let coco = read_coco_json(&annotations)?;
    Ok((coco, SplitFiles { annotations, images: root.join(&cfg.images) }))
}
