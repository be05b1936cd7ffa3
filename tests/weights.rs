//! PyTorch checkpoints as `torch.save` writes them, with the key layouts of
//! torchvision's published weights at tiny widths
//! (`tests/fixtures/weights/make_weights.py`): ImageNet ResNet-18/34/50/101,
//! RetinaNet v1 and v2, and a reference-script checkpoint that nests the
//! state_dict under "model". Every tensor a model loads must equal the
//! file's, checked against torch's own sum and sum of |x| of each tensor
//! (weights.json), so a loader that loads nothing fails.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
#[path = "support/scratch.rs"]
mod scratch;
use candle_retinanet::config::{HeadNorm, ModelConfig, P6Source};
use candle_retinanet::model::{self, LoadMode, LoadedModel};
use candle_retinanet::run::{read_weights, write_weights};
use scratch::Scratch;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights").join(name)
}

/// weights.json's entry for one file.
fn meta(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("weights.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()[file].clone()
}

/// The model the file's layout fits: a tiny ResNet-FPN; `v2` is
/// torchvision's v2 (P6 from C5, GroupNorm head towers).
fn model_config(meta: &serde_json::Value, v2: bool) -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.backbone.depth = meta["depth"].as_u64().unwrap() as usize;
    cfg.backbone.width = meta["width"].as_u64().unwrap() as usize;
    cfg.fpn.channels = meta["fpn"].as_u64().unwrap_or(8) as usize;
    if v2 {
        cfg.fpn.p6_from = P6Source::C5;
        cfg.head.norm = HeadNorm::Gn;
    }
    cfg
}

/// (sum, sum of |x|) in f64, as make_weights.py's `checksum`.
fn checksum(t: &Tensor) -> [f64; 2] {
    let values = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    values.iter().fold([0.0, 0.0], |[s, a], v| [s + v, a + v.abs()])
}

/// Checks the loaded variable `name` against torch's numbers for `key`.
fn assert_loaded(loaded: &HashMap<String, Tensor>, name: &str, expected: &serde_json::Value) {
    let tensor = loaded.get(name).unwrap_or_else(|| panic!("{name} was not loaded"));
    let shape: Vec<usize> = serde_json::from_value(expected["shape"].clone()).unwrap();
    assert_eq!(tensor.dims(), shape.as_slice(), "{name}");
    let [sum, abs]: [f64; 2] = serde_json::from_value(expected["checksum"].clone()).unwrap();
    let ours = checksum(tensor);
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * abs.max(1.0);
    assert!(close(ours[0], sum) && close(ours[1], abs), "{name}: ours {ours:?}, torch's {:?}", [sum, abs]);
}

fn build(cfg: &ModelConfig, classes: usize, file: &str, mode: LoadMode) -> LoadedModel {
    let tensors = read_weights(&fixture(file)).unwrap();
    // A seed of its own: only loading makes a tensor equal the file's.
    model::build(cfg, classes, &Device::Cpu, 7, Some((&tensors, mode))).unwrap_or_else(|e| panic!("{file}: {e:#}"))
}

#[test]
fn imagenet_resnets_load_into_the_backbone() {
    for depth in [18, 34, 50, 101] {
        let file = format!("resnet{depth}.pth");
        let meta = meta(&file);
        let loaded = build(&model_config(&meta, false), 3, &file, LoadMode::Backbone);
        assert_eq!(loaded.notes.len(), 1, "{file}: {:?}", loaded.notes); // fc.* ignored
        let state = model::state_dict(&loaded.varmap);
        let mut checked = 0;
        for (key, expected) in meta["tensors"].as_object().unwrap() {
            if key.starts_with("fc.") || key.ends_with("num_batches_tracked") {
                continue;
            }
            assert_loaded(&state, &format!("backbone.body.{key}"), expected);
            checked += 1;
        }
        assert!(checked > 20, "{file}: {checked} tensors");
    }
}

#[test]
fn retinanet_v1_and_v2_load_whole() {
    for (file, v2) in [("retinanet_v1.pth", false), ("retinanet_v2.pth", true), ("reference_checkpoint.pth", false)] {
        let meta = meta(file);
        let classes = meta["classes"].as_u64().unwrap() as usize;
        let loaded = build(&model_config(&meta, v2), classes, file, LoadMode::Exact);
        let state = model::state_dict(&loaded.varmap);
        let tensors = meta["tensors"].as_object().unwrap();
        for (key, expected) in tensors {
            assert_loaded(&state, key, expected);
        }
        assert_eq!(state.len(), tensors.len(), "{file}: every model tensor comes from the file");
    }
}

#[test]
fn another_class_count_reinitialises_only_the_classification_output() {
    let meta = meta("retinanet_v1.pth");
    let loaded = build(&model_config(&meta, false), 5, "retinanet_v1.pth", LoadMode::NewClasses);
    assert_eq!(loaded.notes.len(), 2, "{:?}", loaded.notes);
    let state = model::state_dict(&loaded.varmap);
    for (key, expected) in meta["tensors"].as_object().unwrap() {
        if key.starts_with("head.classification_head.cls_logits.") {
            assert_eq!(state[key].dim(0).unwrap(), 5 * 9, "{key}: 9 anchors x 5 classes");
        } else {
            assert_loaded(&state, key, expected);
        }
    }
}

#[test]
fn a_pytorch_checkpoint_converts_to_safetensors_unchanged() {
    let tensors = read_weights(&fixture("retinanet_v2.pth")).unwrap();
    let out = Scratch::new("weights.safetensors");
    write_weights(&tensors, &out).unwrap();
    let back = read_weights(&out).unwrap();
    assert_eq!(back.len(), tensors.len());
    for (key, expected) in meta("retinanet_v2.pth")["tensors"].as_object().unwrap() {
        assert_loaded(&back, key, expected);
        assert_eq!(back[key].dtype(), tensors[key].dtype(), "{key} keeps its dtype");
    }
}

#[test]
fn a_file_that_is_no_weights_names_the_formats() {
    let path = Scratch::new("not-weights.pth");
    std::fs::write(&path, b"just some text").unwrap();
    let err = format!("{:#}", read_weights(&path).unwrap_err());
    assert!(err.contains(path.to_str().unwrap()) && err.contains(".safetensors") && err.contains(".pth"), "{err}");
}

/// `convert-weights` through the binary: checked against a config's model,
/// then written; a model of other widths is one error naming the tensors.
#[test]
fn convert_weights_checks_against_a_config_and_writes_safetensors() {
    let out = Scratch::new("converted.safetensors");
    let input = fixture("resnet18.pth");
    let convert = |width: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_retinanet"))
            .args(["convert-weights", input.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(["--config", "shapes", "--set", "model.backbone.norm=frozen_bn", "--set", width])
            .output()
            .unwrap()
    };
    let o = convert("model.backbone.width=2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let written = read_weights(&out).unwrap();
    assert_eq!(written.len(), read_weights(&input).unwrap().len());
    std::fs::remove_file(&out).unwrap();
    let o = convert("model.backbone.width=4");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("shape of conv1.weight: checkpoint [2, 3, 7, 7], model [4, 3, 7, 7]"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written after a failed check");
}

/// The presets for torchvision's weights take their layouts: the v2 preset
/// loads the v2 file whole, finetune_coco the v1 file with a new class
/// count (at the fixtures' tiny widths).
#[test]
fn the_torchvision_presets_load_their_layouts() {
    use candle_retinanet::config::Config;
    let tiny = |fpn: u64| {
        ["model.backbone.width=2".to_string(), format!("model.fpn.channels={fpn}"), "model.num_classes=3".into()]
    };
    let v2 = Config::resolve(Some("torchvision_retinanet_r50_fpn_v2"), &tiny(32)).unwrap();
    let loaded = build(&v2.model, 3, "retinanet_v2.pth", LoadMode::Exact);
    assert_eq!(model::state_dict(&loaded.varmap).len(), meta("retinanet_v2.pth")["tensors"].as_object().unwrap().len());

    let coco = Config::resolve(Some("finetune_coco"), &tiny(8)).unwrap();
    let tensors = read_weights(&fixture("retinanet_v1.pth")).unwrap();
    assert_eq!(LoadMode::for_pretrained(&tensors), LoadMode::NewClasses);
    let loaded = build(&coco.model, 2, "retinanet_v1.pth", LoadMode::NewClasses);
    assert!(loaded.notes.iter().all(|n| n.contains("cls_logits")), "{:?}", loaded.notes);
    let imagenet = read_weights(&fixture("resnet50.pth")).unwrap();
    assert_eq!(LoadMode::for_pretrained(&imagenet), LoadMode::Backbone);
}

/// The finetune preset trains from ImageNet weights given as a PyTorch
/// file, with data.root and the weights as the only data options (plus the
/// fixture's tiny widths and a short run).
#[test]
fn the_finetune_preset_trains_from_a_pytorch_resnet() {
    let dir = Scratch::new("finetune");
    let data = dir.join("data");
    let synth = std::process::Command::new(env!("CARGO_BIN_EXE_retinanet"))
        .args(["synth", "--out", data.to_str().unwrap(), "--train", "4", "--val", "2", "--size", "64"])
        .output()
        .unwrap();
    assert!(synth.status.success());
    let weights = format!("model.backbone.weights={}", fixture("resnet50.pth").display());
    let root = format!("data.root={}", data.display());
    let run = dir.join("run");
    let mut args = vec!["train", "--config", "finetune", "--out", run.to_str().unwrap()];
    for set in [
        weights.as_str(),
        root.as_str(),
        "model.backbone.width=2",
        "model.fpn.channels=16",
        "input.min_size=[64]",
        "input.max_size=64",
        "train.batch_size=2",
        "train.max_steps=2",
        "train.warmup_steps=1",
    ] {
        args.extend(["--set", set]);
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_retinanet")).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("fc."), "the ImageNet classifier is left out with a note: {stderr}");
    assert!(run.join("checkpoints/last/model.safetensors").exists());
}
