//! The training loop: batches -> forward -> matching and losses -> backward
//! -> optimiser, with the run folder's metrics, checkpoints, periodic
//! evaluation on the val split and exact resumption. It prints nothing: it
//! reports [`TrainEvent`]s, which `retinanet train` shows.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::distributed::{any_rank, Collective};
use super::metrics::{write_loss_plot, MetricsEntry, MetricsLog, Window};
use super::schedule::learning_rate;
use super::step::{compute_dtype, StepOutcome, StepRunner, StepValues};
use crate::config::Config;
use crate::data::{load_split, Batch, CategoryMap, CocoJson, LoadedSplit, Loader, Shard};
use crate::eval::{write_eval_json, EvalResult};
use crate::infer::evaluate_split;
use crate::model::{self, LoadMode, LoadedModel};
use crate::run::{
    load_checkpoint, read_state, read_weights, resolve_weights_spec, Checkpoint, CheckpointKind, CheckpointStore,
    ResumePoint, RunFolder, TrainState,
};

/// What a run reports as it goes, for a person to see. The trainer writes
/// the run folder itself; events only say what happened.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// A problem that does not stop the run (a repaired box, a skipped image).
    Warning(String),
    /// What loading weights did (a re-initialised classification layer).
    Note(String),
    /// Training starts at `start_step` of `total_steps`.
    Started { run: &'a RunFolder, start_step: usize, total_steps: usize },
    /// The averages of one log step, as written to `metrics.jsonl`.
    Logged(&'a MetricsEntry),
    /// An evaluation on the `images` of the val split starts.
    Evaluating { step: usize, images: usize },
    /// Its result.
    Evaluated { step: usize, result: &'a EvalResult },
}

/// Receives a run's events.
pub type EventSink = Box<dyn FnMut(TrainEvent<'_>)>;

/// How a run ended.
pub struct TrainOutcome {
    pub run: RunFolder,
    pub steps: usize,
    /// Stopped by `stop` (a checkpoint was saved).
    pub interrupted: bool,
    /// The final evaluation on the val split (absent when interrupted, and
    /// on the ranks that do not evaluate).
    pub final_eval: Option<EvalResult>,
}

/// Where a run starts: a fresh run folder, or a checkpoint to continue.
pub enum Start {
    /// A new run in this folder (`None`: `runs/<name>`, suffixed if taken).
    New { out: Option<PathBuf> },
    /// Continue exactly from a run or checkpoint folder (`--resume`).
    Resume(ResumePoint),
}

/// The train and val splits of a run, checked.
struct Splits {
    train: LoadedSplit,
    val: LoadedSplit,
}

/// The val split, ready to evaluate.
struct ValSplit {
    loader: Loader,
    ground_truth: CocoJson,
}

/// What the logging rank (rank 0, the only one in a single-process run)
/// writes; the other ranks of a data-parallel run have none.
struct RunFiles {
    metrics: MetricsLog,
    checkpoints: CheckpointStore,
}

pub struct Trainer {
    config: Config,
    device: Device,
    run: RunFolder,
    runner: StepRunner,
    categories: CategoryMap,
    loader: Loader,
    val: ValSplit,
    state: TrainState,
    total_steps: usize,
    /// Present on the rank that logs, evaluates and checkpoints.
    files: Option<RunFiles>,
    /// The latest evaluation and its step, reused when the run ends there.
    last_eval: Option<(usize, EvalResult)>,
    events: EventSink,
}

impl Trainer {
    /// Prepares a run: checks the data, builds the model (fresh, pretrained
    /// or from the checkpoint it resumes), makes the run folder, restores
    /// the optimiser and starts the loaders. `collective` is this process's
    /// data-parallel group (`SingleProcess` when alone); only its rank 0
    /// writes to the run folder. Nothing is written when a check fails.
    pub fn new(
        mut config: Config,
        device: Device,
        start: Start,
        collective: Box<dyn Collective>,
        mut events: EventSink,
    ) -> Result<Self> {
        compute_dtype(config.train.precision)?;
        let shard = collective.shard();
        let splits = load_splits(&config, shard, &mut events)?;
        let categories = splits.train.dataset.categories.clone();
        let num_classes = resolve_num_classes(&mut config, &categories)?;
        let (run, checkpoint) = match start {
            Start::New { out } => (out.map_or_else(|| RunFolder::unused(&config.name), RunFolder::at), None),
            Start::Resume(point) => (point.run, Some(load_checkpoint(&point.checkpoint, &device)?)),
        };
        let loaded = build_model(&config, num_classes, &device, checkpoint.as_ref())?;
        loaded.notes.iter().for_each(|note| events(TrainEvent::Note(note.clone())));
        let leader = shard.rank == 0;
        if leader {
            run.create(&config.to_toml())?;
        }
        let mut runner = StepRunner::new(loaded, &config, &device)?.with_collective(collective);
        let resumed = checkpoint.is_some();
        let state = restore(&mut runner, checkpoint, config.train.seed)?;
        let (loader, val) = start_loaders(&config, splits, shard);
        let total_steps = match config.train.max_steps {
            0 => config.train.epochs * loader.batches_per_epoch(),
            n => n,
        };
        let files = match leader {
            true => Some(RunFiles {
                metrics: MetricsLog::open(&run.metrics(), resumed.then_some(state.step))?,
                checkpoints: CheckpointStore::new(run.checkpoints()),
            }),
            false => None,
        };
        Ok(Self {
            config,
            device,
            run,
            runner,
            categories,
            loader,
            val,
            state,
            total_steps,
            files,
            last_eval: None,
            events,
        })
    }

    /// Trains until the last step or until `stop` is set (then a checkpoint
    /// is saved and the outcome says so). Every rank of a data-parallel run
    /// calls this; rank 0 alone writes, evaluates and saves.
    pub fn run(mut self, stop: &AtomicBool) -> Result<TrainOutcome> {
        (self.events)(TrainEvent::Started {
            run: &self.run,
            start_step: self.state.step,
            total_steps: self.total_steps,
        });
        let world = self.runner.collective().shard().world;
        let mut window = Window::start();
        let mut stopped_early = false;
        while self.state.step < self.total_steps && !stopped_early {
            let epoch = self.state.epoch;
            for batch in self.loader.epoch(epoch, self.state.batch_in_epoch)? {
                let batch = batch?;
                let lr = learning_rate(&self.config.train, self.state.step, self.total_steps);
                let values = self.train_step(&batch, lr)?;
                window.add(&values, batch.targets.len() * world);
                self.advance();
                let step = self.state.step;
                if step.is_multiple_of(self.config.train.log_every.max(1)) || step == self.total_steps {
                    self.log(window.take(step, epoch, lr))?;
                }
                if any_rank(self.runner.collective(), stop.load(Ordering::Relaxed), &self.device)? {
                    self.save(CheckpointKind::Last)?;
                    return Ok(self.outcome(true, None));
                }
                if step.is_multiple_of(self.config.train.checkpoint_every.max(1)) && step < self.total_steps {
                    self.save(CheckpointKind::Last)?;
                }
                if step == self.total_steps {
                    break;
                }
                let every_steps = self.config.train.eval_every_steps;
                if every_steps > 0 && step.is_multiple_of(every_steps) && self.periodic_evaluation()? {
                    stopped_early = true;
                    break;
                }
            }
            let finished_epoch = self.state.batch_in_epoch == 0 && self.state.epoch == epoch + 1;
            let every = self.config.train.eval_every;
            let due = finished_epoch && every > 0 && (epoch + 1).is_multiple_of(every);
            if !stopped_early && due && self.state.step < self.total_steps {
                stopped_early = self.periodic_evaluation()?;
            }
        }
        let result = match self.last_eval.take() {
            Some((step, result)) if step == self.state.step => Some(result),
            _ => self.evaluate()?,
        };
        self.save(CheckpointKind::Last)?;
        let skipped = self.loader.skipped_images() + self.val.loader.skipped_images();
        if skipped > 0 {
            let warning = format!("skipped {skipped} unreadable image load(s) (data.skip_bad_images)");
            (self.events)(TrainEvent::Warning(warning));
        }
        Ok(self.outcome(false, result))
    }

    /// An evaluation during the run (unless this step was just evaluated);
    /// true when `train.patience` evaluations in a row found no better AP,
    /// on any rank (only the logging rank evaluates), so every rank stops.
    fn periodic_evaluation(&mut self) -> Result<bool> {
        if self.last_eval.as_ref().is_some_and(|(step, _)| *step == self.state.step) {
            return Ok(false);
        }
        let result = self.evaluate()?;
        let patience = self.config.train.patience;
        let out_of_patience = result.is_some() && patience > 0 && self.state.evals_since_best >= patience;
        if let Some(result) = result {
            self.last_eval = Some((self.state.step, result));
        }
        let stop = any_rank(self.runner.collective(), out_of_patience, &self.device)?;
        if out_of_patience {
            let (best, at) = (self.state.best_ap.unwrap_or(0.0), self.state.best_step.unwrap_or(0));
            let note = format!(
                "stopping early at step {}: no better val AP in {patience} evaluations (train.patience); \
                 the best, AP {best:.3} at step {at}, is checkpoints/best",
                self.state.step
            );
            (self.events)(TrainEvent::Note(note));
        }
        Ok(stop)
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

    /// One optimiser step; returns the two loss terms and the gradient norm.
    /// A non-finite loss or gradient stops the run with what is needed to
    /// find the cause.
    fn train_step(&mut self, batch: &Batch, lr: f64) -> Result<StepValues> {
        match self.runner.step(batch, lr)? {
            StepOutcome::Updated(values) => {
                self.state.optimizer_steps = self.runner.optimizer.steps();
                self.state.normalizer_ema = self.runner.normalizer.ema;
                self.state.ema_updates = self.runner.ema.as_ref().map_or(0, |ema| ema.updates());
                Ok(values)
            }
            StepOutcome::NonFinite { what, detail } => bail!(self.non_finite(what, batch, &detail)),
        }
    }

    /// The message for a non-finite loss or gradient (detectron2 raises
    /// FloatingPointError; this also says which images and what to try).
    fn non_finite(&self, what: &str, batch: &Batch, terms: &str) -> String {
        let ids: Vec<u64> = batch.targets.iter().map(|t| t.image_id).collect();
        let folder = self.run.checkpoint(CheckpointKind::Last);
        let last = match read_state(&folder) {
            Ok(state) => format!("the last good checkpoint is {} (step {})", folder.display(), state.step),
            Err(_) => "no checkpoint was written yet".to_string(),
        };
        format!(
            "step {}: the {what} is not finite ({terms}) on image ids {ids:?}; {last}; \
             try a lower train.lr, more train.warmup_steps or train.clip_grad_norm, and check these images' boxes",
            self.state.step + 1
        )
    }

    /// Writes a log step's averages to `metrics.jsonl` and reports them.
    fn log(&mut self, entry: MetricsEntry) -> Result<()> {
        (self.events)(TrainEvent::Logged(&entry));
        if let Some(files) = &mut self.files {
            files.metrics.push(entry)?;
        }
        Ok(())
    }

    /// Evaluates on the val split; writes eval.json and loss.png, logs the
    /// result and keeps `best`. Only the logging rank evaluates (the others
    /// return `None`).
    fn evaluate(&mut self) -> Result<Option<EvalResult>> {
        let Some(files) = &mut self.files else {
            return Ok(None);
        };
        let step = self.state.step;
        (self.events)(TrainEvent::Evaluating { step, images: self.val.loader.len_images() });
        let started = Instant::now();
        let runner = &mut self.runner;
        // With a weight average, it is what is evaluated (and saved as `best`).
        if let Some(ema) = &mut runner.ema {
            ema.swap()?;
        }
        let evaluated =
            evaluate_split(&runner.inference, &self.val.loader, &self.val.ground_truth, &self.categories, &self.device);
        if let Some(ema) = &mut runner.ema {
            ema.swap()?;
        }
        let (result, _) = evaluated?;
        write_eval_json(&self.run.eval_json(), &result, started.elapsed().as_secs_f64())?;
        files.metrics.push(MetricsEntry::Eval { step, epoch: self.state.epoch, stats: result.stats.to_vec() })?;
        write_loss_plot(&self.run.loss_png(), &files.metrics.entries)?;
        (self.events)(TrainEvent::Evaluated { step, result: &result });
        let ap = result.stats[0];
        if self.state.best_ap.is_none_or(|best| ap > best) {
            self.state.best_ap = Some(ap);
            self.state.best_step = Some(step);
            self.state.evals_since_best = 0;
            self.save(CheckpointKind::Best)?;
        } else {
            self.state.evals_since_best += 1;
        }
        Ok(Some(result))
    }

    /// Writes a checkpoint and points `kind` at it (on the logging rank; the
    /// others have the same model and write nothing).
    fn save(&mut self, kind: CheckpointKind) -> Result<()> {
        let Some(files) = &mut self.files else {
            return Ok(());
        };
        let weights = model::state_dict(&self.runner.varmap);
        let (model, train_weights) = match &self.runner.ema {
            Some(ema) => (ema.state_dict(), Some(weights)),
            None => (weights, None),
        };
        let ckpt = Checkpoint {
            model,
            train_weights,
            optimizer: self.runner.optimizer.state_tensors(),
            state: self.state.clone(),
            config_toml: self.config.to_toml(),
        };
        files.checkpoints.save(kind, &ckpt)?;
        Ok(())
    }
}

/// Reads the train and val splits and checks that the training split has
/// something to learn from (and, over several ranks, a batch for each).
fn load_splits(config: &Config, shard: Shard, events: &mut EventSink) -> Result<Splits> {
    let train = load_split(&config.data, "train")?;
    let annotations = train.files.annotations.display().to_string();
    if train.dataset.images.is_empty() {
        bail!("{annotations}: the training split has no images");
    }
    let val = load_split(&config.data, "val")?;
    for split in [&train, &val] {
        for line in split.dataset.report.warnings(&split.files.annotations) {
            events(TrainEvent::Warning(line));
        }
    }
    // The warnings above say when every box was dropped as degenerate.
    let images = &train.dataset.images;
    if !train.dataset.has_boxes_to_learn() {
        bail!(
            "{annotations}: none of the {} training images has a box to learn from (crowd boxes do not count)",
            images.len()
        );
    }
    if shard.world > 1 && images.len() < config.train.batch_size * shard.world {
        bail!(
            "{annotations}: {} training images are fewer than one batch of {} per GPU on {} GPUs",
            images.len(),
            config.train.batch_size,
            shard.world
        );
    }
    Ok(Splits { train, val })
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

/// The model: from the checkpoint a run resumes, from pretrained weights
/// (`model.backbone.weights`), or fresh.
fn build_model(
    config: &Config,
    num_classes: usize,
    device: &Device,
    checkpoint: Option<&Checkpoint>,
) -> Result<LoadedModel> {
    let (cfg, seed) = (&config.model, config.train.seed);
    if let Some(ckpt) = checkpoint {
        let weights = ckpt.train_weights.as_ref().unwrap_or(&ckpt.model);
        return model::build(cfg, num_classes, device, seed, Some((weights, LoadMode::Exact)));
    }
    if cfg.backbone.weights.is_empty() {
        return model::build(cfg, num_classes, device, seed, None);
    }
    let path = resolve_weights_spec(&cfg.backbone.weights)?;
    let tensors = read_weights(&path)?;
    model::build(cfg, num_classes, device, seed, Some((&tensors, LoadMode::for_pretrained(&tensors))))
        .with_context(|| format!("weights {}", path.display()))
}

/// The optimiser state and position of the checkpoint a run resumes, or
/// those of a fresh run.
fn restore(runner: &mut StepRunner, checkpoint: Option<Checkpoint>, seed: u64) -> Result<TrainState> {
    let Some(ckpt) = checkpoint else {
        return Ok(TrainState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            optimizer_steps: 0,
            normalizer_ema: runner.normalizer.ema,
            best_ap: None,
            best_step: None,
            seed,
            evals_since_best: 0,
            ema_updates: 0,
        });
    };
    runner.optimizer.load_state(ckpt.optimizer, ckpt.state.optimizer_steps)?;
    runner.normalizer.ema = ckpt.state.normalizer_ema;
    // A checkpoint with training weights holds the average in `model`; one
    // without starts a new average (train.ema_decay set on resuming).
    if let (Some(ema), Some(_)) = (&mut runner.ema, &ckpt.train_weights) {
        ema.restore(&ckpt.model, ckpt.state.ema_updates)?;
    }
    Ok(ckpt.state)
}

/// The training loader (this rank's shard of each batch) and the val split.
fn start_loaders(config: &Config, splits: Splits, shard: Shard) -> (Loader, ValSplit) {
    let train = Loader::for_split(config, splits.train, true).with_shard(shard);
    let ground_truth = splits.val.coco.clone();
    let val = ValSplit { loader: Loader::for_split(config, splits.val, false), ground_truth };
    (train, val)
}
