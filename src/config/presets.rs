//! The presets shipped in `configs/`, compiled into the binary so that
//! `--config NAME` works from any folder, and the assets folder their data
//! lives in.

use std::path::PathBuf;

/// `(name, TOML text)` of every preset.
pub const PRESETS: &[(&str, &str)] = &[
    ("shapes", include_str!("../../configs/shapes.toml")),
    ("bccd", include_str!("../../configs/bccd.toml")),
    ("retinanet_r50_fpn_coco", include_str!("../../configs/retinanet_r50_fpn_coco.toml")),
    ("torchvision_retinanet_r50_fpn", include_str!("../../configs/torchvision_retinanet_r50_fpn.toml")),
    ("torchvision_retinanet_r50_fpn_v2", include_str!("../../configs/torchvision_retinanet_r50_fpn_v2.toml")),
    ("finetune", include_str!("../../configs/finetune.toml")),
    ("finetune_coco", include_str!("../../configs/finetune_coco.toml")),
];

/// The preset used when `--config` is not given.
pub const DEFAULT_PRESET: &str = "shapes";

/// Overrides where presets find their data (`assets/` of the repository).
pub const ASSETS_ENV: &str = "RETINANET_ASSETS";

/// The folder a preset's relative `data.root` is relative to:
/// `$RETINANET_ASSETS`, else the `assets/` folder of the repository this
/// binary was built from.
pub fn assets_dir() -> PathBuf {
    std::env::var_os(ASSETS_ENV).map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"), PathBuf::from)
}
