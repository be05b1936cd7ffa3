//! `torch.optim.SGD`'s update and the gradients' squared norm on the CPU,
//! each one pass over a parameter in place. Written as tensor ops, the
//! update made six tensors a parameter (the decay, the gradient plus it,
//! the momentum product, the new buffer, the step, the new value), each a
//! pass of its own on one thread: about 60 ms of the `bccd` recipe's
//! 1.8 s step on 13.5 M parameters (BENCHMARKS.md, 2026-12-03, Intel).
//!
//! The arithmetic is the tensor ops', in their order and in f32, so a step
//! gives the same bits either way (test `matches_the_tensor_ops`); other
//! devices and dtypes keep the tensor ops (`train/optim.rs`).

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::lane_sum::lane_sum;
use super::{f32_data, f32_data_mut};

/// Values each thread takes at a time.
const CHUNK: usize = 1 << 16;

/// One step's constants, as `torch.optim.SGD` names them; `grad_scale`
/// multiplies the gradient first (global-norm clipping's `max / norm`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SgdStep {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub grad_scale: f64,
}

impl SgdStep {
    /// `d = s g + wd p`, as the tensor ops round it (each constant in f32,
    /// a product added only when its constant is not 1 or 0).
    #[inline(always)]
    fn direction(&self, grad: f32, value: f32) -> f32 {
        let grad = if self.grad_scale == 1.0 { grad } else { grad * self.grad_scale as f32 };
        if self.weight_decay == 0.0 {
            grad
        } else {
            grad + value * self.weight_decay as f32
        }
    }
}

/// Whether [`sgd_in_place`] takes these tensors: f32 on the CPU, contiguous.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// One parameter's update in place: `d = s g + wd p`, then with momentum
/// `buf = m buf + d` (into `buf`) and `p -= lr buf`, else `p -= lr d`.
/// `buf` starts at zero: `m 0 + d` is `d`, PyTorch's first step. Callers
/// check [`applies`] on all three tensors.
pub(crate) fn sgd_in_place(value: &Tensor, buf: Option<&Tensor>, grad: &Tensor, step: SgdStep) -> Result<()> {
    match buf {
        Some(buf) => {
            buf.inplace_op3(grad, value, &MomentumUpdate(step))?;
            value.inplace_op2(buf, &Descend { lr: step.lr, direction: None })
        }
        None => value.inplace_op2(grad, &Descend { lr: step.lr, direction: Some(step) }),
    }
}

/// `Σ g²` of a gradient, in f64 (the norm's share of one parameter).
pub(crate) fn squared_sum(grad: &Tensor) -> Result<f64> {
    grad.apply_op1_no_bwd(&SquaredSum)?.to_vec1::<f64>().map(|v| v[0])
}

/// `buf = m buf + d` in `buf`'s storage, from arguments `grad`, `value`.
struct MomentumUpdate(SgdStep);

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "sgd-momentum-in-place"
    }

    fn cpu_fwd(
        &self,
        bs: &mut CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (grad, value) = (f32_data(gs, gl, "gradient")?, f32_data(vs, vl, "parameter")?);
        let buf = f32_data_mut(bs, bl, "momentum buffer")?;
        if grad.len() != buf.len() || value.len() != buf.len() {
            candle_core::bail!("sgd: gradient, parameter and momentum buffer differ in size");
        }
        let (step, momentum) = (self.0, self.0.momentum as f32);
        buf.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).zip(value.par_chunks(CHUNK)).for_each(
            |((buf, grad), value)| {
                for ((b, &g), &p) in buf.iter_mut().zip(grad).zip(value) {
                    *b = *b * momentum + step.direction(g, p);
                }
            },
        );
        Ok(())
    }
}

/// `p -= lr buf` in the parameter's storage from argument `buf`; or, with
/// `direction`, `p -= lr d` from argument `grad`.
struct Descend {
    lr: f64,
    direction: Option<SgdStep>,
}

impl InplaceOp2 for Descend {
    fn name(&self) -> &'static str {
        "sgd-descend-in-place"
    }

    fn cpu_fwd(&self, vs: &mut CpuStorage, vl: &Layout, ss: &CpuStorage, sl: &Layout) -> Result<()> {
        let source = f32_data(ss, sl, "sgd direction")?;
        let value = f32_data_mut(vs, vl, "parameter")?;
        if source.len() != value.len() {
            candle_core::bail!("sgd: parameter and its update differ in size");
        }
        let lr = self.lr as f32;
        value.par_chunks_mut(CHUNK).zip(source.par_chunks(CHUNK)).for_each(|(value, source)| {
            for (p, &s) in value.iter_mut().zip(source) {
                let d = self.direction.map_or(s, |step| step.direction(s, *p));
                *p -= d * lr;
            }
        });
        Ok(())
    }
}

/// `[Σ g²]` as a one-value f64 tensor; chunks summed in parallel, then
/// added in order (the same total on any thread count).
struct SquaredSum;

impl CustomOp1 for SquaredSum {
    fn name(&self) -> &'static str {
        "squared-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let grad = f32_data(storage, layout, "gradient")?;
        let partials: Vec<f64> = grad.par_chunks(CHUNK).map(|chunk| lane_sum(chunk, |g| g * g)).collect();
        Ok((CpuStorage::F64(vec![partials.iter().sum()]), Shape::from(1)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Three steps of the fused update against the same steps in tensor
    /// ops, bit for bit, with and without momentum, decay and scaling; a
    /// parameter longer than one chunk.
    #[test]
    fn matches_the_tensor_ops() -> Result<()> {
        let len = 3 * CHUNK + 5;
        for (momentum, weight_decay, grad_scale) in [(0.9, 1e-4, 1.0), (0.9, 0.0, 0.37), (0.0, 1e-4, 1.0)] {
            let step = SgdStep { lr: 0.01, momentum, weight_decay, grad_scale };
            let start = Tensor::randn(0f32, 1., len, &Device::Cpu)?;
            let (fused, mut reference) = (Var::from_tensor(&start.copy()?)?, start.copy()?);
            let fused_buf = (momentum != 0.0).then(|| Tensor::zeros(len, DType::F32, &Device::Cpu)).transpose()?;
            let mut reference_buf: Option<Tensor> = None;
            for _ in 0..3 {
                let grad = Tensor::randn(0f32, 1., len, &Device::Cpu)?;
                sgd_in_place(fused.as_tensor(), fused_buf.as_ref(), &grad, step)?;
                // train/optim.rs's tensor path.
                let grad = if grad_scale == 1.0 { grad } else { (grad * grad_scale)? };
                let d = if weight_decay != 0.0 { (&grad + (&reference * weight_decay)?)? } else { grad };
                let direction = match (&reference_buf, momentum != 0.0) {
                    (Some(buf), true) => ((buf * momentum)? + d)?,
                    _ => d,
                };
                reference_buf = Some(direction.clone());
                reference = (&reference - (direction * step.lr)?)?;
            }
            let (ours, theirs) = (fused.as_tensor().to_vec1::<f32>()?, reference.to_vec1::<f32>()?);
            let same = ours.iter().zip(&theirs).all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
            assert!(same, "fused SGD differs from the tensor ops with {step:?}");
        }
        Ok(())
    }

    /// Against a sum in f64 of the squares taken in f64, on fixed values
    /// over three chunks: the squares are rounded to f32 and added in f32
    /// lanes of 16 (`lane_sum.rs`), so the bound is f32's rounding, not
    /// f64's (measured: 1.5e-10 relative).
    #[test]
    fn squared_sum_matches_f64() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let values: Vec<f32> = (0..2 * CHUNK + 7).map(|_| rng.random_range(-3.0..3.0)).collect();
        let expected: f64 = values.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
        let ours = squared_sum(&Tensor::from_vec(values, 2 * CHUNK + 7, &Device::Cpu)?)?;
        let error = (ours - expected).abs() / expected;
        eprintln!("relative error {error:.1e}");
        assert!(error <= 1e-7, "{ours} against {expected}: relative error {error:.1e}");
        Ok(())
    }
}
