//! Where a config's dataset lives: the folder, the annotation file of a
//! split, and its images. The synthetic set is generated here on first use.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::coco::{read_coco_json, CocoJson, Dataset, LoadOptions};
use super::synthetic::{ensure_cached, SynthSpec};
use crate::config::DataConfig;

/// The files of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitFiles {
    pub annotations: PathBuf,
    pub images: PathBuf,
}

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

/// `split` is `train`, `val`, or an annotation file relative to the root.
pub(super) fn split_files(cfg: &DataConfig, split: &str) -> Result<SplitFiles> {
    let root = dataset_root(cfg)?;
    let relative = match split {
        "train" => cfg.train.as_str(),
        "val" => cfg.val.as_str(),
        other => other,
    };
    let annotations = root.join(relative);
    if !annotations.is_file() {
        bail!("split {split}: annotation file {} not found", annotations.display());
    }
    Ok(SplitFiles { annotations, images: root.join(&cfg.images) })
}

/// A split as read: validated for training, raw for evaluation.
#[derive(Debug, Clone)]
pub struct LoadedSplit {
    pub dataset: Dataset,
    /// The annotation file as written (pycocotools' view, for evaluation).
    pub coco: CocoJson,
    pub files: SplitFiles,
}

/// Loads and validates a split. Empty images are dropped only from the
/// training split, and only with `data.drop_empty`.
pub fn load_split(cfg: &DataConfig, split: &str) -> Result<LoadedSplit> {
    let files = split_files(cfg, split)?;
    let options = LoadOptions { label_mode: cfg.label_mode, drop_empty: cfg.drop_empty && split == "train" };
    let coco = read_coco_json(&files.annotations)?;
    let dataset = Dataset::from_coco(&coco, options).with_context(|| files.annotations.display().to_string())?;
    Ok(LoadedSplit { dataset, coco, files })
}
