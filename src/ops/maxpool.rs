//! The ResNet stem's 3x3 stride-2 max-pool with padding 1, with a backward
//! pass: Candle's `max_pool2d` only differentiates when kernel == stride.
//!
//! The gradient of each output goes to its window's argmax; the first
//! maximum in row-major window order wins, as in PyTorch (padding never
//! wins). On the CPU and CUDA (`cuda`) this is a `CustomOp1`; on other
//! devices, and with `runtime.cuda_kernels = "stock"`, the argmax is found
//! with tensor ops on the device and the pooled values are gathered from the
//! input there, so `index_select`'s backward routes the gradient the same
//! way.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cuda_kernels::own_f32_kernel;
use super::f32_data;

#[cfg(feature = "cuda")]
mod cuda;

const KERNEL: usize = 3;
const STRIDE: usize = 2;
const PADDING: usize = 1;

/// Output side of the pool for an input side.
fn out_size(n: usize) -> usize {
    (n + 2 * PADDING - KERNEL) / STRIDE + 1
}

/// (batch, channels, height, width).
type Dims4 = (usize, usize, usize, usize);

/// Index within its plane of each output's window maximum, for a
/// contiguous [n, c, h, w] input, planes in parallel. Returns the indices
/// and the output shape.
fn argmax_indices(x: &[f32], (n, c, h, w): Dims4) -> (Vec<u32>, Shape) {
    let (oh, ow) = (out_size(h), out_size(w));
    let mut idx = vec![0u32; n * c * oh * ow];
    idx.par_chunks_mut(oh * ow).zip(x.par_chunks((h * w).max(1))).for_each(|(idx, plane)| {
        for (oy, idx_row) in idx.chunks_mut(ow).enumerate() {
            let y0 = (oy * STRIDE).saturating_sub(PADDING);
            let y1 = (oy * STRIDE + KERNEL - PADDING).min(h);
            for (ox, best_index) in idx_row.iter_mut().enumerate() {
                let x0 = (ox * STRIDE).saturating_sub(PADDING);
                let x1 = (ox * STRIDE + KERNEL - PADDING).min(w);
                let mut best = y0 * w + x0;
                for y in y0..y1 {
                    for xx in x0..x1 {
                        let i = y * w + xx;
                        // NaN propagates like PyTorch's `val > max || isnan(val)`.
                        if plane[i] > plane[best] || plane[i].is_nan() && !plane[best].is_nan() {
                            best = i;
                        }
                    }
                }
                *best_index = best as u32;
            }
        }
    });
    (idx, Shape::from((n, c, oh, ow)))
}

/// The custom op (CPU and CUDA).
struct MaxPool3x3S2P1;

impl CustomOp1 for MaxPool3x3S2P1 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(storage, layout, "max-pool input")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (idx, shape) = argmax_indices(x, (n, c, h, w));
        let out_plane = (out_size(h) * out_size(w)).max(1);
        let mut out = vec![0f32; idx.len()];
        out.par_chunks_mut(out_plane)
            .zip(idx.par_chunks(out_plane))
            .zip(x.par_chunks((h * w).max(1)))
            .for_each(|((out, idx), plane)| out.iter_mut().zip(idx).for_each(|(o, &i)| *o = plane[i as usize]));
        Ok((CpuStorage::F32(out), shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(storage, layout)
    }

    /// Sends each output gradient to its window's argmax.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPoolGrad)?))
    }
}

/// The pool's input gradient from arguments `x [n, c, h, w]` (to find the
/// argmaxes again) and the output gradient, read in place.
struct MaxPoolGrad;

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (f32_data(xs, xl, "max-pool input")?, f32_data(gs, gl, "max-pool gradient")?);
        let (n, c, h, w) = xl.shape().dims4()?;
        let (idx, _) = argmax_indices(x, (n, c, h, w));
        let out_plane = (out_size(h) * out_size(w)).max(1);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut((h * w).max(1))
            .zip(idx.par_chunks(out_plane))
            .zip(grad.par_chunks(out_plane))
            .for_each(|((dx, idx), grad)| idx.iter().zip(grad).for_each(|(&i, &g)| dx[i as usize] += g));
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(xs, xl, gs, gl)
    }
}

/// Max-pool 3x3, stride 2, padding 1: [n, c, h, w] -> [n, c, (h-1)/2+1, (w-1)/2+1].
/// Differentiable on every device.
pub fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    match (own_f32_kernel(x.device(), DType::F32), x.dtype()) {
        (true, DType::F32) => x.contiguous()?.apply_op1(MaxPool3x3S2P1),
        // The maximum commutes with widening, so this is exact.
        (true, dtype) => max_pool_3x3_s2_p1(&x.to_dtype(DType::F32)?)?.to_dtype(dtype),
        (false, _) => gather_pool(x),
    }
}

/// Rows `start, start + 2, ...` (`count` of them) of `dim`.
fn every_other(t: &Tensor, dim: usize, start: usize, count: usize) -> Result<Tensor> {
    let end = start + 2 * count;
    let len = t.dim(dim)?;
    let t = if end > len { t.pad_with_zeros(dim, 0, end - len)? } else { t.clone() };
    let mut shape = t.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, 2);
    t.narrow(dim, start, 2 * count)?.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// The pool as device tensor ops: the 9 window taps of an edge-replicated
/// input, the first tap holding the maximum, its (clamped) source index, and
/// a differentiable gather of the input at those indices.
fn gather_pool(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (out_size(h), out_size(w));
    let dev = x.device();
    let padded = x.detach().pad_with_same(2, PADDING, PADDING)?.pad_with_same(3, PADDING, PADDING)?;
    let mut taps = Vec::with_capacity(KERNEL * KERNEL);
    for dy in 0..KERNEL {
        let rows = every_other(&padded, 2, dy, oh)?;
        for dx in 0..KERNEL {
            taps.push(every_other(&rows, 3, dx, ow)?);
        }
    }
    let taps = Tensor::stack(&taps, 0)?; // [9, n, c, oh, ow]
    let is_max = taps.broadcast_eq(&taps.max_keepdim(0)?)?;
    let tap_ids = Tensor::arange(0f32, (KERNEL * KERNEL) as f32, dev)?.reshape((KERNEL * KERNEL, 1, 1, 1, 1))?;
    let never = Tensor::full((KERNEL * KERNEL) as f32, taps.shape(), dev)?;
    let first = is_max.where_cond(&tap_ids.broadcast_as(taps.shape())?, &never)?.min(0)?; // [n, c, oh, ow]
                                                                                          // Tap (dy, dx) of output (oy, ox) reads input (2oy - 1 + dy, 2ox - 1 + dx), clamped.
    let dy = (&first / KERNEL as f64)?.floor()?;
    let dx = (&first - (&dy * KERNEL as f64)?)?;
    let oy = Tensor::arange(0f32, oh as f32, dev)?.reshape((1, 1, oh, 1))?;
    let ox = Tensor::arange(0f32, ow as f32, dev)?.reshape((1, 1, 1, ow))?;
    let row = dy.broadcast_add(&((oy * STRIDE as f64)? - PADDING as f64)?)?.clamp(0f32, (h - 1) as f32)?;
    let col = dx.broadcast_add(&((ox * STRIDE as f64)? - PADDING as f64)?)?.clamp(0f32, (w - 1) as f32)?;
    let within = (row * w as f64)?.add(&col)?.to_dtype(DType::U32)?; // < h*w, exact in f32 below 2^24
    let planes = (Tensor::arange(0u32, (n * c) as u32, dev)?.reshape((n, c, 1, 1))?
        * Tensor::new(&[(h * w) as u32], dev)?.reshape((1, 1, 1, 1))?.broadcast_as((n, c, 1, 1))?)?;
    let idx = within.broadcast_add(&planes)?.flatten_all()?;
    x.flatten_all()?.index_select(&idx, 0)?.reshape((n, c, oh, ow))
}

/// The same pool without a backward pass, for frozen stems: Candle's native
/// kernel on an edge-replicated input (replicated values never change a
/// window's maximum).
pub(crate) fn max_pool_3x3_s2_p1_inference(x: &Tensor) -> Result<Tensor> {
    let padded = x.pad_with_same(2, PADDING, PADDING)?.pad_with_same(3, PADDING, PADDING)?;
    padded.max_pool2d_with_stride(KERNEL, STRIDE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A deterministic input with distinct values (no ties).
    fn input(dims: (usize, usize, usize, usize)) -> Result<Var> {
        let n = dims.0 * dims.1 * dims.2 * dims.3;
        let v: Vec<f32> = (0..n).map(|k| ((k as f32) * 0.7311).sin() * 3.0 + (k as f32) * 1e-3).collect();
        Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu)?)
    }

    #[test]
    fn forward_matches_the_native_pool_on_odd_and_even_sizes() -> Result<()> {
        for dims in [(2, 3, 7, 9), (1, 2, 8, 6), (1, 1, 1, 1)] {
            let x = input(dims)?;
            let ours = max_pool_3x3_s2_p1(x.as_tensor())?;
            let native = max_pool_3x3_s2_p1_inference(x.as_tensor())?;
            assert_eq!(ours.dims(), native.dims());
            assert_eq!(ours.flatten_all()?.to_vec1::<f32>()?, native.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    }

    /// d(sum(w * pool(x)))/dx against central finite differences.
    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dims = (1, 2, 7, 6);
        let x = input(dims)?;
        let out_dims = max_pool_3x3_s2_p1(x.as_tensor())?.dims().to_vec();
        let m: usize = out_dims.iter().product();
        let w = Tensor::from_vec(
            (0..m).map(|k| 1.0 + (k as f32 * 0.37).cos()).collect::<Vec<_>>(),
            out_dims,
            &Device::Cpu,
        )?;
        let loss = |t: &Tensor| -> Result<Tensor> { (max_pool_3x3_s2_p1(t)? * &w)?.sum_all() };
        let grads = loss(x.as_tensor())?.backward()?;
        let analytic = grads.get(x.as_tensor()).expect("gradient of x").flatten_all()?.to_vec1::<f32>()?;
        let base = x.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let eps = 1e-3f32;
        for (k, &a) in analytic.iter().enumerate() {
            let probe = |delta: f32| -> Result<f32> {
                let mut v = base.clone();
                v[k] += delta;
                loss(&Tensor::from_vec(v, dims, &Device::Cpu)?)?.to_scalar::<f32>()
            };
            let numeric = (probe(eps)? - probe(-eps)?) / (2.0 * eps);
            assert!((numeric - a).abs() < 1e-2, "element {k}: finite difference {numeric}, backward {a}");
        }
        Ok(())
    }

    /// The device path (run here on the CPU) agrees with the custom op in
    /// values and gradients, ties included.
    #[test]
    fn device_path_matches_the_cpu_op() -> Result<()> {
        let ties = Tensor::from_vec((0..70).map(|k| (k % 4) as f32).collect::<Vec<_>>(), (1, 2, 5, 7), &Device::Cpu)?;
        for x in [input((2, 3, 7, 9))?, input((1, 2, 8, 6))?, Var::from_tensor(&ties)?] {
            let (a, b) = (max_pool_3x3_s2_p1(x.as_tensor())?, gather_pool(x.as_tensor())?);
            assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
            let w = Tensor::rand(0f32, 1., a.dims(), &Device::Cpu)?;
            let ga = (a * &w)?.sum_all()?.backward()?;
            let gb = (b * &w)?.sum_all()?.backward()?;
            let g = |grads: &candle_core::backprop::GradStore| -> Result<Vec<f32>> {
                grads.get(x.as_tensor()).expect("gradient of x").flatten_all()?.to_vec1::<f32>()
            };
            assert_eq!(g(&ga)?, g(&gb)?);
        }
        Ok(())
    }

    #[test]
    fn ties_send_the_gradient_to_the_first_maximum() -> Result<()> {
        let x = Var::from_tensor(&Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu)?)?;
        let grads = max_pool_3x3_s2_p1(x.as_tensor())?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("gradient of x").flatten_all()?.to_vec1::<f32>()?;
        // Outputs 2x2; windows start at (0,0), (0,1), (1,0), (1,1) after padding.
        assert_eq!(g, vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        Ok(())
    }
}
