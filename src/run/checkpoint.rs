//! Checkpoints that a crash never leaves half-written.
//!
//! Layout inside a run's `checkpoints/` folder:
//! ```text
//! step-00001000/   model.safetensors optimizer.safetensors state.json config.toml
//!                  [train_weights.safetensors]
//! last -> step-00001000   (symbolic link)
//! best -> step-00000500
//! ```
//! A checkpoint is written into a temporary folder, synced, renamed to its
//! `step-N` name, and only then is the `last`/`best` link swapped, by
//! renaming a new link over the old one (atomic on POSIX). At every moment
//! `last` names a complete checkpoint. Folders no link names are removed.
//! A folder name another run left (a resumed run reaching a step of the run
//! it replaced) gets a suffix, `step-00001000-2`: a save always writes the
//! weights it is given.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// File names inside a checkpoint folder (the run folder's config has the
/// same name).
pub(super) const MODEL_FILE: &str = "model.safetensors";
/// With `train.ema_decay`: the weights the optimiser updates, while
/// `model.safetensors` holds their average (what eval and predict use).
const TRAIN_WEIGHTS_FILE: &str = "train_weights.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";

/// The two checkpoints a run keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    /// The latest: where `--resume` continues.
    Last,
    /// The best val AP so far: what `eval` and `predict` use.
    Best,
}

impl CheckpointKind {
    /// The name of its link in `checkpoints/`.
    pub fn link_name(self) -> &'static str {
        match self {
            Self::Last => "last",
            Self::Best => "best",
        }
    }
}

/// True when `folder` (or the link) holds a checkpoint.
pub(super) fn is_checkpoint(folder: &Path) -> bool {
    folder.join(STATE_FILE).is_file()
}

/// Everything besides tensors that resuming needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index within `epoch` of the next batch.
    pub batch_in_epoch: usize,
    /// Optimiser steps counted by the optimiser (AdamW bias correction).
    pub optimizer_steps: u64,
    /// detectron2's EMA loss normaliser.
    pub normalizer_ema: f64,
    /// Best val AP so far and the step it was reached at.
    pub best_ap: Option<f64>,
    pub best_step: Option<usize>,
    pub seed: u64,
    /// Evaluations since the best one (`train.patience`).
    #[serde(default)]
    pub evals_since_best: usize,
    /// Updates of the weight average (`train.ema_decay`).
    #[serde(default)]
    pub ema_updates: u64,
}

/// What a checkpoint holds.
pub struct Checkpoint {
    /// The weights to use: the average with `train.ema_decay`.
    pub model: HashMap<String, Tensor>,
    /// With `train.ema_decay`: the weights the optimiser updates.
    pub train_weights: Option<HashMap<String, Tensor>>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
    pub config_toml: String,
}

/// Writes a run's checkpoints into its `checkpoints/` folder.
pub struct CheckpointStore {
    dir: PathBuf,
    /// The step and folder name of the checkpoint this store wrote last.
    written: Option<(usize, String)>,
}

impl CheckpointStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, written: None }
    }

    /// Writes `ckpt` into a new `step-N` folder and points the `kind` link
    /// at it. Saving the step this store has just written again (`best`
    /// and `last` after the same evaluation) only points the link: the
    /// weights are the same. A folder of that step left by another run (a
    /// run abandoned past the checkpoint this one resumed from) is never
    /// reused: the new folder gets a suffix (`step-N-2`) and the old one
    /// goes once no link names it.
    pub fn save(&mut self, kind: CheckpointKind, ckpt: &Checkpoint) -> Result<PathBuf> {
        let step = ckpt.state.step;
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let folder_name = match &self.written {
            Some((written, name)) if *written == step => name.clone(),
            _ => {
                let name = self.unused_folder_name(step);
                write_folder(&self.dir, &self.dir.join(&name), ckpt)?;
                self.written = Some((step, name.clone()));
                name
            }
        };
        point_link(&self.dir, kind.link_name(), &folder_name)?;
        remove_unlinked(&self.dir);
        Ok(self.dir.join(folder_name))
    }

    /// `step-N`, or `step-N-2`, `-3`, ... when another run left that name.
    fn unused_folder_name(&self, step: usize) -> String {
        let base = format!("step-{step:08}");
        let mut name = base.clone();
        let mut n = 2;
        while self.dir.join(&name).exists() {
            name = format!("{base}-{n}");
            n += 1;
        }
        name
    }
}

fn write_folder(checkpoints: &Path, folder: &Path, ckpt: &Checkpoint) -> Result<()> {
    let tmp = checkpoints.join(format!(".tmp-{}-{}", ckpt.state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let written = (|| -> Result<()> {
        candle_core::safetensors::save(&ckpt.model, tmp.join(MODEL_FILE))?;
        candle_core::safetensors::save(&ckpt.optimizer, tmp.join(OPTIMIZER_FILE))?;
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&ckpt.state)?)?;
        std::fs::write(tmp.join(CONFIG_FILE), &ckpt.config_toml)?;
        let mut files = vec![MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE];
        if let Some(train_weights) = &ckpt.train_weights {
            candle_core::safetensors::save(train_weights, tmp.join(TRAIN_WEIGHTS_FILE))?;
            files.push(TRAIN_WEIGHTS_FILE);
        }
        for f in files {
            File::open(tmp.join(f))?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(err) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err).with_context(|| format!("cannot write checkpoint into {}", checkpoints.display()));
    }
    std::fs::rename(&tmp, folder).with_context(|| format!("cannot move checkpoint to {}", folder.display()))?;
    sync_dir(checkpoints);
    Ok(())
}

/// Swaps `checkpoints/<name>` to point at `target` by renaming a fresh link
/// over it.
fn point_link(checkpoints: &Path, name: &str, target: &str) -> Result<()> {
    let link = checkpoints.join(name);
    let tmp = checkpoints.join(format!(".{name}.link-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    symlink_dir(target, &tmp).with_context(|| format!("cannot create link {}", tmp.display()))?;
    std::fs::rename(&tmp, &link).with_context(|| format!("cannot update {}", link.display()))?;
    sync_dir(checkpoints);
    Ok(())
}

#[cfg(unix)]
fn symlink_dir(target: &str, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink_dir(target: &str, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_dir(target, link)
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the renames durable; not all systems allow it.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Removes `step-N` folders and leftovers that no link points at.
fn remove_unlinked(checkpoints: &Path) {
    let linked: Vec<PathBuf> = [CheckpointKind::Last, CheckpointKind::Best]
        .iter()
        .filter_map(|kind| std::fs::read_link(checkpoints.join(kind.link_name())).ok())
        .collect();
    let Ok(entries) = std::fs::read_dir(checkpoints) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_step = name.starts_with("step-");
        let is_stale_tmp = name.starts_with(".tmp-") && !name.ends_with(&format!("-{}", std::process::id()));
        if (is_step && !linked.iter().any(|l| l.as_os_str() == entry.file_name())) || is_stale_tmp {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reads only the `state.json` of a checkpoint folder.
pub fn read_state(folder: &Path) -> Result<TrainState> {
    let state_path = folder.join(STATE_FILE);
    if !is_checkpoint(folder) {
        bail!("{}: not a checkpoint folder (no {STATE_FILE})", folder.display());
    }
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid checkpoint state", state_path.display()))
}

/// Reads a checkpoint folder (or a link to one).
pub fn load_checkpoint(folder: &Path, device: &Device) -> Result<Checkpoint> {
    let state = read_state(folder)?;
    let read_tensors = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = folder.join(file);
        candle_core::safetensors::load(&path, device)
            .with_context(|| format!("{}: not a readable safetensors file", path.display()))
    };
    let config_path = folder.join(CONFIG_FILE);
    let train_weights = match folder.join(TRAIN_WEIGHTS_FILE).is_file() {
        true => Some(read_tensors(TRAIN_WEIGHTS_FILE)?),
        false => None,
    };
    Ok(Checkpoint {
        model: read_tensors(MODEL_FILE)?,
        train_weights,
        optimizer: read_tensors(OPTIMIZER_FILE)?,
        state,
        config_toml: std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(step: usize, value: f32) -> Checkpoint {
        let t = Tensor::new(&[value, value], &Device::Cpu).unwrap();
        Checkpoint {
            model: HashMap::from([("w".to_string(), t.clone())]),
            train_weights: None,
            optimizer: HashMap::from([("first.w".to_string(), t)]),
            state: TrainState {
                step,
                epoch: 0,
                batch_in_epoch: step,
                optimizer_steps: step as u64,
                normalizer_ema: 100.0,
                best_ap: None,
                best_step: None,
                seed: 0,
                evals_since_best: 0,
                ema_updates: 0,
            },
            config_toml: "name = \"t\"\n".into(),
        }
    }

    /// A path `name`, not yet made, in a temp folder removed when the
    /// returned guard is dropped.
    fn temp(name: &str) -> (tempfile::TempDir, PathBuf) {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join(name);
        (scratch, dir)
    }

    use CheckpointKind::{Best, Last};

    #[test]
    fn last_and_best_links_and_garbage_collection() {
        let (_scratch, dir) = temp("links");
        let mut store = CheckpointStore::new(dir.clone());
        store.save(Last, &checkpoint(10, 1.0)).unwrap();
        store.save(Best, &checkpoint(10, 1.0)).unwrap();
        store.save(Last, &checkpoint(20, 2.0)).unwrap();
        store.save(Last, &checkpoint(30, 3.0)).unwrap();
        let last = load_checkpoint(&dir.join("last"), &Device::Cpu).unwrap();
        assert_eq!(last.state.step, 30);
        assert_eq!(last.model["w"].to_vec1::<f32>().unwrap(), vec![3.0, 3.0]);
        assert_eq!(load_checkpoint(&dir.join("best"), &Device::Cpu).unwrap().state.step, 10);
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec!["best", "last", "step-00000010", "step-00000030"]);
    }

    #[test]
    fn a_failed_write_keeps_the_previous_checkpoint() {
        let (_scratch, dir) = temp("fail");
        let mut store = CheckpointStore::new(dir.clone());
        store.save(Last, &checkpoint(1, 1.0)).unwrap();
        // A file where the temporary folder goes makes the write fail, as a
        // full disk would, even for root.
        let blocker = dir.join(format!(".tmp-2-{}", std::process::id()));
        std::fs::write(&blocker, b"in the way").unwrap();
        let err = store.save(Last, &checkpoint(2, 2.0)).err().unwrap();
        assert!(format!("{err:#}").contains("cannot create"), "{err:#}");
        assert_eq!(load_checkpoint(&dir.join("last"), &Device::Cpu).unwrap().state.step, 1);
    }

    #[test]
    fn a_step_another_run_left_is_written_anew() {
        let (_scratch, dir) = temp("resumed");
        let mut abandoned = CheckpointStore::new(dir.clone());
        abandoned.save(Best, &checkpoint(10, 1.0)).unwrap();
        abandoned.save(Last, &checkpoint(20, 2.0)).unwrap();
        // A run resumed from step 10 with other settings reaches step 20.
        let mut resumed = CheckpointStore::new(dir.clone());
        resumed.save(Last, &checkpoint(20, 5.0)).unwrap();
        resumed.save(Best, &checkpoint(20, 5.0)).unwrap();
        for kind in ["last", "best"] {
            let ckpt = load_checkpoint(&dir.join(kind), &Device::Cpu).unwrap();
            assert_eq!(ckpt.model["w"].to_vec1::<f32>().unwrap(), vec![5.0, 5.0], "{kind}");
        }
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec!["best", "last", "step-00000020-2"]);
    }

    #[test]
    fn loading_a_non_checkpoint_names_it() {
        let (_scratch, dir) = temp("none");
        std::fs::create_dir_all(&dir).unwrap();
        let err = load_checkpoint(&dir, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("not a checkpoint folder"), "{err}");
    }
}
