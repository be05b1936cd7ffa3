//! Tensor and box operations the model needs beyond Candle's: box geometry
//! and NMS (torchvision.ops.boxes), a GEMM convolution with a fast backward,
//! a max-pool with a backward pass, fused norms, parallel element-wise ops
//! and a fused focal loss.

pub mod batch_norm;
pub mod boxes;
pub mod conv;
pub mod elementwise;
pub mod focal;
pub mod group_norm;
pub mod maxpool;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The contiguous f32 data of a custom op's argument (`what` names it in
/// the error).
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what} must be f32, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous");
    };
    Ok(&data[start..end])
}
