//! The stem's max-pool and its backward on CUDA, f32: one thread per
//! output, then one per input element gathering the gradients of the
//! outputs whose maximum it is (deterministic: no atomics, the CPU op's
//! order of addition). Replaces the gather of nine window taps and about
//! forty tensor ops that other devices run (`super::gather_pool`).
//!
//! Built and compiled (NVRTC compiles the source in `the_kernels_compile`);
//! run only where gpu-check runs, against the CPU op (tests/cuda_ops.rs).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

use super::out_size;
use crate::ops::cuda_kernels::{cuda_view, launch_over, KernelSource};

static SOURCE: KernelSource = KernelSource::new("retinanet_max_pool", include_str!("maxpool.cu"));

/// The pooled values of `x [n, c, h, w]`.
pub(super) fn forward(xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    let (n, c, h, w) = xl.shape().dims4()?;
    let (oh, ow) = (out_size(h), out_size(w));
    let device: CudaDevice = xs.device().clone();
    let x = cuda_view::<f32>(xs, xl, "max-pool input")?;
    let len = n * c * oh * ow;
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { device.alloc::<f32>(len)? };
    let func = SOURCE.function(&device, "max_pool_forward")?;
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    let (planes, h, w, oh, ow) = ((n * c) as i64, h as i32, w as i32, oh as i32, ow as i32);
    launch.arg(&x).arg(&mut y).arg(&planes).arg(&h).arg(&w).arg(&oh).arg(&ow);
    // SAFETY: the arguments match the kernel's signature and sizes.
    unsafe { launch.launch(launch_over(len)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, device), Shape::from((n, c, oh as usize, ow as usize))))
}

/// The input gradient from `x [n, c, h, w]` and the output gradient.
pub(super) fn backward(xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
    let (n, c, h, w) = xl.shape().dims4()?;
    let (oh, ow) = (out_size(h), out_size(w));
    let device: CudaDevice = xs.device().clone();
    let (x, grad) = (cuda_view::<f32>(xs, xl, "max-pool input")?, cuda_view::<f32>(gs, gl, "max-pool gradient")?);
    let len = x.len();
    // SAFETY: the kernel writes every element.
    let mut dx = unsafe { device.alloc::<f32>(len)? };
    let func = SOURCE.function(&device, "max_pool_grad")?;
    let stream = device.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    let (planes, h, w, oh, ow) = ((n * c) as i64, h as i32, w as i32, oh as i32, ow as i32);
    launch.arg(&x).arg(&grad).arg(&mut dx).arg(&planes).arg(&h).arg(&w).arg(&oh).arg(&ow);
    // SAFETY: as above.
    unsafe { launch.launch(launch_over(len)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(dx, device), xl.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles the source (no GPU needed, only libnvrtc).
    #[test]
    fn the_kernels_compile() {
        let ptx = SOURCE.ptx().unwrap();
        for kernel in ["max_pool_forward", "max_pool_grad"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{kernel} missing from the PTX");
        }
    }
}
