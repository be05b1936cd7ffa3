//! The FPN's top-down step, `lateral + interpolate(top, lateral's size,
//! mode="nearest")` (torchvision.ops.FeaturePyramidNetwork), as one graph
//! node on the CPU.
//!
//! Candle's route took three nodes (a copy, `upsample_nearest2d`, the add),
//! each with a gradient buffer zeroed and added into in the backward pass,
//! and `upsample_nearest2d`'s backward is a grouped convolution with a
//! kernel of ones: 1.2% of the `bccd` recipe's training step on the main
//! thread. Here the forward reads `top` once per output row, and the
//! backward passes the output gradient on to `lateral` as it is and sums it
//! over each source cell for `top`. Other devices and dtypes take Candle's
//! route ([`add_upsampled_with_candle`]).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_data, written, zeroed};

/// `lateral [n, c, h, w] + top [n, c, th, tw]` resized to (h, w) by
/// nearest neighbour: source index `floor(dst * in / out)`, as
/// `F.interpolate(size=(h, w), mode="nearest")`.
pub(crate) fn add_upsampled(lateral: &Tensor, top: &Tensor) -> Result<Tensor> {
    if lateral.device().is_cpu() && lateral.dtype() == DType::F32 && top.dtype() == DType::F32 {
        lateral.contiguous()?.apply_op2(&top.contiguous()?, AddUpsampled)
    } else {
        add_upsampled_with_candle(lateral, top)
    }
}

/// Source index of each of `out` destination positions, as torch's nearest
/// interpolation computes it (the scale in f32).
fn source_indices(out: usize, input: usize) -> Vec<usize> {
    let scale = input as f32 / out as f32;
    (0..out).map(|i| ((i as f32 * scale) as usize).min(input.saturating_sub(1))).collect()
}

/// [`add_upsampled`] with Candle's ops, differentiable on every device.
fn add_upsampled_with_candle(lateral: &Tensor, top: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = lateral.dims4()?;
    lateral + upsample_nearest(top, (h, w))?
}

/// Nearest-neighbour resize to (h, w); exact 2x uses Candle's kernel.
fn upsample_nearest(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, _, in_h, in_w) = x.dims4()?;
    if h == 2 * in_h && w == 2 * in_w {
        // Candle 0.11's backward of upsample_nearest2d *assigns* its gradient
        // to the input instead of adding it (backprop.rs: `*sum_grad =
        // conv_sum`), which dropped every gradient the FPN's upper levels got
        // from their own heads (fix pending upstream: huggingface/candle#3507).
        // Upsampling a copy gives that op an input of its own; the copy's
        // backward then adds correctly. tests/train_parity.rs catches a relapse.
        if x.device().is_cpu() && x.dtype() != DType::F32 {
            // That backward is a convolution, which Candle's CPU backend
            // has no bf16 kernel for; copies of values are exact in f32.
            return upsample_nearest(&x.to_dtype(DType::F32)?, (h, w))?.to_dtype(x.dtype());
        }
        return x.copy()?.upsample_nearest2d(h, w);
    }
    let index = |out: usize, input: usize| -> Result<Tensor> {
        let idx: Vec<u32> = source_indices(out, input).into_iter().map(|i| i as u32).collect();
        Tensor::from_vec(idx, out, x.device())
    };
    x.index_select(&index(h, in_h)?, 2)?.index_select(&index(w, in_w)?, 3)
}

/// The sizes of one call: `lateral`'s plane (h, w) and `top`'s (th, tw).
struct Planes {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Planes {
    fn of(lateral: &Layout, top: &Layout) -> Result<Self> {
        let (n, c, h, w) = lateral.shape().dims4()?;
        let (tn, tc, th, tw) = top.shape().dims4()?;
        if (n, c) != (tn, tc) || th == 0 || tw == 0 {
            candle_core::bail!("add_upsampled: top {:?} does not fit lateral {:?}", top.shape(), lateral.shape());
        }
        Ok(Planes { h, w, th, tw })
    }
}

/// `lateral + nearest(top)` from arguments `lateral` and `top`.
struct AddUpsampled;

impl CustomOp2 for AddUpsampled {
    fn name(&self) -> &'static str {
        "add-upsampled-nearest"
    }

    fn cpu_fwd(&self, ls: &CpuStorage, ll: &Layout, ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (lateral, top) = (f32_data(ls, ll, "FPN lateral")?, f32_data(ts, tl, "FPN top-down input")?);
        let p = Planes::of(ll, tl)?;
        let (rows, columns) = (source_indices(p.h, p.th), source_indices(p.w, p.tw));
        // One chunk per output row: row `i` is row `i % h` of plane `i / h`.
        let out = written(lateral.len(), p.w, |i| {
            let (plane, y) = (i / p.h, i % p.h);
            let top_row = &top[(plane * p.th + rows[y]) * p.tw..][..p.tw];
            lateral[i * p.w..][..p.w].iter().zip(&columns).map(move |(&l, &x)| l + top_row[x])
        });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }

    fn bwd(
        &self,
        _lateral: &Tensor,
        top: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let top_grad = grad.apply_op2_no_bwd(top, &SumIntoSources)?;
        Ok((Some(grad), Some(top_grad)))
    }
}

/// `top`'s gradient from arguments `grad [n, c, h, w]` and `top` (for its
/// shape): each output gradient summed into its source cell, rows in order.
struct SumIntoSources;

impl CustomOp2 for SumIntoSources {
    fn name(&self) -> &'static str {
        "add-upsampled-nearest-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, _ts: &CpuStorage, tl: &Layout) -> Result<(CpuStorage, Shape)> {
        let grad = f32_data(gs, gl, "FPN top-down gradient")?;
        let p = Planes::of(gl, tl)?;
        let (rows, columns) = (source_indices(p.h, p.th), source_indices(p.w, p.tw));
        let mut top_grad = zeroed(tl.shape().elem_count());
        top_grad.par_chunks_mut(p.th * p.tw).zip(grad.par_chunks(p.h * p.w)).for_each(|(sums, grad)| {
            for (grad_row, &y) in grad.chunks_exact(p.w).zip(&rows) {
                let sum_row = &mut sums[y * p.tw..][..p.tw];
                for (&g, &x) in grad_row.iter().zip(&columns) {
                    sum_row[x] += g;
                }
            }
        });
        Ok((CpuStorage::F32(top_grad), tl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn nearest_matches_torch_for_odd_sizes() -> Result<()> {
        // F.interpolate(arange(3).view(1,1,1,3), size=(1,5)) = [0, 0, 1, 1, 2].
        let x = Tensor::arange(0f32, 3., &Device::Cpu)?.reshape((1, 1, 1, 3))?;
        let y = upsample_nearest(&x, (1, 5))?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, [0.0, 0.0, 1.0, 1.0, 2.0]);
        let y = upsample_nearest(&x, (2, 6))?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        Ok(())
    }

    #[test]
    fn upsampled_tensor_keeps_its_other_gradients() -> Result<()> {
        // y = sum(3 x) + sum(upsample(x)): dy/dx = 3 + the cells each input fills.
        // 2x3 -> 4x6 (exact 2x): 4 each; 2x3 -> 3x5: rows [0, 0, 1], columns [0, 0, 1, 1, 2].
        let cases = [((4, 6), [7.0; 6]), ((3, 5), [7.0, 7.0, 5.0, 5.0, 5.0, 4.0])];
        for (size, expected) in cases {
            let x = Var::ones((1, 1, 2, 3), DType::F32, &Device::Cpu)?;
            let y = ((x.as_tensor() * 3.0)?.sum_all()? + upsample_nearest(x.as_tensor(), size)?.sum_all()?)?;
            let grads = y.backward()?;
            let g = grads.get(x.as_tensor()).expect("gradient").flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(g, expected, "upsampled to {size:?}");
        }
        Ok(())
    }

    /// The op against Candle's route, on the FPN's exact 2x and on sizes
    /// that do not divide (odd inputs, as torchvision meets them): the same
    /// sums and the same gradients, with the top-down input also used
    /// elsewhere (its gradients add). Small integers keep every sum exact.
    #[test]
    fn matches_candle_route_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for ((h, w), (th, tw)) in [((6, 8), (3, 4)), ((7, 9), (4, 5)), ((5, 5), (5, 5)), ((9, 4), (2, 3))] {
            let values = |len: usize, seed: usize| (0..len).map(|i| ((i * 7 + seed) % 11) as f32 - 5.0).collect();
            let lateral = Var::from_tensor(&Tensor::from_vec(values(2 * 3 * h * w, 1), (2, 3, h, w), &dev)?)?;
            let top = Var::from_tensor(&Tensor::from_vec(values(2 * 3 * th * tw, 4), (2, 3, th, tw), &dev)?)?;
            let probe = Tensor::from_vec(values(2 * 3 * h * w, 9), (2, 3, h, w), &dev)?;
            let loss = |out: Tensor| (out * &probe)?.sum_all()? + (top.as_tensor() * 2.0)?.sum_all()?;
            let ours = add_upsampled(lateral.as_tensor(), top.as_tensor())?;
            let theirs = add_upsampled_with_candle(lateral.as_tensor(), top.as_tensor())?;
            let what = format!("{h}x{w} from {th}x{tw}");
            assert_eq!(ours.flatten_all()?.to_vec1::<f32>()?, theirs.flatten_all()?.to_vec1::<f32>()?, "{what}");
            let (ours, theirs) = (loss(ours)?.backward()?, loss(theirs)?.backward()?);
            for var in [&lateral, &top] {
                let [a, b] = [&ours, &theirs].map(|g| g.get(var.as_tensor()).expect("gradient").flatten_all());
                assert_eq!(a?.to_vec1::<f32>()?, b?.to_vec1::<f32>()?, "{what} gradient");
            }
        }
        Ok(())
    }
}
