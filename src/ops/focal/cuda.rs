//! The weighted focal loss sum and its gradient on CUDA, f32: the sum in a
//! fixed grid of blocks (partial sums in f64, then one block adds them in
//! order, so its bits do not depend on scheduling) and the gradient in one
//! pass, instead of about twenty element-wise ops each way.
//!
//! Built and compiled (NVRTC compiles the source in `the_kernels_compile`);
//! run only where gpu-check runs, against the CPU op (tests/cuda_ops.rs).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::Focal;
use crate::ops::cuda_kernels::{cuda_view, launch_over, KernelSource};

static SOURCE: KernelSource =
    KernelSource::new("retinanet_focal_loss", concat!(include_str!("../block_sum.cuh"), include_str!("focal.cu")));

/// Blocks of the partial sums: enough to fill an H200's 132 SMs several
/// times over, few enough for one block to add up.
const PARTIAL_BLOCKS: usize = 1024;

type Operand<'a> = (&'a CudaStorage, &'a Layout);

/// `sum(weights * FL(logits, targets))` as a scalar.
pub(super) fn sum(focal: Focal, logits: Operand, targets: Operand, weights: Operand) -> Result<(CudaStorage, Shape)> {
    let device: CudaDevice = logits.0.device().clone();
    let (x, t, w, k) = views(logits, targets, weights)?;
    let len = x.len();
    let blocks = len.div_ceil(256).clamp(1, PARTIAL_BLOCKS);
    // SAFETY: every block writes its partial; the last kernel writes the sum.
    let mut partials = unsafe { device.alloc::<f64>(blocks)? };
    let mut out = unsafe { device.alloc::<f32>(1)? };
    let stream = device.cuda_stream();
    let (n, k, count) = (len as i64, k as i32, blocks as i32);
    let partial = SOURCE.function(&device, "focal_loss_partial")?;
    let mut launch = stream.launch_builder(&partial);
    launch.arg(&x).arg(&t).arg(&w).arg(&mut partials).arg(&n).arg(&k).arg(&focal.alpha).arg(&focal.gamma);
    let config = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments match the kernel's signature and sizes.
    unsafe { launch.launch(config) }.w()?;
    let total = SOURCE.function(&device, "sum_partials")?;
    let mut launch = stream.launch_builder(&total);
    launch.arg(&partials).arg(&mut out).arg(&count);
    let config = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as above.
    unsafe { launch.launch(config) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(())))
}

/// `scale * weights * d FL / d logits`, shaped like the logits.
pub(super) fn grad(
    focal: Focal,
    scale: f32,
    logits: Operand,
    targets: Operand,
    weights: Operand,
) -> Result<(CudaStorage, Shape)> {
    let device: CudaDevice = logits.0.device().clone();
    let (x, t, w, k) = views(logits, targets, weights)?;
    let len = x.len();
    // SAFETY: the kernel writes every element.
    let mut dx = unsafe { device.alloc::<f32>(len)? };
    let stream = device.cuda_stream();
    let func = SOURCE.function(&device, "focal_loss_grad")?;
    let mut launch = stream.launch_builder(&func);
    let (n, k) = (len as i64, k as i32);
    launch.arg(&x).arg(&t).arg(&w).arg(&mut dx).arg(&n).arg(&k).arg(&focal.alpha).arg(&focal.gamma).arg(&scale);
    // SAFETY: as above.
    unsafe { launch.launch(launch_over(len)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, device), logits.1.shape().clone()))
}

type Views<'a> = (
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>,
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>,
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>,
    usize,
);

/// Logits, targets and weights, and the number of classes.
fn views<'a>(logits: Operand<'a>, targets: Operand<'a>, weights: Operand<'a>) -> Result<Views<'a>> {
    let k = logits.1.dims().last().copied().unwrap_or(1).max(1);
    Ok((
        cuda_view::<f32>(logits.0, logits.1, "focal loss logits")?,
        cuda_view::<f32>(targets.0, targets.1, "focal loss targets")?,
        cuda_view::<f32>(weights.0, weights.1, "focal loss weights")?,
        k,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles the source (no GPU needed, only libnvrtc).
    #[test]
    fn the_kernels_compile() {
        let ptx = SOURCE.ptx().unwrap();
        for kernel in ["focal_loss_partial", "sum_partials", "focal_loss_grad"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{kernel} missing from the PTX");
        }
    }
}
