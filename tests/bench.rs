//! `retinanet bench` times every preset and backbone depth it accepts: its
//! random model stays finite (a frozen-BatchNorm ResNet-50 used to overflow
//! and stop the bench), in training and in inference.

use std::process::Command;

use candle_retinanet::config::PRESETS;

/// `retinanet bench --json` at `size` px, batch 1, `steps` timed steps.
fn bench(config: &str, size: &str, steps: &str, extra: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    cmd.args(["bench", "--config", config, "--size", size, "--batch", "1", "--steps", steps, "--json"]).args(extra);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --config {config} {extra:?}: {stderr}");
    serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

#[test]
fn every_preset_trains_and_infers_in_the_bench() {
    for (preset, _) in PRESETS {
        for mode in ["train", "infer"] {
            let report = bench(preset, "64", "1", &["--mode", mode]);
            assert!(report["seconds_per_step_median"].as_f64().unwrap() > 0.0, "{preset} {mode}: {report}");
        }
    }
}

/// Eight steps (two untimed) at 128 px, lr 0.01: before the random model was made tame,
/// ResNet-50 with frozen BatchNorm stopped at its fourth step here with a
/// loss of 1e20.
#[test]
fn every_depth_with_frozen_batch_norm_stays_finite() {
    for depth in ["18", "34", "50", "101"] {
        let depth = format!("model.backbone.depth={depth}");
        bench("retinanet_r50_fpn_coco", "128", "6", &["--mode", "train", "--set", &depth]);
    }
}
