//! Which kernels the CUDA device runs: this crate's own ops ("fused", the
//! default) or Candle's stock ops everywhere ("stock", to fall back while
//! the new path is unproven, and for gpu-check to time both), and whether
//! f32 convolutions may use TF32 tensor cores (PyTorch's
//! `torch.backends.cudnn.allow_tf32`, on by default there too).
//!
//! Process-wide, like PyTorch's backend flags: the binary sets them once
//! from the config (`runtime.cuda_kernels`, `runtime.tf32`) before any
//! tensor work, and each op reads them when it picks its kernel.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};

static STOCK: AtomicBool = AtomicBool::new(false);
static TF32: AtomicBool = AtomicBool::new(true);

/// Sets the process-wide choice; `stock` selects Candle's ops on CUDA.
pub fn set_cuda_kernels(stock: bool, tf32: bool) {
    STOCK.store(stock, Ordering::Relaxed);
    TF32.store(tf32, Ordering::Relaxed);
}

/// Whether f32 convolutions may round their inputs to TF32.
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
pub(crate) fn tf32_allowed() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// The implementation a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvKernel {
    /// im2col + GEMM on the CPU (f32; bf16 through f32).
    CpuGemm,
    /// cuDNN with cached plans and its own backward (a `cudnn` build).
    Cudnn,
    /// Candle's `conv2d` (its naive CUDA kernels, Metal, other dtypes).
    Stock,
}

/// The convolution kernel for tensors of `dtype` on `device`.
pub(crate) fn conv_kernel(device: &Device, dtype: DType) -> ConvKernel {
    let place = match device {
        Device::Cpu => Place::Cpu,
        Device::Cuda(_) => Place::Cuda,
        Device::Metal(_) => Place::Other,
    };
    choose_conv(place, dtype, STOCK.load(Ordering::Relaxed), cfg!(feature = "cudnn"))
}

/// Where tensors live, for the choice below (which the tests make without
/// a GPU).
#[derive(Debug, Clone, Copy)]
enum Place {
    Cpu,
    Cuda,
    Other,
}

fn choose_conv(place: Place, dtype: DType, stock: bool, cudnn_built: bool) -> ConvKernel {
    let float = matches!(dtype, DType::F32 | DType::BF16);
    match place {
        Place::Cpu if float => ConvKernel::CpuGemm,
        Place::Cuda if float && cudnn_built && !stock => ConvKernel::Cudnn,
        _ => ConvKernel::Stock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_runs_the_gemm_for_floats_only() {
        for stock in [false, true] {
            assert_eq!(choose_conv(Place::Cpu, DType::F32, stock, true), ConvKernel::CpuGemm);
            assert_eq!(choose_conv(Place::Cpu, DType::BF16, stock, false), ConvKernel::CpuGemm);
            assert_eq!(choose_conv(Place::Cpu, DType::F64, stock, true), ConvKernel::Stock);
        }
        assert_eq!(conv_kernel(&Device::Cpu, DType::F32), ConvKernel::CpuGemm);
    }

    #[test]
    fn cuda_runs_cudnn_unless_stock_or_not_built() {
        assert_eq!(choose_conv(Place::Cuda, DType::F32, false, true), ConvKernel::Cudnn);
        assert_eq!(choose_conv(Place::Cuda, DType::BF16, false, true), ConvKernel::Cudnn);
        assert_eq!(choose_conv(Place::Cuda, DType::F32, true, true), ConvKernel::Stock);
        assert_eq!(choose_conv(Place::Cuda, DType::F32, false, false), ConvKernel::Stock);
        assert_eq!(choose_conv(Place::Cuda, DType::F16, false, true), ConvKernel::Stock);
        assert_eq!(choose_conv(Place::Other, DType::F32, false, true), ConvKernel::Stock);
    }
}
