//! The real binary on bad inputs: exit code 1, one `error:` line naming the
//! file, field or key, and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn retinanet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retinanet"))
        .args(args)
        .env("RETINANET_CACHE", std::env::temp_dir().join(format!("retinanet-bad-cache-{}", std::process::id())))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

/// Exit code 1 and exactly one `error:` line, the last one on stderr, with
/// every needle in it (progress lines may come before it).
fn assert_error(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert_eq!(err.lines().last(), Some(errors[0]), "the error line comes last: {err}");
    for n in needles {
        assert!(errors[0].contains(n), "`{n}` missing from: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// A small synthetic dataset of 8 train and 2 val images, 64 px.
fn dataset(name: &str) -> Scratch {
    let dir = Scratch::new(name);
    let o = retinanet(&["synth", "--out", dir.to_str().unwrap(), "--train", "8", "--val", "2", "--size", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
}

/// A fresh folder holding one black 32x32 image, `x.png`; returns both.
fn folder_with_an_image(name: &str) -> (Scratch, PathBuf) {
    let dir = Scratch::folder(name);
    let image = dir.join("x.png");
    image::RgbImage::new(32, 32).save(&image).unwrap();
    (dir, image)
}

fn train_on(dir: &Path) -> Output {
    train_with(dir, &[])
}

fn train_with(dir: &Path, extra: &[&str]) -> Output {
    let root = format!("data.root={}", dir.display());
    let out = dir.join("run");
    let mut args = vec![
        "train",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &root,
        "--set",
        "train.max_steps=1",
        "--set",
        "input.min_size=[64]",
        "--set",
        "input.max_size=64",
        "--set",
        "model.backbone.width=8",
        "--set",
        "model.fpn.channels=32",
    ];
    for item in extra {
        args.extend(["--set", item]);
    }
    retinanet(&args)
}

#[test]
fn a_diverging_run_stops_with_the_step_and_images() {
    let dir = dataset("nan");
    let o =
        train_with(&dir, &["train.lr=1e12", "train.warmup_steps=0", "train.max_steps=30", "train.checkpoint_every=1"]);
    assert_error(&o, &["is not finite", "on image ids [", "the last good checkpoint is"]);
}

#[test]
fn broken_annotation_files_name_the_file_and_place() {
    let dir = dataset("json");
    let file = dir.join("annotations/instances_train.json");
    std::fs::write(&file, "{\"images\": [,]}").unwrap();
    assert_error(&train_on(&dir), &["instances_train.json", "line 1 column"]);

    std::fs::write(&file, r#"{"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], "categories": [{"id": 1, "name": "a"}], "annotations": [{"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 4, 4]}]}"#).unwrap();
    assert_error(&train_on(&dir), &["instances_train.json", "annotations[0] (id 4): image_id 2 is not in images"]);
}

#[test]
fn missing_and_corrupt_images_name_the_file() {
    let dir = dataset("images");
    let images = dir.join("images");
    std::fs::remove_file(images.join("train_000003.png")).unwrap();
    for f in std::fs::read_dir(&images).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap().to_string_lossy().starts_with("train_") {
            std::fs::write(&f, b"").unwrap(); // zero bytes
        }
    }
    assert_error(&train_on(&dir), &["images/train_0000"]);
}

#[test]
fn an_empty_training_split_is_an_error() {
    let dir = dataset("empty");
    let file = dir.join("annotations/instances_train.json");
    std::fs::write(&file, r#"{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}"#).unwrap();
    assert_error(&train_on(&dir), &["training split has no images"]);
}

#[test]
fn bad_weights_name_the_file_or_tensor() {
    let (dir, image) = folder_with_an_image("weights");
    let image = image.to_str().unwrap();

    assert_error(&retinanet(&["predict", "--weights", "/no/such/run", image]), &["--weights /no/such/run"]);

    let not_safetensors = dir.join("model.safetensors");
    std::fs::write(&not_safetensors, b"not a safetensors file").unwrap();
    let w = not_safetensors.to_str().unwrap();
    assert_error(&retinanet(&["predict", "--config", "torchvision_retinanet_r50_fpn", "--weights", w, image]), &[w]);
    assert_error(&retinanet(&["predict", "--weights", w, image]), &["needs --config"]);
}

#[test]
fn devices_and_output_folders() {
    assert_error(&retinanet(&["bench", "--device", "gpu", "--size", "64", "--steps", "1"]), &["--device gpu"]);
    if !cfg!(feature = "cuda") {
        assert_error(&retinanet(&["bench", "--device", "cuda", "--size", "64"]), &["built without CUDA"]);
    }
    let blocker = Scratch::new("blocker");
    std::fs::write(&blocker, b"a file, not a folder").unwrap();
    let out = blocker.join("sub");
    assert_error(&retinanet(&["synth", "--out", out.to_str().unwrap(), "--train", "1", "--val", "1"]), &["sub"]);
}

/// Rewrites the training annotations with `edit` applied to their JSON.
fn edit_train_json(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let file = dir.join("annotations/instances_train.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&file, json.to_string()).unwrap();
}

#[test]
fn inconsistent_annotation_files_name_the_entry() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(Edit, &[&str]); 6] = [
        (|j| j["images"][1]["id"] = j["images"][0]["id"].clone(), &["images[1]: duplicate image id"]),
        (
            |j| j["annotations"][1]["id"] = j["annotations"][0]["id"].clone(),
            &["annotations[1]", "duplicate annotation id"],
        ),
        (
            |j| j["annotations"][0]["category_id"] = 99.into(),
            &["annotations[0]", "category_id 99 is not in categories"],
        ),
        (|j| j["images"][0]["width"] = 0.into(), &["images[0]", "zero width or height"]),
        (|j| j["images"][0]["width"] = "64".into(), &["invalid type: string \"64\""]),
        (|j| j.as_object_mut().unwrap().remove("categories").map(drop).unwrap(), &["missing field `categories`"]),
    ];
    for (i, (edit, needles)) in cases.into_iter().enumerate() {
        let dir = dataset(&format!("inconsistent{i}"));
        edit_train_json(&dir, edit);
        let mut all = vec!["instances_train.json"];
        all.extend_from_slice(needles);
        assert_error(&train_on(&dir), &all);
    }
}

#[test]
fn boxes_are_repaired_with_a_warning_or_leave_nothing_to_learn() {
    // Partly outside: clipped, counted, and training goes on.
    let dir = dataset("clip");
    edit_train_json(&dir, |j| j["annotations"][0]["bbox"] = serde_json::json!([-10, -10, 30, 30]));
    let o = train_on(&dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.lines().any(|l| l.starts_with("warning: ") && l.contains("clipped 1 box")), "{err}");

    // Negative, zero-size and outside boxes are dropped; when no box is left
    // there is nothing to learn.
    let dir = dataset("degenerate");
    edit_train_json(&dir, |j| {
        let bad = [[-5.0, 10.0, 0.0, 4.0], [3.0, 3.0, -2.0, 5.0], [100.0, 100.0, 5.0, 5.0], [1.0, 1.0, 1e-9, 0.0]];
        for (k, ann) in j["annotations"].as_array_mut().unwrap().iter_mut().enumerate() {
            ann["bbox"] = serde_json::json!(bad[k % bad.len()]);
        }
    });
    let o = train_on(&dir);
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning: "), "the dropped boxes are counted");
    assert_error(&o, &["instances_train.json", "none of the 8 training images has a box"]);

    let dir = dataset("no-boxes");
    edit_train_json(&dir, |j| j["annotations"] = serde_json::json!([]));
    assert_error(&train_on(&dir), &["none of the 8 training images has a box"]);
}

#[test]
fn results_files_name_the_entry() {
    let dir = dataset("results");
    let gt = dir.join("annotations/instances_val.json");
    let gt_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&gt).unwrap()).unwrap();
    let image_id = gt_json["images"][0]["id"].clone();
    let category_id = gt_json["categories"][0]["id"].clone();
    let good =
        serde_json::json!({"image_id": image_id, "category_id": category_id, "bbox": [1, 1, 5, 5], "score": 0.5});
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("image_id", 987654.into(), "entry 1: image_id 987654 is not in the ground truth"),
        ("category_id", 77.into(), "entry 1: category_id 77 is not in the ground-truth categories"),
        ("score", serde_json::Value::Null, "entry 1:"),
        ("bbox", serde_json::json!([1, 2]), "entry 1:"),
    ];
    for (field, value, needle) in cases {
        let mut bad = good.clone();
        match value {
            serde_json::Value::Null => drop(bad.as_object_mut().unwrap().remove(field)),
            v => bad[field] = v,
        }
        let dt = dir.join(format!("dt-{field}.json"));
        std::fs::write(&dt, serde_json::json!([good, bad]).to_string()).unwrap();
        let o = retinanet(&["eval", "--gt", gt.to_str().unwrap(), "--dt", dt.to_str().unwrap()]);
        assert_error(&o, &[dt.file_name().unwrap().to_str().unwrap(), needle]);
    }
}

#[test]
fn weights_of_another_architecture_list_the_mismatches() {
    let (dir, image) = folder_with_an_image("arch");
    // The shapes preset's 16-channel stem where ResNet-50 has 64 channels,
    // and a tensor the model does not have.
    let dev = candle_core::Device::Cpu;
    let tensors = std::collections::HashMap::from([
        (
            "backbone.body.conv1.weight".to_string(),
            candle_core::Tensor::zeros((16, 3, 7, 7), candle_core::DType::F32, &dev).unwrap(),
        ),
        ("fc.weight".to_string(), candle_core::Tensor::zeros((10, 2048), candle_core::DType::F32, &dev).unwrap()),
    ]);
    let weights = dir.join("other.safetensors");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let o = retinanet(&[
        "predict",
        "--config",
        "torchvision_retinanet_r50_fpn",
        "--weights",
        weights.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let mismatch = "shape of backbone.body.conv1.weight: checkpoint [16, 3, 7, 7], model [64, 3, 7, 7]";
    assert_error(&o, &["other.safetensors", mismatch, "missing backbone.body.bn1.bias", "problems"]);
}

/// A run that fails before its first step (bad data, bad weights, a bad
/// config value) leaves no run folder behind: the folder is made once the
/// data, the model and its weights are ready.
#[test]
fn a_run_that_fails_before_its_first_step_leaves_no_folder() {
    let dir = dataset("nofolder");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not weights").unwrap();
    let weights = format!("model.backbone.weights={}", garbage.display());
    for (extra, needle) in [
        (weights.as_str(), "garbage.safetensors"),
        ("model.num_classes=1", "model.num_classes"),
        ("train.precision=f16", "train.precision"),
    ] {
        assert_error(&train_with(&dir, &[extra]), &[needle]);
        assert!(!dir.join("run").exists(), "{extra}: a run folder was left behind");
    }
    let annotations = dir.join("annotations/instances_val.json");
    std::fs::write(&annotations, "{ broken").unwrap();
    assert_error(&train_on(&dir), &["instances_val.json"]);
    assert!(!dir.join("run").exists(), "broken val annotations: a run folder was left behind");
}
