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

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::conv::split_row;
use super::cuda_kernels::own_f32_kernel;
use super::{f32_data, written, zeroed};

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
    idx.par_chunks_mut(oh * ow)
        .zip(x.par_chunks((h * w).max(1)))
        .for_each_init(|| RowMaxima::new(ow, w), |scratch, (idx, plane)| plane_argmax(plane, w, scratch, idx));
    (idx, Shape::from((n, c, oh, ow)))
}

/// Whether `candidate`, later in a window's row-major order, replaces the
/// window's first maximum so far `best`: when greater, or when NaN and
/// `best` is not (NaN propagates like PyTorch's `val > max || isnan(val)`,
/// the first NaN winning).
#[inline(always)]
fn wins(candidate: f32, best: f32) -> bool {
    candidate > best || (candidate.is_nan() && !best.is_nan())
}

/// Each output column's first maximum over its window's columns in one
/// input row (value and index within the plane), for a row and for the
/// rows combined so far, and the row split into even and odd columns.
struct RowMaxima {
    best: (Vec<f32>, Vec<u32>),
    row: (Vec<f32>, Vec<u32>),
    phases: Vec<f32>,
}

impl RowMaxima {
    fn new(ow: usize, w: usize) -> Self {
        RowMaxima { best: (vec![0.0; ow], vec![0; ow]), row: (vec![0.0; ow], vec![0; ow]), phases: vec![0.0; w] }
    }
}

/// Keeps `(best, at)` or takes `(value, index)` where the value [`wins`]:
/// a select, not a branch.
#[inline(always)]
fn keep_first_max((best, at): (f32, u32), (value, index): (f32, u32)) -> (f32, u32) {
    let replace = wins(value, best);
    (if replace { value } else { best }, if replace { index } else { at })
}

/// The argmax indices `idx [oh, ow]` of one plane `[h, w]`. The window is
/// taken apart: each of its (up to 3) rows' first maximum over the window's
/// columns, then the first of those rows holding the largest. That is the
/// first maximum in row-major order, found with vectorised selects rather
/// than the 9 data-dependent branches per output that mispredicted on real
/// images (5% of the `bccd` recipe's training step, counting the
/// backward's second pass).
fn plane_argmax(plane: &[f32], w: usize, scratch: &mut RowMaxima, idx: &mut [u32]) {
    let h = plane.len() / w.max(1);
    let RowMaxima { best, row, phases } = scratch;
    for (oy, idx_row) in idx.chunks_mut(best.0.len().max(1)).enumerate() {
        let y0 = (oy * STRIDE).saturating_sub(PADDING);
        let y1 = (oy * STRIDE + KERNEL - PADDING).min(h);
        row_argmax(&plane[y0 * w..][..w], (y0 * w) as u32, phases, best);
        for y in y0 + 1..y1 {
            row_argmax(&plane[y * w..][..w], (y * w) as u32, phases, row);
            let best = best.0.iter_mut().zip(best.1.iter_mut());
            for ((best_value, best_index), (&value, &index)) in best.zip(row.0.iter().zip(&row.1)) {
                (*best_value, *best_index) = keep_first_max((*best_value, *best_index), (value, index));
            }
        }
        idx_row.copy_from_slice(&best.1);
    }
}

/// Each output column's first maximum over columns `2ox - 1 ..= 2ox + 1`
/// of `row` (those inside it), as values and indices `offset + x`.
/// With the row split into even and odd columns, the three columns of
/// outputs `1..` are three contiguous runs: `odd[ox - 1]`, `even[ox]`,
/// `odd[ox]`.
fn row_argmax(row: &[f32], offset: u32, phases: &mut [f32], (values, indices): &mut (Vec<f32>, Vec<u32>)) {
    let w = row.len();
    split_row(row, STRIDE, phases);
    let (even, odd) = phases.split_at(w.div_ceil(2));
    let mut first = (row[0], offset);
    if w > 1 {
        first = keep_first_max(first, (row[1], offset + 1));
    }
    (values[0], indices[0]) = first;
    let inner = values[1..].iter_mut().zip(indices[1..].iter_mut());
    let columns = odd.iter().zip(&even[1..]).zip(odd.iter().skip(1));
    for (k, ((value, index), ((&left, &middle), &right))) in inner.zip(columns).enumerate() {
        let left_column = offset + 2 * k as u32 + 1;
        let best = keep_first_max((left, left_column), (middle, left_column + 1));
        (*value, *index) = keep_first_max(best, (right, left_column + 2));
    }
    if w % 2 == 1 && w > 1 {
        // The last window ends at the row's last (even) column.
        let last = values.len() - 1;
        let left = (odd[last - 1], offset + (w - 2) as u32);
        (values[last], indices[last]) = keep_first_max(left, (even[last], offset + (w - 1) as u32));
    }
}

/// The custom op (CPU and CUDA). On the CPU the forward keeps its argmax
/// indices for the backward, as PyTorch's `max_pool2d_with_indices` does:
/// finding them again took the `bccd` recipe's backward 1.5% of a
/// training step.
#[derive(Default)]
struct MaxPool3x3S2P1 {
    argmax: Mutex<Option<Arc<Vec<u32>>>>,
}

impl CustomOp1 for MaxPool3x3S2P1 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(storage, layout, "max-pool input")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (idx, shape) = argmax_indices(x, (n, c, h, w));
        let out_plane = (out_size(h) * out_size(w)).max(1);
        let out = written(idx.len(), out_plane, |i| {
            let plane = &x[i * h * w..][..h * w];
            idx[i * out_plane..].iter().map(|&j| plane[j as usize])
        });
        *self.argmax.lock().expect("max-pool indices") = Some(Arc::new(idx));
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
        let argmax = self.argmax.lock().expect("max-pool indices").clone();
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPoolGrad { argmax })?))
    }
}

/// The pool's input gradient from arguments `x [n, c, h, w]` and the
/// output gradient, read in place: to the argmaxes the forward kept, or
/// found again in `x` (CUDA's forward keeps none).
struct MaxPoolGrad {
    argmax: Option<Arc<Vec<u32>>>,
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (f32_data(xs, xl, "max-pool input")?, f32_data(gs, gl, "max-pool gradient")?);
        let (n, c, h, w) = xl.shape().dims4()?;
        let idx = match &self.argmax {
            Some(idx) => Arc::clone(idx),
            None => Arc::new(argmax_indices(x, (n, c, h, w)).0),
        };
        let out_plane = (out_size(h) * out_size(w)).max(1);
        let mut dx = zeroed(x.len());
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
        (true, DType::F32) => x.contiguous()?.apply_op1(MaxPool3x3S2P1::default()),
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

    /// The window taken apart by rows picks the same index as a scan of
    /// its 9 taps in row-major order, with ties and NaNs, on odd and even
    /// sizes down to 1x1.
    #[test]
    fn argmax_by_rows_matches_a_row_major_scan() {
        let scan = |plane: &[f32], (h, w): (usize, usize), (oy, ox): (usize, usize)| -> u32 {
            let mut best = None::<usize>;
            for y in (oy * 2).saturating_sub(1)..(oy * 2 + 2).min(h) {
                for x in (ox * 2).saturating_sub(1)..(ox * 2 + 2).min(w) {
                    let i = y * w + x;
                    if best.is_none_or(|b| wins(plane[i], plane[b])) {
                        best = Some(i);
                    }
                }
            }
            best.expect("a window holds a value") as u32
        };
        for (h, w) in [(1, 1), (1, 2), (2, 1), (3, 3), (5, 8), (8, 5), (7, 9), (6, 6)] {
            // Few distinct values (ties everywhere) and a NaN now and then.
            let plane: Vec<f32> =
                (0..2 * h * w).map(|k| if k % 11 == 7 { f32::NAN } else { ((k * 7919) % 5) as f32 }).collect();
            let (idx, shape) = argmax_indices(&plane, (1, 2, h, w));
            let (oh, ow) = (out_size(h), out_size(w));
            assert_eq!(shape.dims(), &[1, 2, oh, ow]);
            for (p, (channel, found)) in plane.chunks(h * w).zip(idx.chunks(oh * ow)).enumerate() {
                for (o, &got) in found.iter().enumerate() {
                    assert_eq!(got, scan(channel, (h, w), (o / ow, o % ow)), "{h}x{w}, plane {p}, output {o}");
                }
            }
        }
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
