//! The run folder: what a training run writes, and the rules for finding
//! a checkpoint to resume and the weights that `--weights` names. The one
//! owner of the layout (docs/FORMATS.md):
//!
//! ```text
//! runs/<name>/
//!   config.toml     the resolved config, classes included
//!   metrics.jsonl   one JSON object per log step and per evaluation
//!   eval.json       the last evaluation
//!   loss.png        loss terms and learning rate
//!   checkpoints/    last and best (see `checkpoint`)
//! ```

mod checkpoint;
mod hub;
mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use checkpoint::{
    load_checkpoint, read_state, Checkpoint, CheckpointKind, CheckpointStore, TrainState, CONFIG_FILE,
};
pub use weights::{read_weights, resolve_weights_spec, write_weights, WeightsSource};

/// Where new run folders go when `--out` is not given.
const RUNS_DIR: &str = "runs";

/// A run folder and the files in it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFolder {
    root: PathBuf,
}

impl RunFolder {
    /// The run folder at `root` (which need not exist yet).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `runs/<name>`, or `runs/<name>-2`, `-3`, ... if taken.
    pub fn unused(name: &str) -> Self {
        let base = PathBuf::from(RUNS_DIR).join(name);
        let mut candidate = base.clone();
        let mut n = 2;
        while candidate.exists() {
            candidate = PathBuf::from(format!("{}-{n}", base.display()));
            n += 1;
        }
        Self { root: candidate }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    pub fn eval_json(&self) -> PathBuf {
        self.root.join("eval.json")
    }

    pub fn loss_png(&self) -> PathBuf {
        self.root.join("loss.png")
    }

    /// The `checkpoints/` folder.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// The folder of the `last` or `best` checkpoint.
    pub fn checkpoint(&self, kind: CheckpointKind) -> PathBuf {
        self.checkpoints().join(kind.link_name())
    }

    /// Creates the folder and writes the resolved config into it.
    pub fn create(&self, config_toml: &str) -> Result<()> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("cannot create {}", self.root.display()))?;
        std::fs::write(self.config(), config_toml).with_context(|| format!("cannot write {}", self.config().display()))
    }

    /// A run folder if `path` is one: its `best` checkpoint, else `last`.
    fn best_or_last(&self) -> Option<PathBuf> {
        [CheckpointKind::Best, CheckpointKind::Last]
            .into_iter()
            .map(|kind| self.checkpoint(kind))
            .find(|folder| checkpoint::is_checkpoint(folder))
    }
}

/// Where `--resume` continues from: a run folder (its `last` checkpoint) or
/// a checkpoint folder inside a run.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumePoint {
    pub run: RunFolder,
    /// The checkpoint folder to load.
    pub checkpoint: PathBuf,
}

impl ResumePoint {
    pub fn locate(path: &Path) -> Result<Self> {
        let run = RunFolder::at(path);
        let last = run.checkpoint(CheckpointKind::Last);
        if checkpoint::is_checkpoint(&last) {
            return Ok(Self { run, checkpoint: last });
        }
        if checkpoint::is_checkpoint(path) {
            let root =
                path.parent().and_then(Path::parent).context("--resume: a checkpoint folder must sit in a run")?;
            return Ok(Self { run: RunFolder::at(root), checkpoint: path.to_path_buf() });
        }
        bail!("--resume {}: neither a run folder with checkpoints/last nor a checkpoint folder", path.display())
    }

    /// The config saved with the checkpoint.
    pub fn config_file(&self) -> PathBuf {
        self.checkpoint.join(CONFIG_FILE)
    }
}
