//! `retinanet predict`: runs a model on image files and folders (draws the
//! detections and writes COCO results, or prints them as JSON), or on a
//! split of a dataset (COCO results with its image ids, to be scored).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use candle_retinanet::data::{image_files, load_rgb, load_split, Loader};
use candle_retinanet::eval::Detection;
use candle_retinanet::infer::{detect_split, draw_detections, to_coco_results, Predictor};
use candle_retinanet::run::WeightsSource;

use crate::cli::PredictArgs;

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

/// A COCO results entry of a loose image file: its position (from 1) as
/// `image_id`, and the file.
#[derive(Debug, Serialize)]
struct FileDetection {
    #[serde(flatten)]
    detection: Detection,
    file_name: String,
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
    let device = super::device_for(&config, &args.device.spec)?;
    let predictor = Predictor::load(&source, config, &device)?;
    let out = match (&args.out, args.json) {
        (Some(dir), _) => Some(dir.clone()),
        (None, false) => Some(PathBuf::from(DEFAULT_OUT)),
        (None, true) => None,
    };
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match &args.split {
        Some(split) => predict_split(&predictor, split, out.as_deref(), args.json),
        None => predict_files(&predictor, &args.inputs, out.as_deref(), args.json),
    }
}

/// Image files and folders: drawn detections and predictions.json in `out`.
fn predict_files(predictor: &Predictor, inputs: &[PathBuf], out: Option<&Path>, json: bool) -> Result<()> {
    let files = collect_images(inputs)?;
    let mut results = Vec::new();
    let mut coco = Vec::new();
    let mut used_names = HashSet::new();
    for (i, file) in files.iter().enumerate() {
        let mut image = load_rgb(file)?;
        let size = image.dimensions();
        let detections = predictor.predict(&image)?;
        let coco_dets = to_coco_results(i as u64 + 1, &detections, &predictor.categories);
        if let Some(dir) = out {
            let path = dir.join(unique_name(file, &mut used_names));
            draw_detections(&mut image, &detections, &predictor.categories);
            image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        results.push(image_result(&file.display().to_string(), size, &coco_dets, predictor));
        let file_name = file.display().to_string();
        coco.extend(coco_dets.into_iter().map(|detection| FileDetection { detection, file_name: file_name.clone() }));
    }
    finish(out, &coco, &results, json, "drawn detections and predictions.json")
}

/// A split of the config's dataset: predictions.json with its image ids.
fn predict_split(predictor: &Predictor, split: &str, out: Option<&Path>, json: bool) -> Result<()> {
    let split = load_split(&predictor.config.data, split)?;
    predictor.check_split(&split)?;
    let images: HashMap<u64, (String, u32, u32)> =
        split.coco.images.iter().map(|im| (im.id, (im.file_name.clone(), im.width, im.height))).collect();
    let loader = Loader::for_split(&predictor.config, split, false);
    eprintln!("running the model on {} images", loader.len_images());
    let mut results = Vec::new();
    let mut coco = Vec::new();
    for (image_id, detections) in detect_split(&predictor.model, &loader, predictor.device())? {
        let coco_dets = to_coco_results(image_id, &detections, &predictor.categories);
        let (file_name, width, height) = &images[&image_id];
        results.push(image_result(file_name, (*width, *height), &coco_dets, predictor));
        coco.extend(coco_dets);
    }
    finish(out, &coco, &results, json, "predictions.json")
}

/// Writes `DIR/predictions.json` (saying what `out` now holds) and prints
/// the `--json` array.
fn finish(out: Option<&Path>, coco: &impl Serialize, results: &[ImageResult], json: bool, what: &str) -> Result<()> {
    if let Some(dir) = out {
        let path = dir.join("predictions.json");
        std::fs::write(&path, serde_json::to_string(coco)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("{} image(s): {what} in {}", results.len(), dir.display());
    }
    if json {
        println!("{}", serde_json::to_string(results)?);
    }
    Ok(())
}

/// Files as given, and the images directly inside folders (sorted).
fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            files.extend(image_files(input)?);
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

fn image_result(file: &str, (width, height): (u32, u32), dets: &[Detection], predictor: &Predictor) -> ImageResult {
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
    ImageResult { file: file.to_string(), width, height, detections }
}
