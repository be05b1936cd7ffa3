//! `retinanet eval`: scores a COCO results file against ground truth
//! (`--gt GT.json --dt DT.json`), printing pycocotools' summary and a
//! per-class table, or one JSON object with `--json`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use candle_retinanet::data::{load_split, read_coco_json, Loader};
use candle_retinanet::eval::{
    evaluate, read_results, write_eval_json, write_pr_plots, EvalParams, EvalReport, EvalResult,
};
use candle_retinanet::infer::{evaluate_split, Predictor};
use candle_retinanet::run::WeightsSource;

use super::print_eval_summary;
use crate::cli::EvalArgs;

/// Runs `retinanet eval`.
pub(super) fn run(args: &EvalArgs) -> Result<()> {
    match (&args.gt, &args.dt, &args.weights) {
        (Some(gt), Some(dt), _) => {
            let start = Instant::now();
            let result = score_files(gt, dt)?;
            report(&result, start.elapsed().as_secs_f64(), args.json, args.out.as_deref())
        }
        (_, _, Some(weights)) => evaluate_model(args, weights),
        _ => bail!("eval needs --weights W, or --gt GT.json together with --dt DT.json"),
    }
}

/// `--weights`: runs the model over `--split`, scores it, and with `--out`
/// writes the detections there as a COCO results file.
fn evaluate_model(args: &EvalArgs, weights: &Path) -> Result<()> {
    let source = WeightsSource::locate(weights)?;
    let config = source.config(args.config.config.as_deref(), &args.config.overrides)?;
    let device = super::device_for(&config, &args.device.spec)?;
    let predictor = Predictor::load(&source, config, &device)?;
    let split = load_split(&predictor.config.data, &args.split)?;
    predictor.check_split(&split)?;
    let ground_truth = split.coco.clone();
    let loader = Loader::for_split(&predictor.config, split, false);
    let images = loader.len_images();
    eprintln!("running the model on {images} images");
    let started = Instant::now();
    let (result, detections) =
        evaluate_split(&predictor.model, &loader, &ground_truth, &predictor.categories, &device)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("detections.json");
        std::fs::write(&path, serde_json::to_string(&detections)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    report(&result, started.elapsed().as_secs_f64(), args.json, args.out.as_deref())
}

/// Reads ground truth and a results file and evaluates them with
/// pycocotools' default parameters. Errors name the file at fault.
fn score_files(gt: &Path, dt: &Path) -> Result<EvalResult> {
    let coco = read_coco_json(gt)?;
    let detections = read_results(dt, &coco)?;
    eprintln!(
        "evaluating {} detections on {} images, {} categories",
        detections.len(),
        coco.images.len(),
        coco.categories.len()
    );
    evaluate(&coco, &detections, &EvalParams::default()).with_context(|| gt.display().to_string())
}

/// Prints `result` (the 12-line summary and per-class table, or one JSON
/// object on stdout with `json`) and, with `out`, writes `eval.json` and
/// the precision-recall plots there. `seconds` is the evaluation time.
fn report(result: &EvalResult, seconds: f64, json: bool, out: Option<&Path>) -> Result<()> {
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_eval_json(&dir.join("eval.json"), result, seconds)?;
        let plots = write_pr_plots(result, dir)?;
        let (count, dir) = (plots.len(), dir.display());
        eprintln!("wrote eval.json and {count} precision-recall plot(s) to {dir}");
    }
    if json {
        println!("{}", EvalReport::new(result, seconds).to_json());
    } else {
        print_eval_summary(result);
        eprintln!("evaluated {} images in {seconds:.2} s", result.image_ids.len());
    }
    Ok(())
}
