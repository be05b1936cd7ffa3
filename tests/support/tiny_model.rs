//! The `--set` overrides of a model small enough for a few dozen training
//! steps in seconds, at 64 px, shared by the tests that train through the
//! binary (`#[path]`-included, so that each takes only this).

/// A tiny RetinaNet at 64x64 input, batch 4, one loader thread.
pub(crate) const TINY_MODEL: &[&str] = &[
    "input.min_size=[64]",
    "input.max_size=64",
    "model.backbone.width=8",
    "model.fpn.channels=32",
    "model.head.num_convs=1",
    "model.anchors.sizes=[8, 16, 32, 64, 128]",
    "train.batch_size=4",
    "train.workers=1",
];
