//! The evaluator against pycocotools: every case in tests/fixtures/coco_eval
//! (made by make_fixtures.py there) must give pycocotools' 12 stats,
//! per-class AP and printed summary; malformed results files must fail with
//! a message naming the file and the entry.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_retinanet::data::read_coco_json;
use candle_retinanet::eval::{evaluate, read_results, AreaRange, EvalParams, EvalResult};
use serde::Deserialize;

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

const TOLERANCE: f64 = 1e-6;

#[derive(Deserialize)]
struct Expected {
    stats: Vec<f64>,
    per_class: Vec<ExpectedClass>,
    summary: Vec<String>,
    params: Option<ExpectedParams>,
}

#[derive(Deserialize)]
struct ExpectedClass {
    category_id: u64,
    ap: f64,
    ap50: f64,
}

#[derive(Deserialize)]
struct ExpectedParams {
    max_dets: Vec<usize>,
    area_ranges: Vec<(String, f64, f64)>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coco_eval")
}

fn cases() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 10, "fixtures missing: {dirs:?}");
    dirs
}

fn params_of(expected: &Expected) -> EvalParams {
    let mut params = EvalParams::default();
    if let Some(p) = &expected.params {
        params.max_dets = p.max_dets.clone();
        params.area_ranges = p.area_ranges.iter().map(|(n, lo, hi)| AreaRange::new(n, *lo, *hi)).collect();
    }
    params
}

fn run_case(dir: &Path) -> (EvalResult, Expected) {
    let expected: Expected = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let gt = read_coco_json(&dir.join("gt.json")).unwrap();
    let dts = read_results(&dir.join("dt.json"), &gt).unwrap();
    let result = evaluate(&gt, &dts, &params_of(&expected)).unwrap();
    (result, expected)
}

#[test]
fn stats_and_per_class_ap_match_pycocotools() {
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let (result, expected) = run_case(&dir);
        for (i, (ours, theirs)) in result.stats.iter().zip(&expected.stats).enumerate() {
            assert!((ours - theirs).abs() <= TOLERANCE, "{name}: stats[{i}] = {ours}, pycocotools {theirs}");
        }
        assert_eq!(result.per_class.len(), expected.per_class.len(), "{name}");
        for (ours, theirs) in result.per_class.iter().zip(&expected.per_class) {
            assert_eq!(ours.category_id, theirs.category_id, "{name}");
            let id = ours.category_id;
            assert!((ours.ap - theirs.ap).abs() <= TOLERANCE, "{name}: category {id} AP {} vs {}", ours.ap, theirs.ap);
            assert!(
                (ours.ap50 - theirs.ap50).abs() <= TOLERANCE,
                "{name}: category {id} AP50 {} vs {}",
                ours.ap50,
                theirs.ap50
            );
        }
        assert_eq!(result.summary_lines(), expected.summary, "{name}: printed summary");
    }
}

#[test]
fn stats_are_bit_identical_to_pycocotools() {
    for dir in cases() {
        let (result, expected) = run_case(&dir);
        assert_eq!(result.stats.to_vec(), expected.stats, "{}", dir.display());
    }
}

#[test]
fn malformed_results_name_the_file_and_the_entry() {
    let gt = read_coco_json(&fixtures().join("basic/gt.json")).unwrap();
    let ok = r#"{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}"#;
    let cases = [
        (
            r#"{"image_id": 1}"#.to_string(),
            "bad.json: not a COCO results list: invalid type: map, expected a list of detections",
        ),
        (
            format!(r#"[{ok}, {ok}, {{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}}]"#),
            "bad.json: entry 2: missing field `score`",
        ),
        (
            format!(r#"[{ok}, {{"image_id": "7", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}}]"#),
            "bad.json: entry 1: invalid type: string \"7\", expected u64",
        ),
        (
            format!(r#"[{ok}, {{"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}}]"#),
            "bad.json: entry 1: image_id 999 is not in the ground truth",
        ),
        (
            format!(r#"[{{"image_id": 1, "category_id": 77, "bbox": [1, 2, 3, 4], "score": 1}}, {ok}]"#),
            "bad.json: entry 0: category_id 77 is not in the ground-truth categories",
        ),
        (
            format!(r#"[{ok}, {{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 1}}]"#),
            "bad.json: entry 1: invalid length 3, expected an array of length 4",
        ),
        (
            format!(r#"[{ok}, {{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1e999}}]"#),
            "bad.json: entry 1: number out of range",
        ),
    ];
    let dir = Scratch::folder("malformed");
    let path = dir.join("bad.json");
    for (text, expected) in cases {
        std::fs::write(&path, &text).unwrap();
        let err = format!("{:#}", read_results(&path, &gt).unwrap_err());
        let err = err.replace(&dir.display().to_string(), "").trim_start_matches('/').to_string();
        assert!(err.starts_with(expected), "{text}\n  gave: {err}\n  want: {expected}");
    }
    std::fs::write(&path, "[]").unwrap();
    assert!(read_results(&path, &gt).unwrap().is_empty(), "an empty list is valid");
}

fn retinanet(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retinanet")).args(args).output().unwrap()
}

#[test]
fn cli_json_prints_one_object_with_the_stats() {
    let case = fixtures().join("crowd");
    let (gt, dt) = (case.join("gt.json"), case.join("dt.json"));
    let out = retinanet(&["eval", "--gt", gt.to_str().unwrap(), "--dt", dt.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let expected: Expected = serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
    let stats: Vec<f64> = report["stats"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(stats, expected.stats);
    assert_eq!(report["images"], 25);
    assert!(report["seconds"].as_f64().unwrap() >= 0.0);
    let first = &report["per_class"][0];
    assert_eq!((first["category_id"].as_u64(), first["name"].as_str()), (Some(1), Some("class_1")));
    assert_eq!(first["ap"].as_f64().unwrap(), expected.per_class[0].ap);
}

#[test]
fn cli_table_plots_and_errors() {
    let case = fixtures().join("basic");
    let (gt, dt) = (case.join("gt.json"), case.join("dt.json"));
    let out_dir = Scratch::folder("cli-out");
    let out = retinanet(&[
        "eval",
        "--gt",
        gt.to_str().unwrap(),
        "--dt",
        dt.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected: Expected = serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..12], expected.summary.iter().map(String::as_str).collect::<Vec<_>>()[..]);
    assert!(lines.iter().any(|l| l.contains("class_3")), "per-class table:\n{stdout}");
    assert!(out_dir.join("eval.json").exists());
    for id in 1..=5 {
        let png = out_dir.join(format!("pr_{id}_class_{id}.png"));
        assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000), "{}", png.display());
    }

    let bad = Scratch::new("dt.json");
    std::fs::write(&bad, r#"[{"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 1}]"#).unwrap();
    let out = retinanet(&["eval", "--gt", gt.to_str().unwrap(), "--dt", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("dt.json: entry 0: image_id 999 is not in the ground truth"), "{stderr}");
    assert!(out.stdout.is_empty());

    let out = retinanet(&["eval", "--weights", "no-such-model.safetensors"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--weights no-such-model.safetensors"));
}
