//! `retinanet convert`: writes the train and val splits of any dataset the
//! config can read (COCO, Pascal VOC, YOLO, CSV) in the COCO layout, so it
//! can be scored with `eval --gt` and taken to other tools.

use anyhow::{Context, Result};
use candle_retinanet::config::Config;
use candle_retinanet::data::{create_folder_atomically, load_split, write_coco_layout};

use crate::cli::ConvertArgs;

pub(super) fn run(args: ConvertArgs) -> Result<()> {
    let config = Config::resolve(args.config.config.as_deref(), &args.config.overrides)?;
    let splits = [("train", load_split(&config.data, "train")?), ("val", load_split(&config.data, "val")?)];
    for (_, split) in &splits {
        for line in split.dataset.report.warnings(&split.files.annotations) {
            eprintln!("warning: {line}");
        }
    }
    let named: Vec<(&str, _)> = splits.iter().map(|(name, split)| (*name, split)).collect();
    let mut images = 0;
    create_folder_atomically(&args.out, |dir| {
        images = write_coco_layout(dir, &named)?;
        Ok(())
    })
    .context("--out")?;
    let out = args.out.display();
    eprintln!("wrote {images} images and their train and val annotations to {out}; use it with --set data.root={out}");
    Ok(())
}
