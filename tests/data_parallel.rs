//! Data-parallel training without GPUs: two ranks on threads, joined by an
//! in-memory all-reduce in place of NCCL, must take exactly the steps that
//! one process takes on both ranks' images (torchvision's per-image loss
//! normaliser and per-sample GroupNorm make the two the same computation,
//! up to rounding). The loader's half of the contract, that the ranks' shards
//! make up the single process's batches, is in tests/loader.rs.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_retinanet::config::Config;
use candle_retinanet::data::{Batch, Shard, Target};
use candle_retinanet::model::build;
use candle_retinanet::train::{any_rank, Collective};
use candle_retinanet::train::{StepOutcome, StepRunner, StepValues};

const SIZE: usize = 96;
const STEPS: usize = 3;

/// The ranks' meeting point: each posts its values, waits for the others,
/// reads the mean, and waits again before the next round may overwrite.
struct Exchange {
    barrier: Barrier,
    posted: Mutex<Vec<Vec<f32>>>,
}

struct ThreadRank {
    shard: Shard,
    exchange: Arc<Exchange>,
}

impl Collective for ThreadRank {
    fn shard(&self) -> Shard {
        self.shard
    }

    fn all_reduce_mean(&self, values: &Tensor) -> candle_core::Result<Tensor> {
        self.exchange.posted.lock().unwrap()[self.shard.rank] = values.to_vec1::<f32>()?;
        self.exchange.barrier.wait();
        let mean: Vec<f32> = {
            let posted = self.exchange.posted.lock().unwrap();
            let world = posted.len() as f32;
            (0..posted[0].len()).map(|i| posted.iter().map(|v| v[i]).sum::<f32>() / world).collect()
        };
        self.exchange.barrier.wait();
        Tensor::new(mean, values.device())
    }
}

fn ranks(world: usize) -> Vec<ThreadRank> {
    let exchange = Arc::new(Exchange { barrier: Barrier::new(world), posted: Mutex::new(vec![Vec::new(); world]) });
    (0..world).map(|rank| ThreadRank { shard: Shard { rank, world }, exchange: Arc::clone(&exchange) }).collect()
}

fn config() -> Result<Config> {
    let set = [
        "model.num_classes=3",
        "model.backbone.norm=gn",
        "model.backbone.gn_groups=8", // per sample, unlike BatchNorm's batch statistics
        "loss.normalizer=per_image",
        "train.clip_grad_norm=0",
        "train.momentum=0.9",
        "train.weight_decay=1e-4",
    ];
    Config::resolve(Some("shapes"), &set.map(String::from))
}

/// Two images with 3 and 2 boxes; `images` picks which.
fn batch(images: &[usize]) -> Result<Batch> {
    let len = 2 * 3 * SIZE * SIZE;
    let values: Vec<f32> = (0..len).map(|i| (i * 7919 % 1013) as f32 / 506.5 - 1.0).collect();
    let pixels = Tensor::from_vec(values, (2, 3, SIZE, SIZE), &Device::Cpu)?;
    let boxes: [&[[f32; 4]]; 2] = [
        &[[8.0, 10.0, 40.0, 44.0], [50.0, 20.0, 90.0, 60.0], [20.0, 60.0, 44.0, 90.0]],
        &[[30.0, 30.0, 70.0, 80.0], [4.0, 4.0, 24.0, 20.0]],
    ];
    let targets = images
        .iter()
        .map(|&i| Target {
            image_id: i as u64,
            boxes: boxes[i].to_vec(),
            labels: (0..boxes[i].len()).map(|k| k % 3).collect(),
            crowd: vec![false; boxes[i].len()],
            original_size: (SIZE, SIZE),
            resized_size: (SIZE, SIZE),
        })
        .collect();
    let index = Tensor::new(images.iter().map(|&i| i as u32).collect::<Vec<_>>(), &Device::Cpu)?;
    Ok(Batch { images: pixels.index_select(&index, 0)?, targets, epoch: 0, index: 0 })
}

type Params = Vec<(String, Vec<f32>)>;

/// The model, seeded, with its optimiser; one rank of `rank`'s group if any.
fn runner(rank: Option<ThreadRank>) -> Result<StepRunner> {
    let cfg = config()?;
    let loaded = build(&cfg.model, 3, &Device::Cpu, 7, None)?;
    let runner = StepRunner::new(loaded, &cfg, &Device::Cpu)?;
    Ok(match rank {
        Some(rank) => runner.with_collective(Box::new(rank)),
        None => runner,
    })
}

/// Every trainable parameter's values, by name.
fn params(runner: &StepRunner) -> Result<Params> {
    let values = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?) };
    runner.optimizer.params().iter().map(|p| Ok((p.name.clone(), values(p.var.as_tensor())?))).collect()
}

/// Trains `STEPS` steps on `images` as `rank`; returns the reported losses
/// and the parameters afterwards.
fn train(images: &[usize], rank: Option<ThreadRank>) -> Result<(Vec<[f64; 2]>, Params)> {
    let batch = batch(images)?;
    let mut runner = runner(rank)?;
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        match runner.step(&batch, 0.01)? {
            StepOutcome::Updated(StepValues { loss_cls, loss_box, .. }) => losses.push([loss_cls, loss_box]),
            other => anyhow::bail!("{other:?}"),
        }
    }
    Ok((losses, params(&runner)?))
}

#[test]
fn two_ranks_step_like_one_process_with_both_images() -> Result<()> {
    let (single_losses, single) = train(&[0, 1], None)?;
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks(2)
            .into_iter()
            .map(|rank| {
                let image = rank.shard.rank;
                scope.spawn(move || train(&[image], Some(rank)).map_err(|e| e.to_string()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results: Vec<_> = results.into_iter().collect::<Result<_, String>>().map_err(anyhow::Error::msg)?;
    for (rank, (losses, params)) in results.iter().enumerate() {
        for (step, (ours, single)) in losses.iter().zip(&single_losses).enumerate() {
            for (a, b) in ours.iter().zip(single) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "rank {rank} step {step}: loss {a} vs {b}");
            }
        }
        for ((name, ours), (_, single)) in params.iter().zip(&single) {
            let scale = single.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let worst = ours.iter().zip(single).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= 1e-5 * scale, "rank {rank}: {name} differs by {worst} (largest value {scale})");
        }
    }
    // The updates were real: the parameters moved.
    let initial = params(&runner(None)?)?;
    let moved = initial.iter().zip(&single).filter(|((_, a), (_, b))| a != b).count();
    assert!(moved * 2 > initial.len(), "only {moved} of {} parameters moved", initial.len());
    Ok(())
}

/// Ctrl-C reaches each rank at its own moment; all must stop together.
#[test]
fn a_stop_on_one_rank_stops_every_rank() {
    let answers: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks(3)
            .into_iter()
            .map(|rank| scope.spawn(move || any_rank(&rank, rank.shard.rank == 1, &Device::Cpu).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers, vec![true; 3]);
    let calm: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks(2)
            .into_iter()
            .map(|rank| scope.spawn(move || any_rank(&rank, false, &Device::Cpu).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(calm, vec![false; 2]);
}
