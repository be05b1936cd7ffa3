//! `retinanet bench`: a training step or inference timed on random images
//! with random boxes and a randomly initialised model (no file is read).
//! It lives beside the training step it times; inference is timed through
//! `infer`, as evaluation runs it.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::step::{compute_dtype, StepOutcome, StepRunner};
use crate::config::{BackboneNorm, Config};
use crate::data::{Batch, Target, Transform};
use crate::infer::detect_batch;
use crate::model;

/// What `retinanet bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMode {
    /// A full training step: forward, loss, backward, optimiser.
    Train,
    /// Inference: forward and postprocess.
    Infer,
}

/// Classes of the random model when the config does not fix them (COCO's).
pub(super) const DEFAULT_CLASSES: usize = 80;
/// Untimed steps before timing starts.
pub(super) const WARMUP_STEPS: usize = 2;

/// The `--json` object (docs/CLI.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    pub mode: BenchMode,
    /// Input height (and width unless `width` differs).
    pub size: usize,
    /// Not in the JSON, whose fields the contract fixes.
    #[serde(skip)]
    pub width: usize,
    pub batch: usize,
    pub steps: usize,
    pub seconds_per_step_median: f64,
    pub images_per_second: f64,
    /// Peak resident memory of the process (0 where the OS does not say).
    pub peak_rss_mib: f64,
    /// The peak less the resident memory before the model was built: what
    /// the model, its data and its steps took, comparable with a peer whose
    /// runtime (an interpreter, its libraries) starts larger. Not in the
    /// contract's list: an added key that no reader of the others misses.
    pub peak_rss_model_mib: f64,
}

/// Times `steps` steps of `mode` after [`WARMUP_STEPS`] untimed ones.
pub fn run(
    mut config: Config,
    mode: BenchMode,
    (size, width): (usize, usize),
    batch: usize,
    steps: usize,
    device: &Device,
) -> Result<BenchReport> {
    if size < 32 || width < 32 || batch == 0 || steps == 0 {
        bail!("bench needs --size and --width >= 32, --batch >= 1 and --steps >= 1");
    }
    // The bench loads no weights. Random weights through frozen BatchNorm
    // (the identity) grow without bound over 50 layers and overflow;
    // starting each residual block as the identity keeps every value finite
    // at the same cost per step.
    if config.model.backbone.norm == BackboneNorm::FrozenBn {
        config.model.backbone.zero_init_residual = true;
    }
    if config.model.num_classes == 0 {
        config.model.num_classes =
            if config.data.classes.is_empty() { DEFAULT_CLASSES } else { config.data.classes.len() };
    }
    let start_rss_mib = proc_status_mib("VmRSS");
    let loaded = model::build(&config.model, config.model.num_classes, device, config.train.seed, None)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.train.seed);
    let mut data =
        random_batch(&mut rng, (size, width), batch, config.model.num_classes, &Transform::new(&config.input))?;
    // On the device before timing, as a training loop would keep it
    // prefetched; inference takes it in the compute dtype
    // (`train.precision`), as training does.
    data.images = data.images.to_device(device)?;
    let infer_data = Batch { images: data.images.to_dtype(compute_dtype(config.train.precision)?)?, ..data.clone() };
    let mut runner = StepRunner::new(loaded, &config, device)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..WARMUP_STEPS + steps {
        let started = Instant::now();
        match mode {
            BenchMode::Train => {
                if let StepOutcome::NonFinite { what, detail } = runner.step(&data, config.train.lr)? {
                    bail!("bench: the {what} is not finite ({detail})");
                }
            }
            BenchMode::Infer => {
                detect_batch(&runner.inference, &infer_data, device)?;
            }
        }
        device.synchronize()?;
        if i >= WARMUP_STEPS {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let peak_rss_mib = proc_status_mib("VmHWM");
    Ok(BenchReport {
        mode,
        size,
        width,
        batch,
        steps,
        seconds_per_step_median: median,
        images_per_second: batch as f64 / median,
        peak_rss_mib,
        peak_rss_model_mib: peak_rss_mib - start_rss_mib,
    })
}

/// Normal-noise `height x width` images, zero-padded as the transform pads
/// them, with 1 to 8 random boxes each.
fn random_batch(
    rng: &mut ChaCha8Rng,
    (height, width): (usize, usize),
    batch: usize,
    num_classes: usize,
    transform: &Transform,
) -> Result<Batch> {
    let (pad_h, pad_w) = transform.padded_size([(height, width)]);
    let noise = Tensor::randn(0f32, 1.0, (batch, 3, height, width), &Device::Cpu)?;
    let images = noise.pad_with_zeros(2, 0, pad_h - height)?.pad_with_zeros(3, 0, pad_w - width)?;
    let (h, w) = (height as f32, width as f32);
    let targets = (0..batch)
        .map(|i| {
            let n = rng.random_range(1..=8);
            let boxes: Vec<[f32; 4]> = (0..n)
                .map(|_| {
                    let (bw, bh) = (rng.random_range(0.05..0.6) * w, rng.random_range(0.05..0.6) * h);
                    let (x, y) = (rng.random_range(0.0..w - bw), rng.random_range(0.0..h - bh));
                    [x, y, x + bw, y + bh]
                })
                .collect();
            Target {
                image_id: i as u64,
                labels: (0..n).map(|_| rng.random_range(0..num_classes)).collect(),
                crowd: vec![false; n],
                boxes,
                original_size: (height, width),
                resized_size: (height, width),
            }
        })
        .collect();
    Ok(Batch { images, targets, epoch: 0, index: 0 })
}

/// A memory line of /proc/self/status (`VmRSS`: resident now, `VmHWM`:
/// the peak), in MiB; 0 where the OS has no such file.
fn proc_status_mib(field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0.0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
