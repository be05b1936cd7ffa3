//! The sigmoid focal loss: torchvision's `sigmoid_focal_loss` composed from
//! Candle ops ([`sigmoid_focal_loss`]), and the weighted sum the training
//! loss needs in one parallel CPU pass, with its gradient in one more
//! ([`weighted_focal_loss_sum`]).
//!
//! Composed from Candle ops ([`sigmoid_focal_loss`], times the
//! per-anchor weights, summed), the classification loss takes about twenty
//! element-wise passes over `[n, anchors, classes]` forward and more than
//! that backward, each materialised and each on one thread: at 512x512 with
//! 80 classes every pass covers 7.9 M elements. Here the forward reads the
//! logits, targets and weights once and returns the scalar, and the
//! backward writes the logits' gradient in one pass. CUDA runs the same op
//! as kernels of its own (`cuda`); other devices and dtypes, and
//! `runtime.cuda_kernels = "stock"`, use the composed ops.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cuda_kernels::own_f32_kernel;
use super::elementwise::{for_each_chunk, CHUNK};
use super::f32_data;

#[cfg(feature = "cuda")]
mod cuda;

/// Element-wise sigmoid focal loss, as torchvision's `sigmoid_focal_loss`
/// with `reduction="none"`:
/// `BCEWithLogits(x, t) * (1 - p_t)^gamma * alpha_t`, where
/// `p_t = p t + (1 - p)(1 - t)` and `alpha_t = alpha t + (1 - alpha)(1 - t)`
/// (no alpha weighting when `alpha < 0`).
///
/// The cross entropy uses the stable form `max(x, 0) - x t + log(1 + e^-|x|)`,
/// finite for any finite logit. `logits` and `targets` share a shape.
pub fn sigmoid_focal_loss(logits: &Tensor, targets: &Tensor, alpha: f64, gamma: f64) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(logits)?;
    let ce = ((logits.relu()? - (logits * targets)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let one_minus_t = targets.affine(-1.0, 1.0)?;
    let p_t = ((&p * targets)? + (p.affine(-1.0, 1.0)? * &one_minus_t)?)?;
    let one_minus_p_t = p_t.affine(-1.0, 1.0)?;
    let modulator = if gamma == 0.0 {
        None
    } else if gamma == 2.0 {
        Some(one_minus_p_t.sqr()?)
    } else {
        // Clamped away from 0, where the gradient of x^gamma is undefined
        // for gamma < 1.
        Some(one_minus_p_t.clamp(1e-12, 1.0)?.powf(gamma)?)
    };
    let loss = match modulator {
        Some(m) => (ce * m)?,
        None => ce,
    };
    if alpha < 0.0 {
        return Ok(loss);
    }
    let alpha_t = ((targets * alpha)? + (one_minus_t * (1.0 - alpha))?)?;
    loss * alpha_t
}

/// `sum(weights[n, a] * FL(logits[n, a, k], targets[n, a, k]))`, a scalar,
/// where `FL` is torchvision's `sigmoid_focal_loss` (no alpha weighting
/// when `alpha < 0`). `weights` is `[n, a, 1]`: 0 ignores an anchor.
pub fn weighted_focal_loss_sum(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    let own = [logits, targets, weights].iter().all(|t| own_f32_kernel(t.device(), t.dtype()));
    let (n, a, _) = logits.dims3()?;
    if !own || targets.dims() != logits.dims() || weights.dims() != [n, a, 1] {
        let focal = sigmoid_focal_loss(logits, targets, alpha, gamma)?;
        return focal.broadcast_mul(weights)?.sum_all();
    }
    let focal = Focal { alpha: alpha as f32, gamma: gamma as f32 };
    logits.contiguous()?.apply_op3(&targets.contiguous()?, &weights.contiguous()?, FocalSum(focal))
}

#[derive(Debug, Clone, Copy)]
struct Focal {
    alpha: f32,
    gamma: f32,
}

impl Focal {
    /// For logit `x` and target `t`: `p = sigmoid(x)` and `1 - p` (each
    /// without cancellation), the cross entropy
    /// `ce = max(x, 0) - x t + log(1 + e^-|x|)`, `q = 1 - p_t` and
    /// `alpha_t`, as in [`sigmoid_focal_loss`].
    #[inline(always)]
    fn parts(self, x: f32, t: f32) -> Parts {
        let e = (-x.abs()).exp();
        let (big, small) = (1.0 / (1.0 + e), e / (1.0 + e));
        let (p, not_p) = if x >= 0.0 { (big, small) } else { (small, big) };
        Parts {
            p,
            not_p,
            ce: x.max(0.0) - x * t + e.ln_1p(),
            q: not_p * t + p * (1.0 - t),
            alpha_t: if self.alpha < 0.0 { 1.0 } else { self.alpha * t + (1.0 - self.alpha) * (1.0 - t) },
        }
    }

    /// `(q^gamma, q^(gamma - 1))`; for other gammas than 0 and 2, `q` is
    /// clamped away from 0 as the composed loss does.
    #[inline(always)]
    fn powers(self, q: f32) -> (f32, f32) {
        match self.gamma {
            0.0 => (1.0, 0.0),
            2.0 => (q * q, q),
            g => {
                let q = q.clamp(1e-12, 1.0);
                (q.powf(g), q.powf(g - 1.0))
            }
        }
    }

    #[inline(always)]
    fn loss(self, x: f32, t: f32) -> f32 {
        let v = self.parts(x, t);
        v.alpha_t * self.powers(v.q).0 * v.ce
    }

    /// `d loss / dx = alpha_t (q^g (p - t) - g q^(g-1) p (1 - p) (2t - 1) ce)`:
    /// `d ce/dx = p - t` and `dq/dx = -p (1 - p) (2t - 1)`. `p - t` is
    /// written `p (1 - t) - t (1 - p)`, exact for a target of 0 or 1 where
    /// `p` is close to it.
    #[inline(always)]
    fn grad(self, x: f32, t: f32) -> f32 {
        let Parts { p, not_p, ce, q, alpha_t } = self.parts(x, t);
        let (q_g, q_g1) = self.powers(q);
        let p_minus_t = p * (1.0 - t) - t * not_p;
        alpha_t * (q_g * p_minus_t - self.gamma * q_g1 * p * not_p * (2.0 * t - 1.0) * ce)
    }
}

/// What the loss and its gradient share for one element.
struct Parts {
    p: f32,
    not_p: f32,
    ce: f32,
    q: f32,
    alpha_t: f32,
}

/// Anchors per parallel task for `k` classes.
fn rows_per_task(k: usize) -> usize {
    (CHUNK / k.max(1)).max(1)
}

/// Logits, targets and weights, and the number of classes.
type Arguments<'a> = (&'a [f32], &'a [f32], &'a [f32], usize);

/// The data of a custom op's arguments.
fn arguments<'a>(
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> Result<Arguments<'a>> {
    let k = l1.dims().last().copied().unwrap_or(1);
    Ok((
        f32_data(s1, l1, "focal loss logits")?,
        f32_data(s2, l2, "focal loss targets")?,
        f32_data(s3, l3, "focal loss weights")?,
        k,
    ))
}

struct FocalSum(Focal);

impl CustomOp3 for FocalSum {
    fn name(&self) -> &'static str {
        "weighted-focal-loss-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t, w, k) = arguments((s1, l1), (s2, l2), (s3, l3))?;
        let rows = rows_per_task(k);
        let focal = self.0;
        let task_sum = |(i, xs): (usize, &[f32])| -> f64 {
            let mut sum = 0f64;
            for (r, x) in xs.chunks(k).enumerate() {
                let row = i * rows + r;
                if w[row] != 0.0 {
                    let t = &t[row * k..][..k];
                    let row_sum: f32 = x.iter().zip(t).map(|(&x, &t)| focal.loss(x, t)).sum();
                    sum += f64::from(w[row]) * f64::from(row_sum);
                }
            }
            sum
        };
        // Per-task sums in task order, added in that order: the same bits
        // whatever the threads did.
        let sums: Vec<f64> = if x.len() > CHUNK {
            x.par_chunks(rows * k).enumerate().map(task_sum).collect()
        } else {
            x.chunks(rows * k).enumerate().map(task_sum).collect()
        };
        Ok((CpuStorage::F32(vec![sums.iter().sum::<f64>() as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::sum(self.0, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        _sum: &Tensor,
        grad_sum: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let scale = grad_sum.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grad = logits.apply_op3_no_bwd(targets, weights, &FocalGrad { focal: self.0, scale })?;
        Ok((Some(grad), None, None))
    }
}

/// `scale * weights * d FL / d logits`, shaped like the logits.
struct FocalGrad {
    focal: Focal,
    scale: f32,
}

impl CustomOp3 for FocalGrad {
    fn name(&self) -> &'static str {
        "weighted-focal-loss-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t, w, k) = arguments((s1, l1), (s2, l2), (s3, l3))?;
        let rows = rows_per_task(k);
        let (focal, scale) = (self.focal, self.scale);
        let mut out = vec![0f32; x.len()];
        for_each_chunk(&mut out, rows * k, x.len(), |i, out| {
            for (r, out) in out.chunks_mut(k).enumerate() {
                let row = i * rows + r;
                let w = w[row] * scale;
                if w != 0.0 {
                    let (x, t) = (&x[row * k..][..k], &t[row * k..][..k]);
                    for ((o, &x), &t) in out.iter_mut().zip(x).zip(t) {
                        *o = w * focal.grad(x, t);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::grad(self.focal, self.scale, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn logit(p: f64) -> f32 {
        (p / (1.0 - p)).ln() as f32
    }

    fn focal(x: f32, t: f32, alpha: f64, gamma: f64) -> f32 {
        let d = Device::Cpu;
        let x = Tensor::new(&[x], &d).unwrap();
        let t = Tensor::new(&[t], &d).unwrap();
        sigmoid_focal_loss(&x, &t, alpha, gamma).unwrap().to_vec1::<f32>().unwrap()[0]
    }

    /// Values worked by hand: `CE = -ln(p_t)`, `FL = alpha_t (1 - p_t)^2 CE`
    /// (alpha 0.25, gamma 2).
    #[test]
    fn focal_loss_worked_values() {
        let table = [
            (0.95, 1.0, 0.0512933, 3.20583e-5),
            (0.05, 0.0, 0.0512933, 9.61749e-5),
            (0.05, 1.0, 2.99573, 0.675912),
            (0.95, 0.0, 2.99573, 2.02774),
            (0.99, 1.0, 0.0100503, 2.51258e-7),
            (0.01, 0.0, 0.0100503, 7.53775e-7),
        ];
        for (p, y, ce, fl) in table {
            let got_ce = focal(logit(p), y, -1.0, 0.0);
            let got_fl = focal(logit(p), y, 0.25, 2.0);
            assert!((got_ce - ce).abs() / ce < 1e-4, "CE at p={p} y={y}: {got_ce} vs {ce}");
            assert!((got_fl - fl).abs() / fl < 1e-3, "FL at p={p} y={y}: {got_fl} vs {fl}");
        }
    }

    #[test]
    fn gamma_zero_is_alpha_balanced_cross_entropy() {
        for (p, y) in [(0.3, 1.0), (0.8, 0.0)] {
            let alpha_t = if y == 1.0 { 0.25 } else { 0.75 };
            let ce = focal(logit(p), y, -1.0, 0.0);
            assert!((focal(logit(p), y, 0.25, 0.0) - alpha_t * ce).abs() < 1e-6);
        }
    }

    #[test]
    fn extreme_logits_give_finite_loss_and_gradient() {
        let d = Device::Cpu;
        let x = Var::new(&[100f32, -100.0, 100.0, -100.0], &d).unwrap();
        let t = Tensor::new(&[0f32, 1.0, 1.0, 0.0], &d).unwrap();
        let loss = sigmoid_focal_loss(x.as_tensor(), &t, 0.25, 2.0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let value = loss.to_vec0::<f32>().unwrap();
        assert!(value.is_finite() && g.iter().all(|v| v.is_finite()), "loss {value}, grad {g:?}");
        assert!((value - (75.0 + 25.0)).abs() < 1e-3, "wrong confident mistakes cost 0.75*100 and 0.25*100: {value}");
    }

    /// Logits over a wide range (saturated ones included), one-hot targets
    /// on some anchors, and weights with ignored (zero) anchors.
    fn inputs(n: usize, a: usize, k: usize) -> Result<(Var, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let logits: Vec<f32> = (0..n * a * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.23).collect();
        let targets: Vec<f32> =
            (0..n * a * k).map(|i| if (i / k).is_multiple_of(3) && i % k == (i / k) % k { 1.0 } else { 0.0 }).collect();
        let weights: Vec<f32> =
            (0..n * a).map(|i| if i % 5 == 4 { 0.0 } else { 0.1 + (i % 7) as f32 * 0.05 }).collect();
        Ok((
            Var::from_vec(logits, (n, a, k), &dev)?,
            Tensor::from_vec(targets, (n, a, k), &dev)?,
            Tensor::from_vec(weights, (n, a, 1), &dev)?,
        ))
    }

    /// Against the composed Candle ops: value and gradient, for the
    /// paper's gamma 2, another gamma, gamma 0 and no alpha, on a tensor
    /// small enough for one thread and one split across threads.
    #[test]
    fn matches_the_composed_loss_and_its_gradient() -> Result<()> {
        for (n, a, k) in [(2, 7, 3), (2, 1500, 80)] {
            let (x, t, w) = inputs(n, a, k)?;
            for (alpha, gamma) in [(0.25, 2.0), (0.25, 1.5), (0.5, 0.0), (-1.0, 2.0)] {
                let ours = weighted_focal_loss_sum(x.as_tensor(), &t, &w, alpha, gamma)?;
                let reference = sigmoid_focal_loss(x.as_tensor(), &t, alpha, gamma)?.broadcast_mul(&w)?.sum_all()?;
                let (v, r) = (ours.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
                assert!((v - r).abs() <= 1e-5 * r.abs(), "{n}x{a}x{k} alpha {alpha} gamma {gamma}: {v} vs {r}");
                let g = (ours * 3.0)?.backward()?.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
                let gr = (reference * 3.0)?.backward()?.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
                // Relative to |reference| plus the mean |gradient|: entries near
                // zero carry only rounding noise (of the composed ops, mostly:
                // they round p - t through 1 - t + ...).
                let mean = gr.iter().map(|v| v.abs()).sum::<f32>() / gr.len() as f32;
                let worst = g.iter().zip(&gr).map(|(a, b)| (a - b).abs() / (b.abs() + mean)).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{n}x{a}x{k} alpha {alpha} gamma {gamma}: gradient off by {worst}");
            }
        }
        Ok(())
    }

    #[test]
    fn saturated_logits_stay_finite() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[[[100f32, -100.0], [-100.0, 100.0]]], &dev)?;
        let t = Tensor::new(&[[[0f32, 1.0], [0.0, 1.0]]], &dev)?;
        let w = Tensor::new(&[[[1f32], [1.0]]], &dev)?;
        let loss = weighted_focal_loss_sum(x.as_tensor(), &t, &w, 0.25, 2.0)?;
        // Two confident mistakes cost 0.75 * 100 and 0.25 * 100; the right
        // answers cost nothing.
        assert!((loss.to_scalar::<f32>()? - 100.0).abs() < 1e-3);
        let g = loss.backward()?.get(x.as_tensor()).unwrap().flatten_all()?.to_vec1::<f32>()?;
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        Ok(())
    }
}
