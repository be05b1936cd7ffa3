//! `retinanet predict`: runs a model on image files and folders; draws the
//! detections and writes COCO results, or prints them as JSON.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use candle_retinanet::config::parse_device;
use candle_retinanet::data::load_rgb;
use candle_retinanet::eval::Detection;
use candle_retinanet::infer::{draw_detections, to_coco_results, Predictor};
use candle_retinanet::run::WeightsSource;

use crate::cli::PredictArgs;

/// File extensions taken from folders.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];
/// The output folder when `--out` is not given (and `--json` is not).
const DEFAULT_OUT: &str = "predictions";

/// One image of `--json`'s array (docs/CLI.md).
#[derive(Debug, Serialize)]
struct ImageResult {
    file: String,
    width: u32,
    height: u32,
    detections: Vec<DetectionJson>,
}

#[derive(Debug, Serialize)]
struct DetectionJson {
    bbox: [f64; 4],
    score: f64,
    category_id: u64,
    label: String,
}

pub(super) fn run(args: PredictArgs) -> Result<()> {
    let source = WeightsSource::locate(&args.weights)?;
    let mut config = source.config(args.config.config.as_deref(), &args.config.overrides)?;
    if let Some(thresh) = args.score_thresh {
        if !(0.0..=1.0).contains(&thresh) {
            bail!("--score-thresh {thresh}: expected a score in [0, 1]");
        }
        config.model.postprocess.score_thresh = thresh as f64;
    }
    let device = parse_device(&args.device.spec)?;
    let predictor = Predictor::load(&source, config, &device)?;
    let files = collect_images(&args.inputs)?;
    let out = match (&args.out, args.json) {
        (Some(dir), _) => Some(dir.clone()),
        (None, false) => Some(PathBuf::from(DEFAULT_OUT)),
        (None, true) => None,
    };
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut results = Vec::new();
    let mut coco = Vec::new();
    let mut used_names = HashSet::new();
    for (i, file) in files.iter().enumerate() {
        let mut image = load_rgb(file)?;
        let size = image.dimensions();
        let detections = predictor.predict(&image)?;
        let coco_dets = to_coco_results(i as u64 + 1, &detections, &predictor.categories);
        if let Some(dir) = &out {
            let path = dir.join(unique_name(file, &mut used_names));
            draw_detections(&mut image, &detections, &predictor.categories);
            image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        results.push(image_result(file, size, &coco_dets, &predictor));
        coco.extend(coco_dets);
    }
    if let Some(dir) = &out {
        let path = dir.join("predictions.json");
        std::fs::write(&path, serde_json::to_string(&coco)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("{} image(s): drawn detections and predictions.json in {}", files.len(), dir.display());
    }
    if args.json {
        println!("{}", serde_json::to_string(&results)?);
    }
    Ok(())
}

/// Files as given, and the images directly inside folders (sorted).
fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot read folder {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            found.sort();
            files.extend(found);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    if files.is_empty() {
        bail!("no images found in {}", inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(files)
}

/// `<stem>.jpg`, suffixed `-2`, `-3`, ... when two inputs share a stem.
fn unique_name(file: &Path, used: &mut HashSet<String>) -> String {
    let stem = file.file_stem().map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    let mut name = format!("{stem}.jpg");
    let mut n = 2;
    while !used.insert(name.clone()) {
        name = format!("{stem}-{n}.jpg");
        n += 1;
    }
    name
}

fn image_result(file: &Path, (width, height): (u32, u32), dets: &[Detection], predictor: &Predictor) -> ImageResult {
    let detections = dets
        .iter()
        .map(|d| DetectionJson {
            bbox: d.bbox,
            score: d.score,
            category_id: d.category_id,
            label: predictor
                .categories
                .label_of(d.category_id)
                .map_or_else(String::new, |l| predictor.categories.name_of(l)),
        })
        .collect();
    ImageResult { file: file.display().to_string(), width, height, detections }
}
