//! The training loop: batches -> forward -> matching and losses -> backward
//! -> optimiser, with logging, checkpoints, periodic evaluation on the val
//! split and exact resumption.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::VarMap;

use super::checkpoint::{self, Checkpoint, TrainState};
use super::distributed::{any_rank, Collective};
use super::progress::{MetricsEntry, MetricsLog, Progress, Window};
use super::schedule::learning_rate;
use super::step::{compute_dtype, StepOutcome, StepRunner};
use crate::config::Config;
use crate::data::coco::{CategoryMap, CocoJson};
use crate::data::loader::{Batch, Loader};
use crate::data::source::load_split;
use crate::eval::{write_eval_json, EvalResult};
use crate::hub::resolve_weights;
use crate::inference::evaluate_split;
use crate::model::retinanet::RetinaNet;
use crate::model::weights::{self, LoadMode};
use crate::viz::plot::{write_panels, Panel};

/// Files of a run folder (DESIGN.md section 2).
#[derive(Debug, Clone)]
pub struct RunPaths {
    pub root: PathBuf,
}

impl RunPaths {
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
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
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
}

/// A fresh run folder: `runs/<name>`, or with `-2`, `-3`, ... if taken.
pub fn new_run_folder(name: &str) -> PathBuf {
    let base = PathBuf::from("runs").join(name);
    let mut candidate = base.clone();
    let mut n = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{}-{n}", base.display()));
        n += 1;
    }
    candidate
}

/// A checkpoint folder from `--resume`: a run folder (its `last`) or a
/// checkpoint folder; returns (run folder, checkpoint folder).
pub fn resume_paths(resume: &Path) -> Result<(PathBuf, PathBuf)> {
    let last = resume.join("checkpoints").join("last");
    if last.join(checkpoint::STATE_FILE).is_file() {
        return Ok((resume.to_path_buf(), last));
    }
    if resume.join(checkpoint::STATE_FILE).is_file() {
        let run = resume.parent().and_then(Path::parent).context("--resume: a checkpoint folder must sit in a run")?;
        return Ok((run.to_path_buf(), resume.to_path_buf()));
    }
    bail!("--resume {}: neither a run folder with checkpoints/last nor a checkpoint folder", resume.display())
}

/// How a run ended.
pub struct TrainOutcome {
    pub run: RunPaths,
    pub steps: usize,
    /// Stopped by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// The final evaluation on the val split (absent when interrupted).
    pub final_eval: Option<EvalResult>,
}

/// The val split, ready to evaluate.
struct ValSplit {
    loader: Loader,
    ground_truth: CocoJson,
}

/// What the logging rank (rank 0, the only one in a single-process run)
/// shows and writes; the other ranks of a data-parallel run have none.
struct Reporting {
    metrics: MetricsLog,
    progress: Progress,
}

pub struct Trainer {
    config: Config,
    device: Device,
    run: RunPaths,
    runner: StepRunner,
    categories: CategoryMap,
    loader: Loader,
    val: ValSplit,
    state: TrainState,
    total_steps: usize,
    /// Present on the rank that logs, evaluates and checkpoints.
    reporting: Option<Reporting>,
}

impl Trainer {
    /// Prepares a run: data, model (fresh, pretrained, or from `resume`'s
    /// checkpoint), optimiser, and the run folder with `config.toml`.
    /// `collective` is this process's data-parallel group (`SingleProcess`
    /// when alone); only its rank 0 writes to the run folder.
    pub fn new(
        mut config: Config,
        device: Device,
        out: Option<PathBuf>,
        resume: Option<&Path>,
        collective: Box<dyn Collective>,
    ) -> Result<Self> {
        compute_dtype(config.train.precision)?; // before anything is written
        let train = load_split(&config.data, "train")?;
        if train.dataset.images.is_empty() {
            bail!("{}: the training split has no images", train.files.annotations.display());
        }
        let val = load_split(&config.data, "val")?;
        for split in [&train, &val] {
            for line in split.dataset.report.warnings(&split.files.annotations) {
                eprintln!("warning: {line}");
            }
        }
        // Images without boxes are welcome as negatives, but a split of
        // nothing else has nothing to learn (the warnings above say when
        // every box was dropped as degenerate).
        if train.dataset.images.iter().all(|image| image.crowd.iter().all(|&crowd| crowd)) {
            bail!(
                "{}: none of the {} training images has a box to learn from (crowd boxes do not count)",
                train.files.annotations.display(),
                train.dataset.images.len()
            );
        }
        let shard = collective.shard();
        let global_batch = config.train.batch_size * shard.world;
        if shard.world > 1 && train.dataset.images.len() < global_batch {
            bail!(
                "{}: {} training images are fewer than one batch of {} per GPU on {} GPUs",
                train.files.annotations.display(),
                train.dataset.images.len(),
                config.train.batch_size,
                shard.world
            );
        }
        let categories = train.dataset.categories.clone();
        let num_classes = resolve_num_classes(&mut config, &categories)?;
        let leader = shard.rank == 0;

        let (run_root, checkpoint) = match resume {
            Some(path) => {
                let (run, ckpt) = resume_paths(path)?;
                (run, Some(checkpoint::load(&ckpt, &device)?))
            }
            None => (out.unwrap_or_else(|| new_run_folder(&config.name)), None),
        };
        let run = RunPaths { root: run_root };
        if leader {
            std::fs::create_dir_all(&run.root).with_context(|| format!("cannot create {}", run.root.display()))?;
            std::fs::write(run.config(), config.to_toml())
                .with_context(|| format!("cannot write {}", run.config().display()))?;
        }

        let (model, varmap, notes) = build_model(&config, num_classes, &device, checkpoint.as_ref())?;
        for note in notes.iter().filter(|_| leader) {
            eprintln!("note: {note}");
        }
        let mut runner = StepRunner::new(model, varmap, &config, &device)?.with_collective(collective);
        let state = match checkpoint {
            Some(ckpt) => {
                runner.optimizer.load_state(ckpt.optimizer, ckpt.state.optimizer_steps)?;
                runner.normalizer.ema = ckpt.state.normalizer_ema;
                ckpt.state
            }
            None => TrainState {
                step: 0,
                epoch: 0,
                batch_in_epoch: 0,
                optimizer_steps: 0,
                normalizer_ema: runner.normalizer.ema,
                best_ap: None,
                best_step: None,
                seed: config.train.seed,
            },
        };
        let loader = Loader::for_split(&config, train, true).with_shard(shard);
        let total_steps = match config.train.max_steps {
            0 => config.train.epochs * loader.batches_per_epoch(),
            n => n,
        };
        let ground_truth = val.coco.clone();
        let val = ValSplit { loader: Loader::for_split(&config, val, false), ground_truth };
        let reporting = match leader {
            true => Some(Reporting {
                metrics: MetricsLog::open(&run.metrics(), resume.map(|_| state.step))?,
                progress: Progress::new(total_steps, state.step),
            }),
            false => None,
        };
        Ok(Self { config, device, run, runner, categories, loader, val, state, total_steps, reporting })
    }

    pub fn run_paths(&self) -> &RunPaths {
        &self.run
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Trains until `total_steps` or until `stop` is set (then a checkpoint
    /// is saved and the outcome says so). Every rank of a data-parallel run
    /// calls this; rank 0 alone logs, evaluates and saves.
    pub fn run(mut self, stop: &AtomicBool) -> Result<TrainOutcome> {
        let world = self.runner.collective().shard().world;
        let mut window = Window::start();
        while self.state.step < self.total_steps {
            let epoch = self.state.epoch;
            let batches = self.loader.epoch(epoch, self.state.batch_in_epoch)?;
            for batch in batches {
                let batch = batch?;
                let lr = learning_rate(&self.config.train, self.state.step, self.total_steps);
                let (loss_cls, loss_box) = self.train_step(&batch, lr)?;
                window.add(loss_cls, loss_box, batch.targets.len() * world);
                self.advance();
                let step = self.state.step;
                if step.is_multiple_of(self.config.train.log_every.max(1)) || step == self.total_steps {
                    let entry = window.take(step, epoch, lr);
                    if let Some(report) = &mut self.reporting {
                        report.progress.show(&entry);
                        report.metrics.push(entry)?;
                    }
                }
                if any_rank(self.runner.collective(), stop.load(Ordering::Relaxed), &self.device)? {
                    self.save("last")?;
                    self.finish_progress();
                    return Ok(self.outcome(true, None));
                }
                if step.is_multiple_of(self.config.train.checkpoint_every.max(1)) && step < self.total_steps {
                    self.save("last")?;
                }
                if step == self.total_steps {
                    break;
                }
            }
            let finished_epoch = self.state.batch_in_epoch == 0 && self.state.epoch == epoch + 1;
            let every = self.config.train.eval_every;
            if finished_epoch && every > 0 && (epoch + 1).is_multiple_of(every) && self.state.step < self.total_steps {
                self.evaluate()?;
            }
        }
        self.finish_progress();
        let result = self.evaluate()?;
        self.save("last")?;
        let skipped = self.loader.skipped_images() + self.val.loader.skipped_images();
        if skipped > 0 {
            eprintln!("warning: skipped {skipped} unreadable image load(s) (data.skip_bad_images)");
        }
        Ok(self.outcome(false, result))
    }

    fn finish_progress(&self) {
        if let Some(report) = &self.reporting {
            report.progress.finish();
        }
    }

    fn outcome(&self, interrupted: bool, final_eval: Option<EvalResult>) -> TrainOutcome {
        TrainOutcome { run: self.run.clone(), steps: self.state.step, interrupted, final_eval }
    }

    /// Moves the position one batch on, across an epoch boundary if needed.
    fn advance(&mut self) {
        self.state.step += 1;
        self.state.batch_in_epoch += 1;
        if self.state.batch_in_epoch == self.loader.batches_per_epoch() {
            self.state.epoch += 1;
            self.state.batch_in_epoch = 0;
        }
    }

    /// One optimiser step; returns the two loss terms. A non-finite loss or
    /// gradient stops the run with what is needed to find the cause.
    fn train_step(&mut self, batch: &Batch, lr: f64) -> Result<(f64, f64)> {
        match self.runner.step(batch, lr)? {
            StepOutcome::Updated { loss_cls, loss_box, .. } => {
                self.state.optimizer_steps = self.runner.optimizer.steps();
                self.state.normalizer_ema = self.runner.normalizer.ema;
                Ok((loss_cls, loss_box))
            }
            StepOutcome::NonFinite { what, detail } => bail!(self.non_finite(what, batch, &detail)),
        }
    }

    /// The message for a non-finite loss or gradient (detectron2 raises
    /// FloatingPointError; this also says which images and what to try).
    fn non_finite(&self, what: &str, batch: &Batch, terms: &str) -> String {
        let ids: Vec<u64> = batch.targets.iter().map(|t| t.image_id).collect();
        let folder = self.run.checkpoints().join("last");
        let last = match checkpoint::read_state(&folder) {
            Ok(state) => format!("the last good checkpoint is {} (step {})", folder.display(), state.step),
            Err(_) => "no checkpoint was written yet".to_string(),
        };
        format!(
            "step {}: the {what} is not finite ({terms}) on image ids {ids:?}; {last}; \
             try a lower train.lr, more train.warmup_steps or train.clip_grad_norm, and check these images' boxes",
            self.state.step + 1
        )
    }

    /// Evaluates on the val split; logs it, writes eval.json, keeps `best`,
    /// redraws loss.png. Only the logging rank evaluates (the others return
    /// `None`).
    fn evaluate(&mut self) -> Result<Option<EvalResult>> {
        let Some(report) = &mut self.reporting else {
            return Ok(None);
        };
        let total = self.val.loader.len_images();
        report.progress.println(&format!("evaluating on {total} val images at step {}", self.state.step));
        let started = Instant::now();
        let (result, _) = evaluate_split(
            &self.runner.model,
            &self.val.loader,
            &self.val.ground_truth,
            &self.categories,
            &self.device,
            |_| {},
        )?;
        write_eval_json(&self.run.eval_json(), &result, started.elapsed().as_secs_f64())?;
        let ap = result.stats[0];
        report.progress.println(&format!("step {}: AP {:.4} AP50 {:.4}", self.state.step, ap, result.stats[1]));
        report.metrics.push(MetricsEntry::Eval {
            step: self.state.step,
            epoch: self.state.epoch,
            stats: result.stats.to_vec(),
        })?;
        write_loss_plot(&self.run.loss_png(), &report.metrics.entries)?;
        if self.state.best_ap.is_none_or(|best| ap > best) {
            self.state.best_ap = Some(ap);
            self.state.best_step = Some(self.state.step);
            self.save("best")?;
        }
        Ok(Some(result))
    }

    /// Writes a checkpoint and points `name` ("last" or "best") at it (on
    /// the logging rank; the others have the same model and write nothing).
    fn save(&self, name: &str) -> Result<()> {
        if self.reporting.is_none() {
            return Ok(());
        }
        let data = self.runner.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let model = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        drop(data);
        let ckpt = Checkpoint {
            model,
            optimizer: self.runner.optimizer.state_tensors(),
            state: self.state.clone(),
            config_toml: self.config.to_toml(),
        };
        checkpoint::save(&self.run.checkpoints(), name, &ckpt)?;
        Ok(())
    }
}

/// Fills `data.classes` and returns the classification width:
/// `model.num_classes`, or the dataset's when 0.
fn resolve_num_classes(config: &mut Config, categories: &CategoryMap) -> Result<usize> {
    config.data.classes = categories.categories().iter().map(|c| c.name.clone()).collect();
    config.data.category_ids = categories.categories().iter().map(|c| c.id).collect();
    let needed = categories.num_labels();
    match config.model.num_classes {
        0 => {
            config.model.num_classes = needed;
            Ok(needed)
        }
        n if n < needed => {
            bail!("config key model.num_classes: {n} is fewer than the {needed} labels the dataset needs")
        }
        n => Ok(n),
    }
}

/// The model, fresh or from a checkpoint or pretrained weights.
fn build_model(
    config: &Config,
    num_classes: usize,
    device: &Device,
    checkpoint: Option<&Checkpoint>,
) -> Result<(RetinaNet, VarMap, Vec<String>)> {
    let loaded = match checkpoint {
        Some(ckpt) => {
            weights::build(&config.model, num_classes, device, config.train.seed, Some((&ckpt.model, LoadMode::Exact)))?
        }
        None if !config.model.backbone.weights.is_empty() => {
            let path = resolve_weights(&config.model.backbone.weights, None)?;
            let tensors = weights::read_safetensors(&path)?;
            // A whole detector (torchvision names) or only an ImageNet backbone.
            let mode = if tensors.keys().any(|k| k.starts_with(weights::BODY_PREFIX)) {
                LoadMode::NewClasses
            } else {
                LoadMode::Backbone
            };
            weights::build(&config.model, num_classes, device, config.train.seed, Some((&tensors, mode)))
                .with_context(|| format!("weights {}", path.display()))?
        }
        None => weights::build(&config.model, num_classes, device, config.train.seed, None)?,
    };
    Ok((loaded.model, loaded.varmap, loaded.notes))
}

/// loss.png: the loss terms and the learning rate against the step.
pub fn write_loss_plot(path: &Path, entries: &[MetricsEntry]) -> Result<()> {
    let mut series: [Vec<(f64, f64)>; 4] = Default::default();
    for e in entries {
        if let MetricsEntry::Train { step, loss, loss_cls, loss_box, lr, .. } = e {
            let x = *step as f64;
            for (s, y) in series.iter_mut().zip([*loss, *loss_cls, *loss_box, *lr]) {
                s.push((x, y));
            }
        }
    }
    let [total, cls, bx, lr] = series;
    let panels = [
        Panel {
            title: "training loss".into(),
            x_desc: "step".into(),
            y_desc: "loss".into(),
            series: vec![("total".into(), total), ("classification".into(), cls), ("box regression".into(), bx)],
        },
        Panel {
            title: "learning rate".into(),
            x_desc: "step".into(),
            y_desc: "lr".into(),
            series: vec![("lr".into(), lr)],
        },
    ];
    write_panels(path, &panels, (800, 360))
}
