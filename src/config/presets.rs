//! The presets shipped in `configs/`, compiled into the binary so that
//! `--config NAME` works from any folder.

/// `(name, TOML text)` of every preset.
pub const PRESETS: &[(&str, &str)] = &[
    ("shapes", include_str!("../../configs/shapes.toml")),
    ("bccd", include_str!("../../configs/bccd.toml")),
    ("retinanet_r50_fpn_coco", include_str!("../../configs/retinanet_r50_fpn_coco.toml")),
    ("torchvision_retinanet_r50_fpn", include_str!("../../configs/torchvision_retinanet_r50_fpn.toml")),
];

/// The preset used when `--config` is not given.
pub const DEFAULT_PRESET: &str = "shapes";
