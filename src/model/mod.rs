//! RetinaNet (Lin et al. 2017) as torchvision's detection package builds it:
//! one file per concern, parameter names equal to torchvision's state_dict.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use candle_retinanet::config::ModelConfig;
//! use candle_retinanet::model::weights::{self, LoadMode};
//! let cfg = ModelConfig { num_classes: 91, ..ModelConfig::default() };
//! let device = candle_core::Device::Cpu;
//! // Fresh (torchvision init), or from a checkpoint with torchvision's names.
//! let tensors = weights::read_safetensors("model.safetensors".as_ref())?;
//! let seed = 0; // tensors the checkpoint lacks are initialised from it
//! let loaded = weights::build(&cfg, 91, &device, seed, Some((&tensors, LoadMode::Exact)))?;
//! // images: normalised, padded [n, 3, h, w]; `true` in training.
//! let images = candle_core::Tensor::zeros((1, 3, 800, 1088), candle_core::DType::F32, &device)?;
//! let out = loaded.model.forward(&images, false)?;
//! // out.cls_logits [n, A, K], out.bbox_regression [n, A, 4], out.anchors (A boxes).
//! let detections = loaded.model.postprocess(&out, &[(800, 1066)])?;
//! // Training: optimise `weights::trainable_vars(&loaded.varmap, &cfg)`,
//! // checkpoint with `weights::save(&loaded.varmap, path)`.
//! # let _ = detections;
//! # Ok(())
//! # }
//! ```

pub mod anchors;
pub mod box_coder;
pub mod coverage;
pub mod fpn;
pub mod head;
pub mod init;
pub mod postprocess;
pub mod resnet;
pub mod retinanet;
pub mod weights;
