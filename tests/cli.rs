//! The real binary: exit codes and the one-line `error:` contract.

use std::process::{Command, Output};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn retinanet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retinanet")).args(args).env("RETINANET_CACHE", cache()).output().unwrap()
}

fn cache() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("retinanet-cli-cache-{}", std::process::id()))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 1 and exactly one line, starting `error:`, containing `needle`.
fn assert_one_error_line(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

#[test]
fn every_command_has_help() {
    for cmd in ["train", "eval", "predict", "synth", "inspect", "bench", "convert", "convert-weights"] {
        let o = retinanet(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{cmd}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: retinanet"), "{cmd}");
    }
}

#[test]
fn usage_errors_exit_with_2() {
    assert_eq!(retinanet(&["synth"]).status.code(), Some(2), "--out is required");
    assert_eq!(retinanet(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn config_errors_are_one_line() {
    assert_one_error_line(&retinanet(&["inspect", "--set", "train.batchsize=2"]), "unknown config key train.batchsize");
    assert_one_error_line(&retinanet(&["inspect", "--config", "nope"]), "config nope: no such preset or file");
    assert_one_error_line(&retinanet(&["inspect", "--set", "train.batch_size=[2]"]), "config key train.batch_size");
    assert_one_error_line(&retinanet(&["inspect", "--set", "data.root=/nonexistent"]), "data.root /nonexistent");
    // f16 needs loss scaling, which is not built: refused before anything is written.
    let out = Scratch::new("f16");
    let o = retinanet(&["train", "--out", out.to_str().unwrap(), "--set", "train.precision=f16"]);
    assert_one_error_line(&o, "config key train.precision: \"f16\" is not built");
    assert!(!out.exists(), "nothing written");
}

/// `--gpus` errors come before any rank starts or anything is written.
#[test]
fn gpu_list_errors_are_one_line() {
    let out = Scratch::new("gpus");
    let train = |gpus: &str| retinanet(&["train", "--out", out.to_str().unwrap(), "--gpus", gpus]);
    assert_one_error_line(&train("0,0"), "--gpus 0,0: GPU 0 is listed twice");
    assert_one_error_line(&train("0,one"), "`one` is not a GPU number");
    if !cfg!(feature = "nccl") {
        assert_one_error_line(&train("0"), "this binary was built without NCCL");
    }
    assert!(!out.exists(), "nothing written");
    assert_eq!(retinanet(&["train", "--gpus", "0", "--device", "cpu"]).status.code(), Some(2), "one or the other");
}

/// A process that torchrun or srun started as a rank reads its place from
/// the environment; a missing or wrong variable is named before anything
/// is written.
#[test]
fn rank_environment_errors_are_one_line() {
    let out = Scratch::new("rank");
    let train = |vars: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_retinanet"));
        command.args(["train", "--out", out.to_str().unwrap()]).envs(vars.iter().copied());
        command.output().unwrap()
    };
    let torchrun = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
    assert_one_error_line(&train(&torchrun), "WORLD_SIZE is set, but MASTER_ADDR is not");
    let slurm = [("SLURM_PROCID", "3"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")];
    assert_one_error_line(&train(&slurm), "SLURM_PROCID: rank 3 of a world of 2");
    if !cfg!(feature = "nccl") {
        let all = [torchrun.as_slice(), &[("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]].concat();
        assert_one_error_line(&train(&all), "this binary was built without NCCL");
    }
    assert!(!out.exists(), "nothing written");
}

#[test]
fn synth_then_inspect() {
    let dir = Scratch::new("synth");
    let o = retinanet(&["synth", "--out", dir.to_str().unwrap(), "--train", "12", "--val", "3", "--size", "96"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_one_error_line(&retinanet(&["synth", "--out", dir.to_str().unwrap()]), "not empty");

    let root = format!("data.root={}", dir.display());
    let samples = dir.join("samples");
    let o = retinanet(&["inspect", "--set", &root, "--split", "val", "--out", samples.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout.contains("images:      3") && stdout.contains("problems: none"), "{stdout}");
    assert_eq!(std::fs::read_dir(&samples).unwrap().count(), 3);

    // A corrupt image and a wrong size are reported as problems.
    std::fs::write(dir.join("images/val_000000.png"), b"not a png").unwrap();
    image::RgbImage::new(10, 10).save(dir.join("images/val_000001.png")).unwrap();
    let o = retinanet(&["inspect", "--set", &root, "--split", "val"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("problems (2):"), "{stdout}");
    assert!(
        stdout.contains("val_000000.png") && stdout.contains("image is 10x10 but the annotations say 96x96"),
        "{stdout}"
    );
}

/// `inspect` exits 0 on a clean split and 1, after the whole report, when a
/// problem would stop or change training; `--json` is one object.
#[test]
fn inspect_exit_codes_and_json() {
    let dir = Scratch::new("inspect");
    let o = retinanet(&["synth", "--out", dir.to_str().unwrap(), "--train", "6", "--val", "3", "--size", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let root = format!("data.root={}", dir.display());
    let o = retinanet(&["inspect", "--set", &root, "--split", "val", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["images"], 3);
    assert_eq!(report["classes"].as_array().unwrap().len(), 3);
    assert!(report["problems"].as_array().unwrap().is_empty());

    std::fs::write(dir.join("images/val_000002.png"), b"not a png").unwrap();
    let o = retinanet(&["inspect", "--set", &root, "--split", "val", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "{report}");
    assert!(stderr(&o).lines().any(|l| l.starts_with("error: ") && l.contains("1 problem(s)")), "{}", stderr(&o));

    // A split whose every box is a crowd region has nothing to learn from.
    let val = dir.join("annotations/instances_val.json");
    let mut coco: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&val).unwrap()).unwrap();
    for annotation in coco["annotations"].as_array_mut().unwrap() {
        annotation["iscrowd"] = 1.into();
    }
    std::fs::write(&val, coco.to_string()).unwrap();
    let o = retinanet(&["inspect", "--set", &root, "--split", "val"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stdout).contains("has a box to learn from"));
}
