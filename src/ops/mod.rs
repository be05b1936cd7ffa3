//! Tensor and box operations the model needs beyond Candle's: box geometry
//! and NMS (torchvision.ops.boxes), a GEMM convolution with a fast backward,
//! a max-pool with a backward pass, fused norms and parallel element-wise ops.

pub mod batch_norm;
pub mod boxes;
pub mod conv;
pub mod elementwise;
pub mod group_norm;
pub mod maxpool;
