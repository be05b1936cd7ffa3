//! The data loader: seeded order, mid-epoch resumption, ordered prefetch.

use std::path::Path;

use candle_retinanet::config::InputConfig;
use candle_retinanet::data::Transform;
use candle_retinanet::data::{write_dataset, SynthSpec};
use candle_retinanet::data::{Batch, Loader, LoaderOptions, Shard};
use candle_retinanet::data::{Dataset, LoadOptions};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

/// 23 synthetic 64 px images, in a scratch folder that goes with the guard.
fn dataset() -> Scratch {
    let dir = Scratch::new("loader");
    write_dataset(&dir, SynthSpec { train: 23, val: 1, size: 64, seed: 5 }).unwrap();
    dir
}

/// A loader of the training split of `data`, a folder from [`dataset`].
fn loader(data: &Path, workers: usize, prefetch: usize, seed: u64) -> Loader {
    loader_with_batch(data, 4, workers, prefetch, seed)
}

fn loader_with_batch(data: &Path, batch_size: usize, workers: usize, prefetch: usize, seed: u64) -> Loader {
    let d = Dataset::load(&data.join("annotations/instances_train.json"), LoadOptions::default()).unwrap();
    let images = data.join("images");
    let input = InputConfig { min_size: vec![48, 64], max_size: 96, ..InputConfig::default() };
    let options = LoaderOptions {
        batch_size,
        train: true,
        seed,
        hflip_prob: 0.5,
        drop_last: true,
        workers,
        prefetch,
        skip_bad_images: false,
        shard: Shard::WHOLE,
    };
    Loader::new(d.images, images, Transform::new(&input), options)
}

/// What identifies a batch's content: index, ids, boxes and every pixel.
type Fingerprint = (usize, Vec<u64>, Vec<Vec<[f32; 4]>>, Vec<f32>);

fn fingerprint(b: &Batch) -> Fingerprint {
    let pixels = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (
        b.index,
        b.targets.iter().map(|t| t.image_id).collect(),
        b.targets.iter().map(|t| t.boxes.clone()).collect(),
        pixels,
    )
}

fn epoch(loader: &Loader, epoch: usize, start: usize) -> Vec<Fingerprint> {
    loader.epoch(epoch, start).unwrap().map(|b| fingerprint(&b.unwrap())).collect()
}

#[test]
fn same_seed_same_batches_other_epoch_other_order() {
    let data = dataset();
    let (a, b) = (loader(&data, 2, 2, 7), loader(&data, 2, 2, 7));
    assert_eq!(a.batches_per_epoch(), 5, "23 images, batch 4, last partial batch dropped");
    let first = epoch(&a, 0, 0);
    assert_eq!(first.len(), 5);
    assert_eq!(first, epoch(&b, 0, 0));
    assert_ne!(a.epoch_order(0), a.epoch_order(1));
    assert_ne!(a.epoch_order(0), loader(&data, 2, 2, 8).epoch_order(0));
}

#[test]
fn resuming_mid_epoch_gives_the_remaining_batches() {
    let data = dataset();
    let l = loader(&data, 2, 3, 1);
    let whole = epoch(&l, 2, 0);
    let resumed = epoch(&l, 2, 3);
    assert_eq!(resumed, whole[3..].to_vec());
}

#[test]
fn prefetch_and_workers_do_not_reorder() {
    let data = dataset();
    let serial = epoch(&loader(&data, 1, 1, 4), 1, 0);
    let parallel = epoch(&loader(&data, 2, 8, 4), 1, 0);
    assert_eq!(serial.iter().map(|b| b.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert_eq!(serial, parallel);
}

#[test]
fn batches_are_padded_to_the_divisor_with_targets_inside() {
    let data = dataset();
    let l = loader(&data, 2, 2, 0);
    for batch in l.epoch(0, 0).unwrap() {
        let batch = batch.unwrap();
        let (n, c, h, w) = batch.images.dims4().unwrap();
        assert_eq!((n, c, h % 32, w % 32), (4, 3, 0, 0));
        for t in &batch.targets {
            assert!(t.resized_size.0 <= h && t.resized_size.1 <= w);
            assert_eq!(t.boxes.len(), t.labels.len());
            for b in &t.boxes {
                assert!(
                    b[0] >= 0.0 && b[2] <= t.resized_size.1 as f32 && b[1] >= 0.0 && b[3] <= t.resized_size.0 as f32
                );
            }
        }
    }
}

#[test]
fn dropping_the_iterator_early_stops_cleanly() {
    let data = dataset();
    let l = loader(&data, 2, 1, 0);
    let mut it = l.epoch(0, 0).unwrap();
    assert!(it.next().unwrap().is_ok());
    drop(it);
    assert_eq!(epoch(&l, 0, 4).len(), 1);
}

/// What one image of a batch became: id, resized size and boxes (which show
/// the flip and the scale drawn for it).
type ImageFingerprint = (u64, (usize, usize), Vec<[f32; 4]>);

fn images_of(batch: &Batch) -> Vec<ImageFingerprint> {
    batch.targets.iter().map(|t| (t.image_id, t.resized_size, t.boxes.clone())).collect()
}

/// Two ranks of 2 images see the images and augmentation of one process
/// with batches of 4, split in halves, from any starting batch.
#[test]
fn shards_split_each_global_batch_in_rank_order() {
    let data = dataset();
    let whole = loader_with_batch(&data, 4, 2, 2, 3);
    let ranks: Vec<Loader> =
        (0..2).map(|rank| loader_with_batch(&data, 2, 1, 2, 3).with_shard(Shard { rank, world: 2 })).collect();
    assert_eq!(ranks[1].batches_per_epoch(), whole.batches_per_epoch());
    assert_eq!(ranks[0].global_batch_size(), 4);
    for start in [0, 2] {
        let expected: Vec<_> = whole.epoch(1, start).unwrap().map(|b| images_of(&b.unwrap())).collect();
        let parts: Vec<Vec<Batch>> =
            ranks.iter().map(|l| l.epoch(1, start).unwrap().map(|b| b.unwrap()).collect()).collect();
        assert_eq!(parts[0].len(), expected.len());
        for (k, expected) in expected.iter().enumerate() {
            let (first, second) = (images_of(&parts[0][k]), images_of(&parts[1][k]));
            assert_eq!((first.len(), second.len()), (2, 2));
            assert_eq!([first, second].concat(), *expected, "batch {} from start {start}", start + k);
            assert_eq!(parts[1][k].index, start + k);
        }
    }
}
