//! The real binary on bad inputs: exit code 1, one `error:` line naming the
//! file, field or key, and no panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
fn dataset(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let o = retinanet(&["synth", "--out", dir.to_str().unwrap(), "--train", "8", "--val", "2", "--size", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir
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
    let dir = std::env::temp_dir().join(format!("retinanet-bad-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("x.png");
    image::RgbImage::new(32, 32).save(&image).unwrap();
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
    let blocker = std::env::temp_dir().join(format!("retinanet-bad-file-{}", std::process::id()));
    std::fs::write(&blocker, b"a file, not a folder").unwrap();
    let out = blocker.join("sub");
    assert_error(&retinanet(&["synth", "--out", out.to_str().unwrap(), "--train", "1", "--val", "1"]), &["sub"]);
}
