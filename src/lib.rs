//! candle-retinanet: RetinaNet object detection (Lin et al. 2017) in Rust
//! on Candle: train, evaluate and run detectors on COCO-format data.
//!
//! The modules are layers; each imports only those listed before it
//! (`docs/ARCHITECTURE.md` draws them):
//!
//! - [`config`]: the typed config, presets, `--set` overrides, devices.
//! - [`ops`]: tensor ops Candle lacks (a convolution with a fast backward,
//!   a max-pool backward, fused norms and focal loss, boxes and NMS).
//! - [`model`]: RetinaNet with torchvision's parameter names; it reads no
//!   files.
//! - [`data`]: datasets on disk to validated images and boxes, transforms
//!   and batches.
//! - [`eval`]: COCO bbox evaluation, pycocotools-exact.
//! - [`run`]: the run folder a training run writes, its checkpoints, and
//!   where `--weights` points.
//! - [`infer`]: image -> detections, and a model scored on a split.
//! - [`train`]: batch -> loss -> gradients -> step, and the training loop.
//! - [`inspect`]: dataset checks: statistics, unreadable images, anchor
//!   coverage.
//!
//! Data flows one way: dataset -> transforms -> batches -> model -> loss
//! (training) or postprocess -> detections -> COCO evaluation / drawing.
//!
//! Everything else is `pub(crate)`; `unreachable_pub` keeps it that way.

#![warn(unreachable_pub)]

pub mod config;
pub mod data;
pub mod eval;
pub mod infer;
pub mod inspect;
pub mod model;
pub mod ops;
pub mod run;
pub mod train;
mod viz;
