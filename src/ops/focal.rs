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
use super::{f32_data, zeroed};

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
        let e = exp_neg(x.abs());
        let (big, small) = (1.0 / (1.0 + e), e / (1.0 + e));
        let (p, not_p) = if x >= 0.0 { (big, small) } else { (small, big) };
        Parts {
            p,
            not_p,
            ce: x.max(0.0) - x * t + ln_1p_unit(e),
            q: not_p * t + p * (1.0 - t),
            alpha_t: if self.alpha < 0.0 { 1.0 } else { self.alpha * t + (1.0 - self.alpha) * (1.0 - t) },
        }
    }

    /// Runs `pass` with `q -> (q^gamma, q^(gamma - 1))` for this gamma
    /// (for other gammas than 0 and 2, `q` clamped away from 0 as the
    /// composed loss does). The choice is made here, once: a branch on
    /// gamma inside the element loops becomes a select, which calls `powf`
    /// for every element even when gamma is 2.
    fn run<P: ElementPass>(self, pass: P) -> P::Output {
        match self.gamma {
            0.0 => pass.run(self, |_| (1.0, 0.0)),
            2.0 => pass.run(self, |q| (q * q, q)),
            g => pass.run(self, move |q| {
                let q = q.clamp(1e-12, 1.0);
                (q.powf(g), q.powf(g - 1.0))
            }),
        }
    }

    #[inline(always)]
    fn loss(self, x: f32, t: f32, powers: impl Powers) -> f32 {
        let v = self.parts(x, t);
        v.alpha_t * powers(v.q).0 * v.ce
    }

    /// `d loss / dx = alpha_t (q^g (p - t) - g q^(g-1) p (1 - p) (2t - 1) ce)`:
    /// `d ce/dx = p - t` and `dq/dx = -p (1 - p) (2t - 1)`. `p - t` is
    /// written `p (1 - t) - t (1 - p)`, exact for a target of 0 or 1 where
    /// `p` is close to it.
    #[inline(always)]
    fn grad(self, x: f32, t: f32, powers: impl Powers) -> f32 {
        let Parts { p, not_p, ce, q, alpha_t } = self.parts(x, t);
        let (q_g, q_g1) = powers(q);
        let p_minus_t = p * (1.0 - t) - t * not_p;
        alpha_t * (q_g * p_minus_t - self.gamma * q_g1 * p * not_p * (2.0 * t - 1.0) * ce)
    }
}

// The two transcendental functions of the loss, written inline: glibc's
// `expf` and `log1pf` are calls the compiler cannot vectorise, and with
// 80 classes at 512 px the loss and its gradient spent about 5% of a
// training step in them (`log1pf` alone 3.4%). Both are within 2 ulp of
// the correctly rounded value over their whole domain (test
// `inline_exp_and_log1p_match_f64`).

/// `e^-a` for `a >= 0`; 0 where the result is below f32's normal range.
#[inline(always)]
fn exp_neg(a: f32) -> f32 {
    // Cody and Waite's reduction by n ln 2, with ln 2 split in two so that
    // `n * LN2_HI` (9 significant bits) is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Past this, `e^-a` is below 2^-126.
    const LARGEST: f32 = 87.3;
    let clamped = a.min(LARGEST);
    // `a >= 0`, so truncation rounds to nearest here; `as` keeps it a
    // vector instruction where `round()` would be a libm call on x86-64.
    let n = (clamped * std::f32::consts::LOG2_E + 0.5) as i32;
    let nf = n as f32;
    // e^-a = 2^-n e^rest, with rest = n ln2 - a in [-ln2/2, ln2/2].
    let rest = (nf * LN2_HI - clamped) + nf * LN2_LO;
    // e^rest by its Taylor series to rest^7: the next term is under 6e-9.
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * rest + c;
    }
    let two_to_minus_n = f32::from_bits(((127 - n) as u32) << 23);
    if a > LARGEST {
        0.0
    } else {
        p * two_to_minus_n
    }
}

/// `ln(1 + e)` for `0 <= e <= 1`, as `2 atanh(s)` with `s = e / (2 + e)`,
/// which keeps full precision for small `e` (no `1 + e` is rounded first).
#[inline(always)]
fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e); // in [0, 1/3]
    let s2 = s * s;
    // 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), to s^14: the rest is
    // under 2e-8 of the sum at s = 1/3.
    let mut p = 1.0 / 15.0;
    for c in [1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0] {
        p = p * s2 + c;
    }
    2.0 * s * p
}

/// `q -> (q^gamma, q^(gamma - 1))` for one gamma.
trait Powers: Fn(f32) -> (f32, f32) + Copy + Sync {}
impl<F: Fn(f32) -> (f32, f32) + Copy + Sync> Powers for F {}

/// A loop over the elements, compiled once for each kind of gamma
/// ([`Focal::run`]).
trait ElementPass {
    type Output;
    fn run(self, focal: Focal, powers: impl Powers) -> Self::Output;
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

/// [`FocalSum`]'s loop: the weighted sum of the loss over all elements.
struct LossSum<'a>(Arguments<'a>);

impl ElementPass for LossSum<'_> {
    type Output = f32;

    fn run(self, focal: Focal, powers: impl Powers) -> f32 {
        let (x, t, w, k) = self.0;
        let rows = rows_per_task(k);
        let task_sum = |(i, xs): (usize, &[f32])| -> f64 {
            let mut sum = 0f64;
            let mut losses = vec![0f32; k];
            for (r, x) in xs.chunks(k).enumerate() {
                let row = i * rows + r;
                if w[row] != 0.0 {
                    // Into a buffer first, so that this loop vectorises; the
                    // sum below keeps its order.
                    for ((l, &x), &t) in losses.iter_mut().zip(x).zip(&t[row * k..][..k]) {
                        *l = focal.loss(x, t, powers);
                    }
                    sum += f64::from(w[row]) * f64::from(losses.iter().sum::<f32>());
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
        sums.iter().sum::<f64>() as f32
    }
}

/// [`FocalGrad`]'s loop.
struct LossGrad<'a> {
    arguments: Arguments<'a>,
    scale: f32,
}

impl ElementPass for LossGrad<'_> {
    type Output = Vec<f32>;

    fn run(self, focal: Focal, powers: impl Powers) -> Vec<f32> {
        let (x, t, w, k) = self.arguments;
        let rows = rows_per_task(k);
        let mut out = zeroed(x.len());
        for_each_chunk(&mut out, rows * k, x.len(), |i, out| {
            for (r, out) in out.chunks_mut(k).enumerate() {
                let row = i * rows + r;
                let w = w[row] * self.scale;
                if w != 0.0 {
                    let (x, t) = (&x[row * k..][..k], &t[row * k..][..k]);
                    for ((o, &x), &t) in out.iter_mut().zip(x).zip(t) {
                        *o = w * focal.grad(x, t, powers);
                    }
                }
            }
        });
        out
    }
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
        let sum = self.0.run(LossSum(arguments((s1, l1), (s2, l2), (s3, l3))?));
        Ok((CpuStorage::F32(vec![sum]), Shape::from(())))
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
        let out = self.focal.run(LossGrad { arguments: arguments((s1, l1), (s2, l2), (s3, l3))?, scale: self.scale });
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

    /// Against f64's `exp` and `ln_1p` over the whole range the loss uses,
    /// in ulps of the f32 result.
    #[test]
    fn inline_exp_and_log1p_match_f64() {
        let ulps = |got: f32, want: f64| ((f64::from(got) - want) / f64::from(f32::EPSILON * (want as f32))).abs();
        let mut worst = (0f64, 0f64);
        for i in 0..=2_000_000 {
            let a = i as f32 * 87.0 / 2e6;
            let want = (-f64::from(a)).exp();
            worst.0 = worst.0.max(ulps(exp_neg(a), want));
            let e = i as f32 / 2e6;
            if e > 0.0 {
                worst.1 = worst.1.max(ulps(ln_1p_unit(e), f64::from(e).ln_1p()));
            }
        }
        assert!(worst.0 <= 2.0 && worst.1 <= 2.0, "exp off by {} ulp, ln_1p by {}", worst.0, worst.1);
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!((exp_neg(88.0), exp_neg(1e30), exp_neg(f32::INFINITY)), (0.0, 0.0, 0.0));
        assert_eq!(ln_1p_unit(0.0), 0.0);
        assert!(ln_1p_unit(1e-30) == 1e-30 && (ln_1p_unit(1.0) - std::f32::consts::LN_2).abs() <= f32::EPSILON);
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
