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
//! On CUDA the same op runs three kernels (`cuda`). Other devices and
//! dtypes, and `runtime.cuda_kernels = "stock"`, use Candle's `GroupNorm`.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use super::cuda_kernels::own_f32_kernel;
use super::f32_data;

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
        if x.dtype() != self.weight.dtype() {
            // Mixed precision: normalise in f32, as torch.autocast does.
            return self.forward(&x.to_dtype(self.weight.dtype())?)?.to_dtype(x.dtype());
        }
        let fused = own_f32_kernel(x.device(), x.dtype())
            && x.rank() == 4
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3]
            && x.dim(1)? == self.weight.dim(0)?;
        if !fused {
            return self.fallback.forward(x);
        }
        x.contiguous()?.apply_op3(
            &self.weight.contiguous()?,
            &self.bias.contiguous()?,
            GroupNormOp { groups: self.groups, eps: self.eps },
        )
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
}

/// Mean and 1/std of one group's values.
fn stats(values: &[f32], eps: f64) -> (f32, f32) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
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
        let dims = xl.shape().dims();
        let c = dims[1];
        if self.groups == 0 || !c.is_multiple_of(self.groups) {
            candle_core::bail!("group norm: {} groups do not divide {c} channels", self.groups);
        }
        let (cpg, hw) = self.group_shape(dims);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(cpg * hw).zip(x.par_chunks(cpg * hw)).enumerate().for_each(|(ng, (y, x))| {
            let (mean, rstd) = stats(x, self.eps);
            let first = (ng % self.groups) * cpg;
            for (j, (y, x)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                let (g, b) = (gamma[first + j] * rstd, beta[first + j]);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = (x - mean) * g + b;
                }
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
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
        cuda::forward(self.groups, self.eps, (xs, xl), (ws, wl), (bs, bl))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if x.device().is_cuda() {
            return self.packed_backward(x, gamma, beta, grad);
        }
        self.cpu_backward(x, gamma, beta, grad)
    }
}

impl GroupNormOp {
    /// (channels per group, h * w) for input dims [n, c, h, w].
    fn group_shape(&self, dims: &[usize]) -> (usize, usize) {
        (dims[1] / self.groups, dims[2] * dims[3])
    }

    /// The three gradients from one op whose output packs them (the CUDA
    /// kernels), each kept only where the graph needs it.
    fn packed_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GroupNormGrad { groups: self.groups, eps: self.eps };
        let packed = grad.contiguous()?.apply_op3_no_bwd(x, gamma, &op)?;
        let (len, c) = (x.elem_count(), gamma.elem_count());
        let dx = x.track_op().then(|| packed.narrow(0, 0, len)?.reshape(x.shape())).transpose()?;
        let dgamma = gamma.track_op().then(|| packed.narrow(0, len, c)).transpose()?;
        let dbeta = beta.track_op().then(|| packed.narrow(0, len + c, c)).transpose()?;
        Ok((dx, dgamma, dbeta))
    }

    fn cpu_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let c = dims[1];
        let (cpg, hw) = self.group_shape(&dims);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.flatten_all()?.to_vec1::<f32>()?;
        let g = gamma.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xs.len()];
        // Per (image, group): dx, and per channel sums of dy * xhat and dy.
        let partial: Vec<Vec<(f64, f64)>> = dx
            .par_chunks_mut(cpg * hw)
            .zip(xs.par_chunks(cpg * hw).zip(dy.par_chunks(cpg * hw)))
            .enumerate()
            .map(|(ng, (dx, (x, dy)))| {
                let (mean, rstd) = stats(x, self.eps);
                let first = (ng % self.groups) * cpg;
                let (mut sum_dyg, mut sum_dyg_xhat) = (0f64, 0f64);
                let mut per_channel = Vec::with_capacity(cpg);
                for (j, (x, dy)) in x.chunks(hw).zip(dy.chunks(hw)).enumerate() {
                    let (mut dgamma, mut dbeta) = (0f64, 0f64);
                    for (&x, &dy) in x.iter().zip(dy) {
                        let xhat = f64::from((x - mean) * rstd);
                        let dyg = f64::from(dy * g[first + j]);
                        sum_dyg += dyg;
                        sum_dyg_xhat += dyg * xhat;
                        dgamma += f64::from(dy) * xhat;
                        dbeta += f64::from(dy);
                    }
                    per_channel.push((dgamma, dbeta));
                }
                let n = (cpg * hw) as f64;
                let (m1, m2) = ((sum_dyg / n) as f32, (sum_dyg_xhat / n) as f32);
                for (j, (dx, (x, dy))) in dx.chunks_mut(hw).zip(x.chunks(hw).zip(dy.chunks(hw))).enumerate() {
                    let gj = g[first + j];
                    for (dx, (&x, &dy)) in dx.iter_mut().zip(x.iter().zip(dy)) {
                        let xhat = (x - mean) * rstd;
                        *dx = rstd * (dy * gj - m1 - xhat * m2);
                    }
                }
                per_channel
            })
            .collect();
        let mut dgamma = vec![0f64; c];
        let mut dbeta = vec![0f64; c];
        for (ng, sums) in partial.iter().enumerate() {
            for (j, (dg, db)) in sums.iter().enumerate() {
                dgamma[(ng % self.groups) * cpg + j] += dg;
                dbeta[(ng % self.groups) * cpg + j] += db;
            }
        }
        let to_tensor =
            |v: Vec<f64>| Tensor::from_vec(v.into_iter().map(|v| v as f32).collect::<Vec<_>>(), c, &Device::Cpu);
        let dx = x.track_op().then(|| Tensor::from_vec(dx, dims.as_slice(), &Device::Cpu)).transpose()?;
        let dgamma = gamma.track_op().then(|| to_tensor(dgamma)).transpose()?;
        let dbeta = beta.track_op().then(|| to_tensor(dbeta)).transpose()?;
        Ok((dx, dgamma, dbeta))
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
    use candle_core::Var;

    /// Values and all three gradients equal Candle's GroupNorm.
    #[test]
    fn matches_candle_group_norm() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, h, w, groups) in [(2, 8, 5, 7, 4), (3, 6, 4, 4, 6), (1, 4, 3, 2, 1)] {
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
            let y = ours.forward(x.as_tensor())?;
            let reference = ours.fallback.forward(x.as_tensor())?;
            assert!(max_diff(&y, &reference)? < 1e-4, "forward {n}x{c}x{h}x{w}/{groups}");
            let (a, b) = probed_gradients(&y, &reference)?;
            for (t, what) in [(x.as_tensor(), "input"), (gamma.as_tensor(), "weight"), (beta.as_tensor(), "bias")] {
                let d = max_diff(a.get(t).expect("gradient"), b.get(t).expect("reference gradient"))?;
                assert!(d < 1e-4, "{what} gradient {n}x{c}x{h}x{w}/{groups}: {d}");
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
