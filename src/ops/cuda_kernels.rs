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

#[cfg(feature = "cuda")]
pub(crate) use nvrtc::{cuda_view, launch_over, KernelSource};

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

/// Whether an op with its own f32 kernels on the CPU and on CUDA (GroupNorm)
/// runs them for tensors of `dtype` on `device`, rather than Candle's ops.
pub(crate) fn own_f32_kernel(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32
        && match device {
            Device::Cpu => true,
            Device::Cuda(_) => cfg!(feature = "cuda") && !STOCK.load(Ordering::Relaxed),
            Device::Metal(_) => false,
        }
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

/// CUDA C++ kernels compiled with NVRTC when first used, for the GPU at
/// hand (as PyTorch's jiterator does): the build needs no second nvcc step
/// beside Candle's, and the PTX targets the device it runs on.
#[cfg(feature = "cuda")]
mod nvrtc {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
    use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
    use candle_core::cuda_backend::{CudaDType, CudaDevice};
    use candle_core::{CudaStorage, Layout, Result};

    /// One module of kernels: its name and source, compiled once per process.
    pub(crate) struct KernelSource {
        name: &'static str,
        source: &'static str,
        ptx: OnceLock<std::result::Result<String, String>>,
    }

    impl KernelSource {
        pub(crate) const fn new(name: &'static str, source: &'static str) -> Self {
            Self { name, source, ptx: OnceLock::new() }
        }

        /// The module's PTX; a compile error names the module and quotes NVRTC's log.
        pub(crate) fn ptx(&self) -> Result<&str> {
            let compiled = self.ptx.get_or_init(|| {
                compile_ptx(self.source).map(|ptx| ptx.to_src()).map_err(|e| format!("NVRTC, {}: {e:?}", self.name))
            });
            compiled.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
        }

        /// Kernel `function` of this module on `device` (loaded once per device).
        pub(crate) fn function(&self, device: &CudaDevice, function: &str) -> Result<CudaFunction> {
            Ok(device.get_or_load_custom_func(function, self.name, self.ptx()?)?.into_cuda_function())
        }
    }

    /// A custom op argument's contiguous elements of type `T` (`what` names
    /// it in the error).
    pub(crate) fn cuda_view<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what} must be contiguous");
        };
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// One thread per element of `len`, in blocks of 256.
    pub(crate) fn launch_over(len: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (len.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
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
