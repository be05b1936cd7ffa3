//! RetinaNet (Lin et al. 2017) as torchvision's detection package builds it:
//! one file per concern, parameter names equal to torchvision's state_dict.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use candle_retinanet::config::ModelConfig;
//! use candle_retinanet::model::{self, LoadMode};
//! let cfg = ModelConfig { num_classes: 91, ..ModelConfig::default() };
//! let device = candle_core::Device::Cpu;
//! // Fresh (torchvision init), or from a checkpoint with torchvision's names.
//! let tensors = candle_core::safetensors::load("model.safetensors", &device)?;
//! let seed = 0; // tensors the checkpoint lacks are initialised from it
//! let loaded = model::build(&cfg, 91, &device, seed, Some((&tensors, LoadMode::Exact)))?;
//! // images: normalised, padded [n, 3, h, w]; `true` in training.
//! let images = candle_core::Tensor::zeros((1, 3, 800, 1088), candle_core::DType::F32, &device)?;
//! // Inference: `inference` shares the weights and keeps no graph.
//! let out = loaded.inference.forward(&images, false)?;
//! // out.cls_logits [n, A, K], out.bbox_regression [n, A, 4], out.anchors (A boxes).
//! let detections = loaded.inference.postprocess(&out, &[(800, 1066)])?;
//! // Training: optimise `model::trainable_vars(&loaded.varmap, &cfg)`;
//! // `model::state_dict(&loaded.varmap)` is what a checkpoint stores.
//! # let _ = detections;
//! # Ok(())
//! # }
//! ```

pub(crate) mod anchors;
pub(crate) mod box_coder;
mod fpn;
mod head;
mod init;
mod postprocess;
mod resnet;
mod retinanet;
mod weights;

pub use postprocess::Detections;
pub use retinanet::{HeadOutputs, RetinaNet};
pub use weights::{build, state_dict, trainable_vars, LoadMode, LoadedModel, BODY_PREFIX};
