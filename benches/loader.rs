//! Data loader throughput alone (decode, augment, resize, normalise, pad,
//! batch) on a preset's training split; no model.
//!
//! `cargo bench --bench loader -- [PRESET] [EPOCHS]` (default: bccd, 2).

use std::time::Instant;

use candle_retinanet::config::Config;
use candle_retinanet::data::load_split;
use candle_retinanet::data::Transform;
use candle_retinanet::data::{Loader, LoaderOptions, Shard};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let preset = args.first().map_or("bccd", String::as_str);
    let epochs: usize = args.get(1).map_or(Ok(2), |s| s.parse())?;
    let config = Config::resolve(Some(preset), &[])?;
    let split = load_split(&config.data, "train")?;
    let t = &config.train;
    let options = LoaderOptions {
        batch_size: t.batch_size,
        train: true,
        seed: t.seed,
        hflip_prob: config.input.hflip_prob,
        drop_last: true,
        workers: t.workers,
        prefetch: t.prefetch,
        skip_bad_images: false,
        shard: Shard::WHOLE,
    };
    let loader = Loader::new(split.dataset.images, split.files.images, Transform::new(&config.input), options);
    let start = Instant::now();
    let mut images = 0;
    for epoch in 0..epochs {
        for batch in loader.epoch(epoch, 0)? {
            images += batch?.targets.len();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "loader {preset}: {images} images in {seconds:.2} s = {:.1} images/s (batch {}, {} workers, min_size {:?}, max_size {})",
        images as f64 / seconds,
        t.batch_size,
        t.workers,
        config.input.min_size,
        config.input.max_size
    );
    Ok(())
}
