//! GroupNorm's forward and backward on CUDA, f32, in three kernels instead
//! of Candle's chain of about ten element-wise ops (each a pass over the
//! activations, more in the backward). The arithmetic is the CPU op's:
//! statistics accumulated in f64, the same formulas (see `super`).
//!
//! - `group_norm_forward`: one block per (image, group): mean and 1/std,
//!   then the output.
//! - `group_norm_input_grad`: one block per (image, group): the statistics
//!   again (kept for the next kernel), the two group means of the gradient,
//!   then `dx`.
//! - `group_norm_param_grad`: one block per channel: `dgamma`, `dbeta`.
//!
//! Built and compiled (NVRTC compiles the source in `the_kernels_compile`);
//! run only where gpu-check runs, against Candle's GroupNorm
//! (tests/cuda_ops.rs).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

use crate::ops::cuda_kernels::{cuda_view, KernelSource};

static SOURCE: KernelSource =
    KernelSource::new("retinanet_group_norm", concat!(include_str!("../block_sum.cuh"), include_str!("group_norm.cu")));

/// Threads per block: a multiple of the warp, as the reduction assumes.
const THREADS: u32 = 256;

/// The group sizes of input dims [n, c, h, w] with `groups` groups.
struct Groups {
    n: usize,
    c: usize,
    groups: usize,
    /// Channels per group.
    cpg: usize,
    /// h * w.
    hw: usize,
}

impl Groups {
    fn of(layout: &Layout, groups: usize) -> Result<Self> {
        let &[n, c, h, w] = layout.shape().dims() else {
            candle_core::bail!("group norm on CUDA: expected [n, c, h, w], got {:?}", layout.shape());
        };
        if groups == 0 || !c.is_multiple_of(groups) {
            candle_core::bail!("group norm: {groups} groups do not divide {c} channels");
        }
        Ok(Self { n, c, groups, cpg: c / groups, hw: h * w })
    }

    fn blocks(blocks: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }
}

/// `y` from `x [n, c, h, w]`, `gamma [c]`, `beta [c]`.
pub(super) fn forward(
    groups: usize,
    eps: f64,
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let g = Groups::of(xl, groups)?;
    let device: CudaDevice = xs.device().clone();
    let (x, gamma, beta) = (
        cuda_view::<f32>(xs, xl, "group norm input")?,
        cuda_view::<f32>(ws, wl, "group norm weight")?,
        cuda_view::<f32>(bs, bl, "group norm bias")?,
    );
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { device.alloc::<f32>(x.len())? };
    let func = SOURCE.function(&device, "group_norm_forward")?;
    let (groups, cpg, hw) = (g.groups as i32, g.cpg as i32, g.hw as i32);
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&gamma).arg(&beta).arg(&mut y).arg(&groups).arg(&cpg).arg(&hw).arg(&eps);
    // SAFETY: the arguments match the kernel's signature and sizes.
    unsafe { launch.launch(Groups::blocks(g.n * g.groups)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, device), xl.shape().clone()))
}

/// The three gradients packed in one buffer, `[dx (n*c*h*w), dgamma (c),
/// dbeta (c)]`, from `dy`, `x` and `gamma`.
pub(super) fn backward(
    groups: usize,
    eps: f64,
    (gs, gl): (&CudaStorage, &Layout),
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let g = Groups::of(xl, groups)?;
    let device: CudaDevice = xs.device().clone();
    let (dy, x, gamma) = (
        cuda_view::<f32>(gs, gl, "group norm gradient")?,
        cuda_view::<f32>(xs, xl, "group norm input")?,
        cuda_view::<f32>(ws, wl, "group norm weight")?,
    );
    let len = x.len();
    // SAFETY: the two kernels write every element of both buffers.
    let mut packed = unsafe { device.alloc::<f32>(len + 2 * g.c)? };
    let mut stats = unsafe { device.alloc::<f32>(2 * g.n * g.groups)? };
    let (n, c, groups, cpg, hw) = (g.n as i32, g.c as i32, g.groups as i32, g.cpg as i32, g.hw as i32);
    let stream = device.cuda_stream();
    {
        let mut dx = packed.slice_mut(0..len);
        let func = SOURCE.function(&device, "group_norm_input_grad")?;
        let mut launch = stream.launch_builder(&func);
        launch.arg(&dy).arg(&x).arg(&gamma).arg(&mut dx).arg(&mut stats).arg(&groups).arg(&cpg).arg(&hw).arg(&eps);
        // SAFETY: as above.
        unsafe { launch.launch(Groups::blocks(g.n * g.groups)) }.w()?;
    }
    {
        let mut params = packed.slice_mut(len..len + 2 * g.c);
        let func = SOURCE.function(&device, "group_norm_param_grad")?;
        let mut launch = stream.launch_builder(&func);
        launch.arg(&dy).arg(&x).arg(&stats).arg(&mut params).arg(&n).arg(&c).arg(&groups).arg(&cpg).arg(&hw);
        // SAFETY: as above.
        unsafe { launch.launch(Groups::blocks(g.c)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(packed, device), Shape::from(len + 2 * g.c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles the source (no GPU needed, only libnvrtc).
    #[test]
    fn the_kernels_compile() {
        let ptx = SOURCE.ptx().unwrap();
        for kernel in ["group_norm_forward", "group_norm_input_grad", "group_norm_param_grad"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{kernel} missing from the PTX");
        }
    }
}
