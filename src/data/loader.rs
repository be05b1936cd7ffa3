//! Batches for training and evaluation: seeded shuffling that is identical
//! across runs and resumable mid-epoch, decoding and augmentation on worker
//! threads, and a bounded prefetch queue that keeps batch order.
//!
//! Every random choice is drawn from a generator seeded by
//! `(seed, epoch, position)`, never from shared state, so batch `k` of epoch
//! `e` is the same whichever thread builds it and whether or not the epoch
//! was started from the beginning.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::coco::ImageEntry;
use super::image_io::load_rgb;
use super::source::LoadedSplit;
use super::transforms::{pad_batch, Augment, Transform, TransformedImage};
use crate::config::Config;

/// Targets of one image, in the resized (unpadded) image's pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub image_id: u64,
    /// `[x1, y1, x2, y2]` boxes.
    pub boxes: Vec<[f32; 4]>,
    /// Model label of each box.
    pub labels: Vec<usize>,
    /// Crowd boxes: never foreground, anchors they cover are ignored.
    pub crowd: Vec<bool>,
    /// `(height, width)` of the original image.
    pub original_size: (usize, usize),
    /// `(height, width)` after resizing, before padding.
    pub resized_size: (usize, usize),
}

/// One batch: a zero-padded image tensor and per-image targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[n, 3, pad_h, pad_w]`, normalised, on the CPU.
    pub images: Tensor,
    pub targets: Vec<Target>,
    pub epoch: usize,
    /// Position of this batch in its epoch.
    pub index: usize,
}

/// How batches are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Shuffle each epoch and apply training augmentation.
    pub train: bool,
    pub seed: u64,
    /// Horizontal flip probability when `train`.
    pub hflip_prob: f32,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Image decoding threads.
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// Skip (and count) unreadable images instead of failing.
    pub skip_bad_images: bool,
    /// This process's part of each batch in data-parallel training.
    pub shard: Shard,
}

/// The part of each batch that one rank of a data-parallel run takes.
///
/// Global batch `k` of an epoch is the `k`-th run of `world * batch_size`
/// images of the epoch order, and rank `r` takes the `r`-th `batch_size` of
/// them, with the augmentation drawn for their global positions. So `world`
/// ranks of `batch_size` images see exactly the images, flips and scales
/// that one process with `world * batch_size` would. A single process is
/// rank 0 of 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl LoaderOptions {
    /// The options a config asks for, for training or for evaluation.
    pub fn for_config(config: &Config, train: bool) -> Self {
        let t = &config.train;
        Self {
            batch_size: if train { t.batch_size } else { config.eval.batch_size },
            train,
            seed: t.seed,
            hflip_prob: config.input.hflip_prob,
            drop_last: train,
            workers: t.workers,
            prefetch: t.prefetch,
            skip_bad_images: config.data.skip_bad_images,
            shard: Shard::WHOLE,
        }
    }
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };
}

/// Produces the batches of a dataset.
pub struct Loader {
    images: Arc<Vec<ImageEntry>>,
    image_dir: PathBuf,
    transform: Arc<Transform>,
    options: LoaderOptions,
    skipped: Arc<AtomicUsize>,
}

impl Loader {
    pub fn new(images: Vec<ImageEntry>, image_dir: PathBuf, transform: Transform, options: LoaderOptions) -> Self {
        Self {
            images: Arc::new(images),
            image_dir,
            transform: Arc::new(transform),
            options,
            skipped: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The loader a config asks for: training (shuffled, augmented, last
    /// partial batch dropped) or evaluation (file order, every image).
    pub fn for_split(config: &Config, split: LoadedSplit, train: bool) -> Self {
        let options = LoaderOptions::for_config(config, train);
        Self::new(split.dataset.images, split.files.images, Transform::new(&config.input), options)
    }

    /// The same loader giving only `shard`'s part of each batch.
    pub fn with_shard(mut self, shard: Shard) -> Self {
        self.options.shard = shard;
        self
    }

    pub fn len_images(&self) -> usize {
        self.images.len()
    }

    /// Images in one batch over every rank.
    pub fn global_batch_size(&self) -> usize {
        self.options.batch_size * self.options.shard.world
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.images.len(), self.global_batch_size());
        if self.options.drop_last && n >= b {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Images skipped as unreadable so far (with `skip_bad_images`).
    pub fn skipped_images(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Image indices in the order epoch `epoch` visits them.
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.images.len()).collect();
        if self.options.train {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(self.options.seed, epoch as u64, u64::MAX)));
        }
        order
    }

    /// Iterates over the batches of `epoch` from batch `start` on, decoded on
    /// worker threads `prefetch` batches ahead. Batches arrive in order.
    pub fn epoch(&self, epoch: usize, start: usize) -> Result<BatchIter> {
        let order = self.epoch_order(epoch);
        let (batch_size, rank) = (self.options.batch_size, self.options.shard.rank);
        let batches: Vec<(usize, Vec<usize>)> = order
            .chunks(self.global_batch_size())
            .take(self.batches_per_epoch())
            .enumerate()
            .skip(start)
            .map(|(i, chunk)| {
                let first = (rank * batch_size).min(chunk.len());
                (i, chunk[first..(first + batch_size).min(chunk.len())].to_vec())
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.options.workers.max(1))
            .thread_name(|i| format!("loader-{i}"))
            .build()
            .context("cannot start loader threads")?;
        let (sender, receiver) = crossbeam_channel::bounded(self.options.prefetch.max(1));
        let producer = BatchProducer {
            images: Arc::clone(&self.images),
            image_dir: self.image_dir.clone(),
            transform: Arc::clone(&self.transform),
            options: self.options.clone(),
            skipped: Arc::clone(&self.skipped),
            epoch,
        };
        let handle = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                for (index, members) in batches {
                    let batch = pool.install(|| producer.build(index, &members));
                    if sender.send(batch).is_err() {
                        return; // the consumer stopped early
                    }
                }
            })
            .context("cannot start the loader thread")?;
        Ok(BatchIter { receiver, handle: Some(handle) })
    }
}

/// The batches of one epoch, in order. Dropping it stops the workers.
pub struct BatchIter {
    receiver: crossbeam_channel::Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                if let Some(handle) = self.handle.take() {
                    if handle.join().is_err() {
                        return Some(Err(anyhow!("the data loader thread panicked")));
                    }
                }
                None
            }
        }
    }
}

/// What a loader thread needs to build batches.
struct BatchProducer {
    images: Arc<Vec<ImageEntry>>,
    image_dir: PathBuf,
    transform: Arc<Transform>,
    options: LoaderOptions,
    skipped: Arc<AtomicUsize>,
    epoch: usize,
}

impl BatchProducer {
    /// Decodes and transforms the images of one batch in parallel.
    fn build(&self, index: usize, members: &[usize]) -> Result<Batch> {
        let (batch_size, shard) = (self.options.batch_size, self.options.shard);
        let first_position = index * batch_size * shard.world + shard.rank * batch_size;
        let prepared: Vec<Option<(TransformedImage, Target)>> = members
            .par_iter()
            .enumerate()
            .map(|(k, &image_index)| self.prepare(image_index, first_position + k))
            .collect::<Result<_>>()?;
        let (transformed, targets): (Vec<_>, Vec<_>) = prepared.into_iter().flatten().unzip();
        if transformed.is_empty() {
            anyhow::bail!("batch {index} of epoch {}: every image was unreadable", self.epoch);
        }
        let (pad_h, pad_w) = self.transform.padded_size(transformed.iter().map(|t| (t.height, t.width)));
        let refs: Vec<&TransformedImage> = transformed.iter().collect();
        let data = pad_batch(&refs, (pad_h, pad_w));
        let images = Tensor::from_vec(data, (refs.len(), 3, pad_h, pad_w), &Device::Cpu)?;
        Ok(Batch { images, targets, epoch: self.epoch, index })
    }

    /// One image: `None` when it is unreadable and skipping is allowed.
    fn prepare(&self, image_index: usize, position: usize) -> Result<Option<(TransformedImage, Target)>> {
        let entry = &self.images[image_index];
        let path = self.image_dir.join(&entry.file_name);
        let image = match load_rgb(&path) {
            Ok(image) => image,
            Err(_) if self.options.skip_bad_images => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        let original_size = (image.height() as usize, image.width() as usize);
        if original_size != (entry.height as usize, entry.width as usize) {
            anyhow::bail!(
                "{}: image is {}x{} but the annotations say {}x{} (image id {})",
                path.display(),
                original_size.1,
                original_size.0,
                entry.width,
                entry.height,
                entry.id
            );
        }
        let augment = self.augment(position);
        let transformed = self.transform.apply(&image, &entry.boxes, augment);
        let target = Target {
            image_id: entry.id,
            boxes: transformed.boxes.clone(),
            labels: transformed.kept.iter().map(|&k| entry.labels[k]).collect(),
            crowd: transformed.kept.iter().map(|&k| entry.crowd[k]).collect(),
            original_size,
            resized_size: (transformed.height, transformed.width),
        };
        Ok(Some((transformed, target)))
    }

    /// Random choices for the image at `position` of this epoch.
    fn augment(&self, position: usize) -> Augment {
        if !self.options.train {
            return Augment::NONE;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(self.options.seed, self.epoch as u64, position as u64));
        Augment {
            min_size_index: Some(rng.random_range(0..self.transform.min_size.len())),
            hflip: rng.random::<f32>() < self.options.hflip_prob,
            seed: Some(rng.random()),
        }
    }
}

/// Mixes three numbers into one seed (splitmix64 finaliser on each step).
fn mix(seed: u64, epoch: u64, position: u64) -> u64 {
    let mut z = seed;
    for v in [epoch, position] {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(v);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}
