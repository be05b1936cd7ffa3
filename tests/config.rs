//! Config resolution: presets, inheritance, `--set` overrides and errors.

use candle_retinanet::config::{BackboneNorm, Config, P6Source, PRESETS};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn set(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_preset_resolves_and_round_trips_through_toml() {
    for (name, _) in PRESETS {
        let config = Config::resolve(Some(name), &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(config.name, *name);
        let path = Scratch::new(&format!("{name}.toml"));
        std::fs::write(&path, config.to_toml()).unwrap();
        assert_eq!(Config::from_file(&path).unwrap(), config, "{name} changes when written and read back");
    }
}

#[test]
fn presets_hold_their_recipes() {
    let coco = Config::resolve(Some("retinanet_r50_fpn_coco"), &[]).unwrap();
    assert_eq!((coco.train.batch_size, coco.train.max_steps, coco.train.warmup_steps), (16, 90_000, 1000));
    assert_eq!(coco.train.lr_steps, vec![60_000, 80_000]);
    assert_eq!((coco.input.min_size.clone(), coco.input.max_size), (vec![800], 1333));
    assert_eq!(coco.model.fpn.p6_from, P6Source::C5);
    let tv = Config::resolve(Some("torchvision_retinanet_r50_fpn"), &[]).unwrap();
    assert_eq!((tv.model.num_classes, tv.model.backbone.norm_eps), (91, 0.0));
    assert_eq!(tv.model.postprocess.detections_per_img, 300);
    assert_eq!(Config::resolve(None, &[]).unwrap().name, "shapes");
}

#[test]
fn overrides_parse_toml_values_with_string_fallback() {
    let c = Config::resolve(
        Some("shapes"),
        &set(&[
            "train.batch_size=3",
            "input.min_size=[160, 192]",
            "model.backbone.norm=gn",
            "data.root=some/folder",
            "train.lr=1",
        ]),
    )
    .unwrap();
    assert_eq!(c.train.batch_size, 3);
    assert_eq!(c.input.min_size, vec![160, 192]);
    assert_eq!(c.model.backbone.norm, BackboneNorm::Gn);
    assert_eq!(c.data.root, "some/folder");
    assert_eq!(c.train.lr, 1.0, "an integer is accepted where a number is expected");
}

#[test]
fn a_file_inherits_its_base() {
    let path = Scratch::new("child.toml");
    std::fs::write(&path, "base = \"bccd\"\n[train]\nepochs = 3\n").unwrap();
    let c = Config::resolve(Some(path.to_str().unwrap()), &[]).unwrap();
    assert_eq!(c.train.epochs, 3);
    let bccd = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/bccd");
    assert_eq!(c.data.root, bccd.to_str().unwrap(), "the rest comes from the base, its root in assets/");
    assert_eq!(c.name, "child", "a file's config is named after it");
}

#[test]
fn unknown_keys_list_the_valid_ones_at_their_level() {
    let err = format!("{:#}", Config::resolve(None, &set(&["train.batchsize=2"])).unwrap_err());
    assert!(err.contains("unknown config key train.batchsize"), "{err}");
    assert!(err.contains("valid keys at train:") && err.contains("batch_size"), "{err}");
    let err = format!("{:#}", Config::resolve(None, &set(&["modle.x=1"])).unwrap_err());
    assert!(err.contains("unknown config key modle") && err.contains("the top level"), "{err}");
}

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let cases = [
        ("train.batch_size=abc", "config key train.batch_size: expected an integer, got a string"),
        ("input.min_size=[1.5]", "config key input.min_size: expected an array of an integer"),
        ("train.seed=true", "config key train.seed: expected an integer, got a boolean"),
        ("model.backbone.norm=fancy", "config key model.backbone.norm: unknown variant `fancy`"),
        ("model.backbone.depth=19", "model.backbone.depth: expected 18, 34, 50 or 101"),
        ("input.augment.zoom_out.prob=1.5", "config key input.augment.zoom_out.prob: expected a probability"),
        ("input.augment.zoom_out.max_ratio=0.5", "config key input.augment.zoom_out.max_ratio: expected at least 1"),
        ("input.augment.iou_crop.min_ious=[]", "config key input.augment.iou_crop.min_ious"),
        ("input.augment.photometric.hue=0.7", "config key input.augment.photometric.hue"),
        ("input.augment.scale_jitter.min_scale=3.0", "config key input.augment.scale_jitter.min_scale"),
        ("input.augment.blur.prob=0.5", "unknown config key input.augment.blur"),
        ("train.ema_decay=1.0", "config key train.ema_decay: expected a decay in [0, 1)"),
        ("loss.box_weight=0", "config key loss.box_weight: expected a finite weight > 0"),
        ("loss.focal_alpha=1.5", "config key loss.focal_alpha"),
        ("loss.bg_iou_thresh=0.6", "config key loss.fg_iou_thresh / bg_iou_thresh"),
    ];
    for (item, expected) in cases {
        let err = format!("{:#}", Config::resolve(None, &set(&[item])).unwrap_err());
        assert!(err.contains(expected), "{item}: {err}");
    }
}

#[test]
fn unknown_presets_and_bad_files_are_named() {
    let err = format!("{:#}", Config::resolve(Some("nope"), &[]).unwrap_err());
    assert!(err.contains("nope") && err.contains("shapes, bccd"), "{err}");
    let path = Scratch::new("bad.toml");
    std::fs::write(&path, "[train\nepochs = 3\n").unwrap();
    let err = format!("{:#}", Config::resolve(Some(path.to_str().unwrap()), &[]).unwrap_err());
    assert!(err.contains(path.to_str().unwrap()), "{err}");
}
