//! Training end to end through the real binary, on a tiny config: the loss
//! falls and stays finite (in f32 and in bf16 mixed precision), and a run killed with SIGKILL and resumed ends
//! with bit-identical weights to an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/tiny_model.rs"]
mod tiny_model;
use tiny_model::TINY_MODEL;
#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

/// With [`TINY_MODEL`]: a dataset and recipe for a few dozen steps in seconds.
const TINY: &[&str] = &[
    "data.synth.train=24",
    "data.synth.val=6",
    "data.synth.size=64",
    // torchvision's normaliser: detectron2's EMA (the preset's) starts at 100
    // foreground anchors, so over 40 steps of a few boxes its loss rises.
    "loss.normalizer=per_image",
    "train.warmup_steps=5",
    "train.lr=0.01",
    "train.log_every=1",
];

fn train_command(out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    cmd.arg("train").arg("--out").arg(out).env("RETINANET_CACHE", cache_of(out));
    for item in TINY_MODEL.iter().chain(TINY).chain(extra) {
        cmd.arg("--set").arg(item);
    }
    cmd
}

/// The synthetic data's cache of a run in a [`Scratch`]: beside the run, in
/// its scratch folder, so that it goes with it.
fn cache_of(run: &Path) -> PathBuf {
    run.with_file_name("cache")
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "training failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `loss` of every `train` entry of a run's metrics.jsonl.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoints/last/model.safetensors")).unwrap()
}

#[test]
fn loss_falls_and_stays_finite() {
    let out = Scratch::new("smoke");
    let stdout = run_ok(train_command(&out, &["train.max_steps=40"]));
    assert!(stdout.contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"), "{stdout}");
    let l = losses(&out);
    assert_eq!(l.len(), 40);
    assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss did not fall: first {first:.4}, last {last:.4}");
    for f in
        ["config.toml", "eval.json", "loss.png", "checkpoints/last/state.json", "checkpoints/best/model.safetensors"]
    {
        assert!(out.join(f).exists(), "{f} missing");
    }
}

#[test]
fn bf16_mixed_precision_learns_and_keeps_f32_weights() {
    let out = Scratch::new("bf16");
    run_ok(train_command(&out, &["train.max_steps=40", "train.precision=bf16"]));
    let l = losses(&out);
    assert!(l.iter().all(|v| v.is_finite()), "{l:?}");
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "loss did not fall: first {first:.4}, last {last:.4}");
    let path = out.join("checkpoints/last/model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    assert!(!tensors.is_empty());
    for (name, t) in &tensors {
        assert_eq!(t.dtype(), candle_core::DType::F32, "{name}: the master weights stay f32");
    }
}

/// Trains 40 steps uninterrupted, and again killed with SIGKILL after its
/// first checkpoint and resumed; both must end with the same bytes.
fn assert_resume_is_bit_identical(name: &str, extra: &[&str]) {
    let steps: Vec<&str> =
        ["train.max_steps=40", "train.checkpoint_every=4"].into_iter().chain(extra.iter().copied()).collect();
    let whole = Scratch::new(&format!("{name}-whole"));
    run_ok(train_command(&whole, &steps));

    let killed = Scratch::new(&format!("{name}-killed"));
    let mut child = train_command(&killed, &steps).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let state = killed.join("checkpoints/last/state.json");
    let started = Instant::now();
    while !state.exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let killed_at = state["step"].as_u64().unwrap();
    assert!(killed_at < 40, "the run finished before it could be killed");

    let mut resume = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    resume.arg("train").arg("--resume").arg(&killed).env("RETINANET_CACHE", cache_of(&killed));
    run_ok(resume);
    assert!(weights(&whole) == weights(&killed), "resumed weights differ from the uninterrupted run");
    assert_eq!(losses(&whole), losses(&killed), "the metrics history differs");
    let train_weights = |run: &Path| std::fs::read(run.join("checkpoints/last/train_weights.safetensors")).ok();
    assert!(train_weights(&whole) == train_weights(&killed), "the optimiser's weights differ");
}

#[test]
fn sigkill_then_resume_gives_bit_identical_weights() {
    assert_resume_is_bit_identical("plain", &[]);
}

/// Every augmentation and the weight average on, with evaluations between
/// checkpoints: the augmentations are drawn from the image's position, and
/// the average, its update count and the patience count are restored.
#[test]
fn resume_with_augmentations_and_weight_average_is_bit_identical() {
    assert_resume_is_bit_identical(
        "augmented",
        &[
            "input.augment.photometric.prob=0.5",
            "input.augment.zoom_out.prob=0.5",
            "input.augment.iou_crop.prob=0.5",
            "input.augment.scale_jitter.prob=0.5",
            "input.augment.min_visible=0.3",
            "train.ema_decay=0.99",
            "train.ema_warmup_steps=10",
            "train.eval_every_steps=10",
            "train.patience=5",
        ],
    );
}

/// With the weight average, `model.safetensors` holds the average and
/// `train_weights.safetensors` what the optimiser moved; they differ.
#[test]
fn the_weight_average_is_what_the_checkpoint_offers() {
    let out = Scratch::new("ema");
    run_ok(train_command(&out, &["train.max_steps=8", "train.ema_decay=0.9", "train.ema_warmup_steps=1"]));
    let load = |file: &str| {
        candle_core::safetensors::load(out.join("checkpoints/last").join(file), &candle_core::Device::Cpu).unwrap()
    };
    let (average, live) = (load("model.safetensors"), load("train_weights.safetensors"));
    assert_eq!(average.len(), live.len());
    let name = "head.classification_head.cls_logits.weight";
    let diff = (&average[name] - &live[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff > 0.0, "the average equals the live weights");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/last/state.json")).unwrap()).unwrap();
    assert_eq!(state["ema_updates"], 8);
}

/// With weights that cannot change (learning rate 0, no running
/// statistics), the val AP never improves: `train.patience = 2` stops the
/// run at the third evaluation, says so, and the final summary reuses it.
#[test]
fn patience_stops_a_run_that_no_longer_improves() {
    let out = Scratch::new("patience");
    let mut cmd = train_command(
        &out,
        &[
            "train.max_steps=40",
            "train.lr=0",
            "model.backbone.norm=gn",
            "model.backbone.gn_groups=4",
            "train.eval_every_steps=2",
            "train.patience=2",
        ],
    );
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("stopping early at step 6: no better val AP in 2 evaluations"), "{stderr}");
    let entries: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let eval_steps: Vec<u64> =
        entries.iter().filter(|e| e["kind"] == "eval").map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, vec![2, 4, 6]);
    assert_eq!(losses(&out).len(), 6);
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/best/state.json")).unwrap()).unwrap();
    assert_eq!(best["step"], 2);
}

/// A trained run folder is used by `eval --weights` and `predict`.
#[test]
fn eval_and_predict_use_a_trained_run() {
    let out = Scratch::new("use");
    run_ok(train_command(&out, &["train.max_steps=6"]));
    let retinanet = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retinanet"));
        cmd.env("RETINANET_CACHE", cache_of(&out));
        cmd
    };

    let mut eval = retinanet();
    let eval_out = out.join("eval-out");
    eval.args(["eval", "--json", "--weights"]).arg(&out).arg("--out").arg(&eval_out);
    let report: serde_json::Value = serde_json::from_str(&run_ok(eval)).unwrap();
    assert_eq!(report["stats"].as_array().unwrap().len(), 12);
    assert_eq!(report["images"], 6);
    assert!(eval_out.join("detections.json").exists() && eval_out.join("eval.json").exists());

    // The cache folder is named after the generator's version and data.synth:
    // train, val, size, seed.
    let images = cache_of(&out).join("shapes-v2-24-6-64-0/images");
    let image = images.join("val_000000.png");
    let mut predict = retinanet();
    let drawn = out.join("drawn");
    predict
        .args(["predict", "--json", "--score-thresh", "0.0", "--weights"])
        .arg(&out)
        .arg(&image)
        .arg("--out")
        .arg(&drawn);
    let results: serde_json::Value = serde_json::from_str(&run_ok(predict)).unwrap();
    let first = &results[0];
    assert_eq!((first["width"].as_u64(), first["height"].as_u64()), (Some(64), Some(64)));
    let dets = first["detections"].as_array().unwrap();
    assert!(!dets.is_empty(), "a score threshold of 0 keeps detections");
    let scores: Vec<f64> = dets.iter().map(|d| d["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best score first");
    assert!(["circle", "square", "triangle"].contains(&dets[0]["label"].as_str().unwrap()));
    assert!(drawn.join("val_000000.jpg").exists() && drawn.join("predictions.json").exists());

    // predict --split writes the split's image ids, which eval --gt --dt
    // scores to eval --weights' numbers.
    let split_out = out.join("split-predictions");
    let mut predict_split = retinanet();
    predict_split.args(["predict", "--weights"]).arg(&out).args(["--split", "val", "--out"]).arg(&split_out);
    run_ok(predict_split);
    let gt = cache_of(&out).join("shapes-v2-24-6-64-0/annotations/instances_val.json");
    let mut score = retinanet();
    score.args(["eval", "--json", "--gt"]).arg(&gt).arg("--dt").arg(split_out.join("predictions.json"));
    let scored: serde_json::Value = serde_json::from_str(&run_ok(score)).unwrap();
    assert_eq!(scored["stats"], report["stats"], "eval --gt --dt on predict --split's output");
    let files: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(drawn.join("predictions.json")).unwrap()).unwrap();
    assert!(files.iter().all(|d| d["image_id"] == 1 && d["file_name"] == image.to_str().unwrap()));

    // A bare .safetensors file needs --config.
    let mut bare = retinanet();
    bare.args(["predict", "--weights"]).arg(out.join("checkpoints/last/model.safetensors")).arg(&image);
    let o = bare.output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --config"));
}

/// A checkpoint write that fails (here: a file-size limit, which fails a
/// write the way a full disk does) is an error, and `last` still names the
/// previous, complete checkpoint.
#[cfg(target_os = "linux")]
#[test]
fn failed_checkpoint_write_keeps_the_previous_one() {
    use std::os::unix::process::CommandExt;

    let out = Scratch::new("diskfull");
    run_ok(train_command(&out, &["train.max_steps=8", "train.checkpoint_every=4"]));
    let last = out.join("checkpoints/last");
    let before = weights(&out);
    let limit = (before.len() / 2) as libc::rlim_t;
    assert!(
        std::fs::metadata(out.join("metrics.jsonl")).unwrap().len() < limit / 2,
        "the limit must hit the checkpoint"
    );

    let mut resume = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    resume.args(["train", "--set", "train.max_steps=16", "--resume"]).arg(&out).env("RETINANET_CACHE", cache_of(&out));
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        resume.pre_exec(move || {
            let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            match libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let o = resume.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("cannot write checkpoint"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 8, "last moved to a checkpoint that was not written");
    assert!(weights(&out) == before, "the previous checkpoint changed");
    let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

/// `train --resume run`, reading the synthetic data from `cache`.
fn resume_command(run: &Path, cache: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retinanet"));
    cmd.arg("train").arg("--resume").arg(run).env("RETINANET_CACHE", cache);
    cmd
}

/// Waits until the run has a `last` checkpoint.
fn wait_for_checkpoint(run: &Path) {
    let started = Instant::now();
    while !run.join("checkpoints/last/state.json").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `checkpoints/last` holds a step after `step`.
fn wait_for_step_after(run: &Path, step: u64) {
    let state = run.join("checkpoints/last/state.json");
    let saved = || -> Option<u64> {
        let text = std::fs::read_to_string(&state).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
    };
    let started = Instant::now();
    while saved().is_none_or(|saved| saved <= step) {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint after step {step} appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `checkpoints/last` is complete: its state parses and both tensor files load.
fn assert_last_loadable(run: &Path) -> u64 {
    let last = run.join("checkpoints/last");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(last.join("state.json")).unwrap())
        .unwrap_or_else(|e| panic!("state.json of {}: {e}", last.display()));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let tensors = candle_core::safetensors::load(last.join(file), &candle_core::Device::Cpu)
            .unwrap_or_else(|e| panic!("{file} of {}: {e}", last.display()));
        assert!(!tensors.is_empty(), "{file} is empty");
    }
    state["step"].as_u64().unwrap()
}

#[test]
fn sigkill_at_any_moment_leaves_last_loadable() {
    // A checkpoint every step: most of the run's time is spent writing and
    // syncing them, so the kills land inside writes as well as between.
    let out = Scratch::new("killloop");
    let mut steps_seen = Vec::new();
    for attempt in 0..6u64 {
        let mut cmd = if attempt == 0 {
            train_command(&out, &["train.max_steps=1000", "train.checkpoint_every=1"])
        } else {
            resume_command(&out, &cache_of(&out))
        };
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        wait_for_checkpoint(&out);
        if attempt % 2 == 1 {
            // Every other resumed run dies only after saving a step of its
            // own, so the runs make progress however loaded the machine is
            // (under load the delay alone can end a run before its first
            // step); the others die wherever the delay lands, start-up included.
            wait_for_step_after(&out, steps_seen[steps_seen.len() - 1]);
        }
        std::thread::sleep(Duration::from_millis(40 + 37 * attempt));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        steps_seen.push(assert_last_loadable(&out));
    }
    assert!(steps_seen.windows(2).all(|w| w[0] <= w[1]), "last went back: {steps_seen:?}");
    assert!(steps_seen.last() > steps_seen.first(), "the resumed runs made no progress: {steps_seen:?}");
}

#[cfg(unix)]
#[test]
fn sigint_saves_a_checkpoint_and_exits_cleanly() {
    let out = Scratch::new("sigint");
    let child = train_command(&out, &["train.max_steps=100000", "train.checkpoint_every=100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few logged steps, then press Ctrl-C.
    let metrics = out.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map(|m| m.lines().count()).unwrap_or(0) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill only sends a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let step = assert_last_loadable(&out);
    assert!(stderr.contains(&format!("stopped at step {step}; checkpoint saved")), "{stderr}");
    assert!(stderr.contains("retinanet train --resume"), "{stderr}");
}

/// Copies the files of a checkpoint folder (through its link) to `to`.
fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A run resumed from an earlier checkpoint with another learning rate
/// writes the steps the abandoned run had saved anew: `last` then holds the
/// resumed run's weights, not the abandoned run's.
#[test]
fn resuming_an_earlier_checkpoint_rewrites_later_steps() {
    let out = Scratch::new("rewrite");
    run_ok(train_command(&out, &["train.max_steps=2"]));
    let kept = Scratch::new("rewrite-step2");
    copy_checkpoint(&out.join("checkpoints/last"), &kept);
    let mut further = resume_command(&out, &cache_of(&out));
    further.args(["--set", "train.max_steps=4"]);
    run_ok(further);
    let abandoned = weights(&out);

    // The step-2 checkpoint back in the run, resumed with lr 0.05 to step 4.
    let earlier = out.join("checkpoints/step-00000002");
    copy_checkpoint(&kept, &earlier);
    let mut resumed = resume_command(&earlier, &cache_of(&out));
    resumed.args(["--set", "train.max_steps=4", "--set", "train.lr=0.05"]);
    run_ok(resumed);
    assert_eq!(assert_last_loadable(&out), 4);
    assert!(weights(&out) != abandoned, "last holds the abandoned run's weights");
    let config = std::fs::read_to_string(out.join("checkpoints/last/config.toml")).unwrap();
    assert!(config.contains("lr = 0.05"), "{config}");
}
