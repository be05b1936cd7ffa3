//! Training steps against torchvision on identical weights and batch.
//!
//! The fixture comes from `tests/fixtures/train_step/make_train_step.py`
//! (torch 2.15 / torchvision 0.29, run by hand). In short:
//!
//! ```python
//! model = build(shapes preset)      # benchmarks/torchvision_bench.py, plain BatchNorm
//! model.proposal_matcher.high_threshold, low_threshold = 0.4, 0.3
//! model.load_state_dict({k: weight_values(t, k, shape) ...}, strict=False)
//! model.train()
//! opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
//! for step in range(3):
//!     terms = model(images, targets)   # two 128x128 images with 3 and 2 boxes
//!     opt.zero_grad(); sum(terms.values()).backward(); opt.step()
//! ```
//!
//! The test checks the loss terms of every step, every parameter's gradient
//! at the first step (checksums and 64 sampled entries) and every tensor,
//! BatchNorm running statistics included, after the last step; and the loss
//! terms and final tensors once more with the GIoU box loss
//! (`model.head.regression_head._loss_type = "giou"`), and once in the
//! fine-tuning recipe (`train_step_frozen.json`: FrozenBatchNorm2d, stem and
//! layer1 frozen), where each step must see the last one's update of the
//! convolutions under the frozen norms.

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_retinanet::config::Config;
use candle_retinanet::data::{Batch, Target};
use candle_retinanet::model::{build, LoadMode};
use candle_retinanet::train::{StepOutcome, StepRunner, StepValues};
use serde::Deserialize;

mod common;
use common::{check_checksum, checksum, fixture_dir, hashed_weights, test_device};

const FIXTURE: &str = "train_step";

#[derive(Deserialize)]
struct Meta {
    keys: Vec<(String, Vec<usize>)>,
    /// Per image: `[x1, y1, x2, y2, label]`.
    boxes: Vec<Vec<[f32; 5]>>,
    size: usize,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    fg_iou: f64,
    bg_iou: f64,
    /// `[classification, bbox_regression]` of every step.
    losses: Vec<[f64; 2]>,
    grad_checksums: BTreeMap<String, [f64; 2]>,
    final_checksums: BTreeMap<String, [f64; 2]>,
    /// The same training with the GIoU box loss.
    giou: Run,
}

#[derive(Deserialize)]
struct Run {
    losses: Vec<[f64; 2]>,
    final_checksums: BTreeMap<String, [f64; 2]>,
}

/// `train_step_frozen.json`.
#[derive(Deserialize)]
struct FrozenRun {
    keys: Vec<(String, Vec<usize>)>,
    #[serde(flatten)]
    run: Run,
}

fn config(meta: &Meta, box_loss: &str) -> Result<Config> {
    let set = [
        "loss.matcher=max_iou".to_string(), // torchvision's (the preset uses ATSS)
        "loss.box_weight=1".to_string(),
        format!("loss.fg_iou_thresh={}", meta.fg_iou),
        format!("loss.bg_iou_thresh={}", meta.bg_iou),
        format!("train.momentum={}", meta.momentum),
        format!("train.weight_decay={}", meta.weight_decay),
        "train.clip_grad_norm=0".to_string(),
        format!("loss.box_loss={box_loss}"),
        "loss.normalizer=per_image".to_string(), // torchvision's (the preset uses detectron2's EMA)
        "model.num_classes=3".to_string(),
    ];
    Config::resolve(Some("shapes"), &set)
}

fn batch(meta: &Meta, images: Tensor) -> Batch {
    let size = (meta.size, meta.size);
    let targets = meta
        .boxes
        .iter()
        .enumerate()
        .map(|(i, boxes)| Target {
            image_id: i as u64,
            boxes: boxes.iter().map(|b| [b[0], b[1], b[2], b[3]]).collect(),
            labels: boxes.iter().map(|b| b[4] as usize).collect(),
            crowd: vec![false; boxes.len()],
            original_size: size,
            resized_size: size,
        })
        .collect();
    Batch { images, targets, epoch: 0, index: 0 }
}

/// The shapes model with the fixture's weights and its SGD, ready to step.
fn runner(meta: &Meta, box_loss: &str) -> Result<StepRunner> {
    runner_with(config(meta, box_loss)?, &meta.keys)
}

/// `cfg`'s model with the hashed weights of `keys` and its SGD.
fn runner_with(cfg: Config, keys: &[(String, Vec<usize>)]) -> Result<StepRunner> {
    let dev = test_device()?;
    let tensors = hashed_weights(keys)?;
    let loaded = build(&cfg.model, 3, &dev, 0, Some((&tensors, LoadMode::Exact)))?;
    Ok(StepRunner::new(loaded, &cfg, &dev)?)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn shapes_model_trains_like_torchvision() -> Result<()> {
    let dir = fixture_dir(FIXTURE);
    let meta: Meta = serde_json::from_str(&std::fs::read_to_string(dir.join("train_step.json"))?)?;
    let fixture = candle_core::safetensors::load(dir.join("train_step.safetensors"), &Device::Cpu)?;
    let get = |name: &str| fixture.get(name).with_context(|| format!("fixture tensor {name}"));

    let mut runner = runner(&meta, "l1")?;
    let batch = batch(&meta, get("images")?.clone());

    // First step: loss terms and every gradient.
    let terms = runner.losses(&batch)?;
    let grads = terms.total()?.backward()?;
    ensure!(meta.grad_checksums.len() == runner.optimizer.params().len(), "trainable tensors differ in number");
    let mut worst = (0f32, String::new());
    for p in runner.optimizer.params() {
        let grad = grads.get(p.var.as_tensor()).with_context(|| format!("{}: no gradient", p.name))?;
        let ours = values(grad)?;
        let theirs = meta.grad_checksums.get(&p.name).with_context(|| format!("{}: not trained by torch", p.name))?;
        check_checksum(&format!("gradient of {}", p.name), checksum(&ours), *theirs, 2e-3)?;
        let index = get(&format!("{}.index", p.name))?.to_vec1::<i64>()?;
        let samples = values(get(&format!("{}.grad", p.name))?)?;
        // Relative to |torchvision| plus the tensor's mean |gradient|:
        // entries near zero carry only rounding noise.
        let scale = (theirs[1] / ours.len() as f64) as f32;
        for (&i, &t) in index.iter().zip(&samples) {
            let err = (ours[i as usize] - t).abs() / (t.abs() + scale).max(1e-12);
            if err > worst.0 {
                worst = (err, format!("{}[{i}]: {} vs torchvision {t}", p.name, ours[i as usize]));
            }
        }
    }
    println!("worst sampled gradient error {:.2e} (of the mean |gradient|): {}", worst.0, worst.1);
    ensure!(worst.0 < 1e-2, "gradients differ: {}", worst.1);

    // Every step's loss terms, then the tensors after the last, from the
    // start again: the forward above moved the BatchNorm statistics.
    let l1 = Run { losses: meta.losses.clone(), final_checksums: meta.final_checksums.clone() };
    check_training(&mut self::runner(&meta, "l1")?, &batch, meta.lr, &l1, "l1")?;
    check_training(&mut self::runner(&meta, "giou")?, &batch, meta.lr, &meta.giou, "giou")?;

    // torchvision's fine-tuning recipe: FrozenBatchNorm2d (eps 1e-5), stem
    // and layer1 frozen.
    let frozen: FrozenRun = serde_json::from_str(&std::fs::read_to_string(dir.join("train_step_frozen.json"))?)?;
    let mut cfg = config(&meta, "l1")?;
    cfg.model.backbone.norm = candle_retinanet::config::BackboneNorm::FrozenBn;
    cfg.model.backbone.norm_eps = 1e-5;
    cfg.model.backbone.freeze_at = 2;
    check_training(&mut runner_with(cfg, &frozen.keys)?, &batch, meta.lr, &frozen.run, "frozen")
}

/// Steps `runner` through `expected`'s loss terms, then compares every tensor.
fn check_training(runner: &mut StepRunner, batch: &Batch, lr: f64, expected: &Run, what: &str) -> Result<()> {
    for (step, terms) in expected.losses.iter().enumerate() {
        let StepOutcome::Updated(StepValues { loss_cls, loss_box, .. }) = runner.step(batch, lr)? else {
            anyhow::bail!("{what} step {step}: not finite");
        };
        println!("{what} step {step}: cls {loss_cls:.6} vs {:.6}, box {loss_box:.6} vs {:.6}", terms[0], terms[1]);
        let tol = 1e-4 * (1 + step) as f64;
        ensure!(
            (loss_cls - terms[0]).abs() < tol * terms[0] && (loss_box - terms[1]).abs() < tol * terms[1],
            "{what} step {step}: loss ({loss_cls}, {loss_box}), torchvision {terms:?}"
        );
    }
    let vars = runner.varmap.data().lock().unwrap();
    for (name, theirs) in &expected.final_checksums {
        let var = vars.get(name).with_context(|| format!("{name}: missing"))?;
        check_checksum(&format!("{what}: {name} after training"), checksum(&values(var.as_tensor())?), *theirs, 1e-3)?;
    }
    Ok(())
}
