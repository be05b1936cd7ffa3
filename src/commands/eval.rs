//! `retinanet eval`: scores a COCO results file against ground truth
//! (`--gt GT.json --dt DT.json`), printing pycocotools' summary and a
//! per-class table, or one JSON object with `--json`.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cli::EvalArgs;
use crate::data::coco::read_coco_json;
use crate::eval::{evaluate, read_results, write_eval_json, write_pr_plots, EvalParams, EvalReport, EvalResult};

/// Runs `retinanet eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    match (&args.gt, &args.dt, &args.weights) {
        (Some(gt), Some(dt), _) => {
            let start = Instant::now();
            let result = score_files(gt, dt)?;
            report(&result, start.elapsed().as_secs_f64(), args.json, args.out.as_deref())
        }
        (_, _, Some(_)) => bail!(
            "`retinanet eval --weights` is not built yet: model inference has not landed in this version \
             (score a results file with --gt GT.json --dt DT.json)"
        ),
        _ => bail!("eval needs --weights W, or --gt GT.json together with --dt DT.json"),
    }
}

/// Reads ground truth and a results file and evaluates them with
/// pycocotools' default parameters. Errors name the file at fault.
pub fn score_files(gt: &Path, dt: &Path) -> Result<EvalResult> {
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
pub fn report(result: &EvalResult, seconds: f64, json: bool, out: Option<&Path>) -> Result<()> {
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
        for line in result.summary_lines() {
            println!("{line}");
        }
        println!();
        for line in result.class_table() {
            println!("{line}");
        }
        eprintln!("evaluated {} images in {seconds:.2} s", result.image_ids.len());
    }
    Ok(())
}
