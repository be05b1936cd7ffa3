//! GroupNorm with a fused CPU kernel and backward pass.
//!
//! Candle's `GroupNorm` is a chain of about ten tensor ops, each a full pass
//! over the activations forward and more backward; the RetinaNet GN head
//! spends much of a CPU training step there. Here one custom op computes the
//! statistics (in f64) and the output per (image, group) in parallel, and
//! its backward the three gradients:
//!
//! - `dx = rstd * (dy*g - mean(dy*g) - xhat * mean(dy*g * xhat))` per group,
//! - `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)` per channel.
//!
//! The sums run in f32 lanes gathered in f64 (`lane_sum.rs`), and
//! [`GroupNorm::forward_maybe_relu`] applies the ReLU that follows each
//! norm of the head in the same pass (on the CPU), its mask in the
//! backward's. In CPU training `conv_norm.rs` runs the convolution before
//! the norm in the same op.
//!
//! On CUDA the same op runs three kernels (`cuda`). Other devices and
//! dtypes, and `runtime.cuda_kernels = "stock"`, use Candle's `GroupNorm`.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use super::cuda_kernels::own_f32_kernel;
use super::elementwise::{relu, through_relu};
use super::lane_sum::{lane_sum, lane_sums};
use super::{f32_data, zeroed};

#[cfg(feature = "cuda")]
mod cuda;

#[derive(Debug, Clone)]
pub(crate) struct GroupNorm {
    /// [channels]
    weight: Tensor,
    /// [channels]
    bias: Tensor,
    groups: usize,
    eps: f64,
    fallback: candle_nn::GroupNorm,
}

/// `weight` (init 1) and `bias` (init 0) under `vb`, as `candle_nn::group_norm`.
pub(crate) fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
    let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm { weight, bias, groups, eps, fallback })
}

/// GroupNorm of `x [n, c, h, w]` by `weight` and `bias` ([c]) in `groups`
/// groups, as the layer computes it (for callers without a VarBuilder).
pub fn group_norm_2d(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let fallback = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), weight.dim(0)?, groups, eps)?;
    GroupNorm { weight: weight.clone(), bias: bias.clone(), groups, eps, fallback }.forward(x)
}

impl Module for GroupNorm {
    /// [n, c, h, w] -> [n, c, h, w]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_relu(x, false)
    }
}

impl GroupNorm {
    /// [channels]: the affine weight (gamma).
    pub(super) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// [channels]: the affine bias (beta).
    pub(super) fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The op this norm applies (then a ReLU when `with_relu`).
    pub(super) fn op(&self, with_relu: bool) -> GroupNormOp {
        GroupNormOp::new(self.groups, self.eps, with_relu)
    }

    /// [`Module::forward`], then a ReLU when `with_relu`.
    pub(super) fn forward_maybe_relu(&self, x: &Tensor, with_relu: bool) -> Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            // Mixed precision: normalise in f32, as torch.autocast does.
            let y = self.forward_maybe_relu(&x.to_dtype(self.weight.dtype())?, with_relu)?;
            return y.to_dtype(x.dtype());
        }
        let fused = own_f32_kernel(x.device(), x.dtype())
            && x.rank() == 4
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3]
            && x.dim(1)? == self.weight.dim(0)?;
        let y = match fused {
            true => x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                // The CUDA kernels normalise only: the ReLU follows them.
                GroupNormOp::new(self.groups, self.eps, with_relu && x.device().is_cpu()),
            )?,
            false => self.fallback.forward(x)?,
        };
        match with_relu && !(fused && x.device().is_cpu()) {
            true => relu(&y),
            false => Ok(y),
        }
    }
}

/// GroupNorm, then a ReLU when `with_relu` (CPU only).
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupNormOp {
    groups: usize,
    eps: f64,
    with_relu: bool,
}

impl GroupNormOp {
    /// (channels per group, h * w) for input dims [n, c, h, w].
    fn group_shape(&self, dims: &[usize]) -> (usize, usize) {
        (dims[1] / self.groups, dims[2] * dims[3])
    }
}

/// Mean and 1/std of one group's values.
fn stats(values: &[f32], eps: f64) -> (f32, f32) {
    let n = values.len() as f64;
    let mean = (lane_sum(values, |v| v) / n) as f32;
    let var = lane_sum(values, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps).sqrt()) as f32)
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            f32_data(xs, xl, "group norm input")?,
            f32_data(ws, wl, "group norm weight")?,
            f32_data(bs, bl, "group norm bias")?,
        );
        Ok((CpuStorage::F32(self.normalize(x, xl.shape().dims(), gamma, beta)?), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.with_relu {
            candle_core::bail!("group norm: the fused ReLU runs on the CPU only");
        }
        cuda::forward(self.groups, self.eps, (xs, xl), (ws, wl), (bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads(x, gamma, y, grad, [x.track_op(), gamma.track_op(), beta.track_op()])
    }
}

impl GroupNormOp {
    pub(super) fn new(groups: usize, eps: f64, with_relu: bool) -> Self {
        GroupNormOp { groups, eps, with_relu }
    }

    /// `x [n, c, h, w]` (`dims`) normalised per (image, group), scaled by
    /// `gamma`, shifted by `beta` (and through the ReLU), on the CPU.
    pub(super) fn normalize(&self, x: &[f32], dims: &[usize], gamma: &[f32], beta: &[f32]) -> Result<Vec<f32>> {
        let c = dims[1];
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            candle_core::bail!("group norm: {} groups do not divide {c} channels", self.groups);
        }
        let (cpg, hw) = self.group_shape(dims);
        let mut out = zeroed(x.len());
        out.par_chunks_mut(cpg * hw).zip(x.par_chunks(cpg * hw)).enumerate().for_each(|(ng, (y, x))| {
            let (mean, rstd) = stats(x, self.eps);
            let first = (ng % self.groups) * cpg;
            for (j, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                let (g, b) = (gamma[first + j] * rstd, beta[first + j]);
                if self.with_relu {
                    y.iter_mut().zip(x).for_each(|(y, &x)| *y = ((x - mean) * g + b).max(0.0));
                } else {
                    y.iter_mut().zip(x).for_each(|(y, &x)| *y = (x - mean) * g + b);
                }
            }
        });
        Ok(out)
    }

    /// The gradients of the input `x`, of `gamma` and of the shift, each
    /// where `wanted`, from the output `y` and its gradient.
    pub(super) fn grads(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        y: &Tensor,
        grad: &Tensor,
        wanted: [bool; 3],
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let packed = match x.device().is_cuda() {
            true => grad.apply_op3_no_bwd(x, gamma, &GroupNormGrad { groups: self.groups, eps: self.eps })?,
            false => grad.apply_op3_no_bwd(x, y, &GroupNormCpuGrad { op: self, gamma: gamma.to_vec1()? })?,
        };
        let (len, c) = (x.elem_count(), gamma.elem_count());
        let dx = wanted[0].then(|| packed.narrow(0, 0, len)?.reshape(x.shape())).transpose()?;
        let dgamma = wanted[1].then(|| packed.narrow(0, len, c)).transpose()?;
        let dbeta = wanted[2].then(|| packed.narrow(0, len + c, c)).transpose()?;
        Ok((dx, dgamma, dbeta))
    }
}

/// `[dx, dgamma, dbeta]` packed in one f32 vector, from arguments `dy`, `x`
/// and the norm's output `y` (for the ReLU's mask), on the CPU.
struct GroupNormCpuGrad<'a> {
    op: &'a GroupNormOp,
    /// [c]
    gamma: Vec<f32>,
}

impl CustomOp3 for GroupNormCpuGrad<'_> {
    fn name(&self) -> &'static str {
        "group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (dy, x, y) = (
            f32_data(gs, gl, "group norm gradient")?,
            f32_data(xs, xl, "group norm input")?,
            f32_data(ys, yl, "group norm output")?,
        );
        let (op, g, c) = (self.op, &self.gamma, self.gamma.len());
        let (cpg, hw) = op.group_shape(xl.shape().dims());
        let mut packed = zeroed(x.len() + 2 * c);
        let (dx, sums) = packed.split_at_mut(x.len());
        let group = cpg * hw;
        // Per (image, group): dx, and per channel (dgamma, dbeta).
        let partial: Vec<Vec<(f64, f64)>> = dx
            .par_chunks_mut(group)
            .zip(x.par_chunks(group).zip(dy.par_chunks(group)).zip(y.par_chunks(group)))
            .enumerate()
            .map(|(ng, (dx, ((x, dy), y)))| {
                let (mean, rstd) = stats(x, op.eps);
                let first = (ng % op.groups) * cpg;
                let channels = x.chunks(hw).zip(dy.chunks(hw)).zip(y.chunks(hw));
                let per_channel: Vec<(f64, f64)> = channels
                    .map(|((x, dy), y)| {
                        // dbeta = sum(d), dgamma = sum(d * xhat) = rstd * sum(d * (x - mean)).
                        let [sum_d, sum_d_centred] = lane_sums(dy, x, y, |dy, x, y| {
                            let d = through_relu(op.with_relu, dy, y);
                            [d, d * (x - mean)]
                        });
                        (sum_d_centred * f64::from(rstd), sum_d)
                    })
                    .collect();
                // mean(dy*g) and mean(dy*g * xhat) over the group.
                let n = group as f64;
                let channel_gamma = |j: usize| f64::from(g[first + j]);
                let m1 = per_channel.iter().enumerate().map(|(j, s)| channel_gamma(j) * s.1).sum::<f64>() / n;
                let m2 = per_channel.iter().enumerate().map(|(j, s)| channel_gamma(j) * s.0).sum::<f64>() / n;
                let (m1, m2) = (m1 as f32, m2 as f32);
                let channels = dx.chunks_mut(hw).zip(x.chunks(hw).zip(dy.chunks(hw)).zip(y.chunks(hw)));
                for (j, (dx, ((x, dy), y))) in channels.enumerate() {
                    let gj = g[first + j];
                    for (dx, ((&x, &dy), &y)) in dx.iter_mut().zip(x.iter().zip(dy).zip(y)) {
                        let xhat = (x - mean) * rstd;
                        *dx = rstd * (through_relu(op.with_relu, dy, y) * gj - m1 - xhat * m2);
                    }
                }
                per_channel
            })
            .collect();
        let (dgamma, dbeta) = sums.split_at_mut(c);
        let mut totals = vec![(0f64, 0f64); c];
        for (ng, per_channel) in partial.iter().enumerate() {
            for (j, (dg, db)) in per_channel.iter().enumerate() {
                let total = &mut totals[(ng % op.groups) * cpg + j];
                (total.0, total.1) = (total.0 + dg, total.1 + db);
            }
        }
        for ((dgamma, dbeta), (dg, db)) in dgamma.iter_mut().zip(dbeta.iter_mut()).zip(totals) {
            (*dgamma, *dbeta) = (dg as f32, db as f32);
        }
        Ok((CpuStorage::F32(packed), Shape::from(x.len() + 2 * c)))
    }
}

/// `[dx, dgamma, dbeta]` packed in one f32 vector, from arguments `dy`, `x`
/// and `gamma` (on CUDA).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct GroupNormGrad {
    groups: usize,
    eps: f64,
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the packed group norm gradient runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::backward(self.groups, self.eps, (gs, gl), (xs, xl), (ws, wl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probed_gradients};
    use candle_core::{Device, Var};

    /// Values and all three gradients equal Candle's GroupNorm, alone and
    /// followed by a ReLU.
    #[test]
    fn matches_candle_group_norm() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, h, w, groups) in [(2, 8, 5, 7, 4), (3, 6, 4, 4, 6), (1, 4, 3, 2, 1), (2, 64, 24, 33, 32)] {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (n, c, h, w), &dev)? + 3.0)?)?;
            let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.5, c, &dev)?)?;
            let beta = Var::from_tensor(&Tensor::randn(0f32, 0.5, c, &dev)?)?;
            let ours = GroupNorm {
                weight: gamma.as_tensor().clone(),
                bias: beta.as_tensor().clone(),
                groups,
                eps: 1e-5,
                fallback: candle_nn::GroupNorm::new(
                    gamma.as_tensor().clone(),
                    beta.as_tensor().clone(),
                    c,
                    groups,
                    1e-5,
                )?,
            };
            let pairs = [
                (ours.forward(x.as_tensor())?, ours.fallback.forward(x.as_tensor())?, "norm"),
                (
                    ours.forward_maybe_relu(x.as_tensor(), true)?,
                    ours.fallback.forward(x.as_tensor())?.relu()?,
                    "norm and ReLU",
                ),
            ];
            for (y, reference, op) in pairs {
                assert!(max_diff(&y, &reference)? < 1e-4, "{op} forward {n}x{c}x{h}x{w}/{groups}");
                let (a, b) = probed_gradients(&y, &reference)?;
                for (t, what) in [(x.as_tensor(), "input"), (gamma.as_tensor(), "weight"), (beta.as_tensor(), "bias")] {
                    let (ours, reference) = (a.get(t).expect("gradient"), b.get(t).expect("reference gradient"));
                    // The weight and bias gradients sum a plane of products:
                    // the bound is relative to their size (Candle's f32 sums
                    // round at 1e-6 of it).
                    let size = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                    let d = max_diff(ours, reference)?;
                    assert!(d < 1e-4 * size, "{op}: {what} gradient {n}x{c}x{h}x{w}/{groups}: {d} (size {size})");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn groups_must_divide_channels() {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        assert!(group_norm(3, 8, 1e-5, vb).is_err());
    }
}
