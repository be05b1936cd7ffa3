//! BatchNorm with a fused CPU training kernel and backward pass.
//!
//! In training, Candle's `BatchNorm` runs a dozen tensor ops (transposes,
//! copies, reductions, broadcasts), each a full pass forward and more
//! backward; with a BN backbone that dominates a CPU training step. Here the
//! batch statistics are one parallel pass (sums in f32 lanes gathered in
//! f64, `lane_sum.rs`), the normalisation one
//! custom op, and its backward the closed form per channel over (n, h, w):
//!
//! - `dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))`,
//! - `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`.
//!
//! Running statistics update as in PyTorch (momentum, unbiased variance).
//! [`BatchNorm::forward_maybe_relu`] applies the ReLU that follows most
//! norms in the same op: one graph node instead of two saves a pass each
//! way and one of Candle's gradient accumulations (a zero-filled buffer and
//! an add); `conv_norm.rs` goes further and takes the convolution before
//! the norm into the same node.
//! Statistics and gradients read the tensors' storage in place (custom ops
//! without a backward), never copies of it. Evaluation, other devices and
//! dtypes use Candle's `BatchNorm`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, ModuleT, Result, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, VarBuilder};
use rayon::prelude::*;

use super::elementwise::{relu, through_relu};
use super::lane_sum::{lane_sum, lane_sums};
use super::{f32_data, written};

#[derive(Debug, Clone)]
pub(crate) struct BatchNorm {
    /// [channels]
    weight: Tensor,
    /// [channels]
    bias: Tensor,
    /// [channels]: a variable, or a detached view of one in an inference
    /// model (which never trains).
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
    fallback: candle_nn::BatchNorm,
}

/// `weight`, `bias`, `running_mean`, `running_var` under `vb`, initialised
/// like PyTorch (1, 0, 0, 1).
pub(crate) fn batch_norm(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<BatchNorm> {
    let get = |name, init| vb.get_with_hints(channels, name, Init::Const(init));
    let (weight, bias) = (get("weight", 1.0)?, get("bias", 0.0)?);
    let (running_mean, running_var) = (get("running_mean", 0.0)?, get("running_var", 1.0)?);
    let cfg = BatchNormConfig { eps, momentum, ..Default::default() };
    // Only for training off the fused path: it updates the statistics
    // through `Var::from_tensor`, which shares a variable's storage.
    let fallback = candle_nn::BatchNorm::new_with_momentum(
        channels,
        running_mean.clone(),
        running_var.clone(),
        weight.clone(),
        bias.clone(),
        cfg.eps,
        cfg.momentum,
    )?;
    Ok(BatchNorm { weight, bias, running_mean, running_var, eps, momentum, fallback })
}

impl ModuleT for BatchNorm {
    /// [n, c, h, w] -> [n, c, h, w]: batch statistics in training (which
    /// also update the running ones), running statistics otherwise.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu(x, train, false)
    }
}

impl BatchNorm {
    /// [`ModuleT::forward_t`], then a ReLU when `with_relu`.
    pub(super) fn forward_maybe_relu(&self, x: &Tensor, train: bool, with_relu: bool) -> Result<Tensor> {
        if x.dtype() != self.weight.dtype() {
            // Mixed precision: normalise in f32, as torch.autocast does.
            let y = self.forward_maybe_relu(&x.to_dtype(self.weight.dtype())?, train, with_relu)?;
            return y.to_dtype(x.dtype());
        }
        if !train {
            let y = self.normalize_with_running_stats(x)?;
            return if with_relu { relu(&y) } else { Ok(y) };
        }
        let fused = x.device().is_cpu()
            && x.rank() == 4
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3]
            && x.dim(1)? == self.weight.dim(0)?;
        if !fused {
            let y = self.fallback.forward_t(x, train)?;
            return if with_relu { relu(&y) } else { Ok(y) };
        }
        let x = x.contiguous()?;
        let (n, _, h, w) = x.dims4()?;
        let count = n * h * w;
        if count < 2 {
            candle_core::bail!("batch norm: training needs more than one value per channel, got input {:?}", x.dims());
        }
        let [mean, var] = per_channel_pair(x.apply_op1_no_bwd(&ChannelStats)?)?;
        self.update_running(&mean, &var, count)?;
        let op = BatchNormOp::new(&mean, &var, self.eps, with_relu);
        x.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)
    }

    /// [channels]: the affine weight (gamma).
    pub(super) fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// [channels]: the affine bias (beta).
    pub(super) fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub(super) fn eps(&self) -> f64 {
        self.eps
    }

    /// Evaluation: `x * scale + shift` per channel, with `scale = gamma /
    /// sqrt(running_var + eps)` and `shift = beta - running_mean * scale`.
    /// Read from the tensors at each call (Candle's `BatchNorm` keeps its
    /// own copy of detached statistics, which an inference model's are).
    fn normalize_with_running_stats(&self, x: &Tensor) -> Result<Tensor> {
        let scale = (&self.weight / (&self.running_var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (&self.running_mean * &scale)?)?;
        let per_channel = (1, scale.dim(0)?, 1, 1);
        x.broadcast_mul(&scale.reshape(per_channel)?)?.broadcast_add(&shift.reshape(per_channel)?)
    }

    /// `running = (1 - momentum) * running + momentum * batch`, with the
    /// unbiased batch variance.
    pub(super) fn update_running(&self, mean: &[f64], var: &[f64], count: usize) -> Result<()> {
        let m = self.momentum;
        let unbias = count as f64 / (count - 1) as f64;
        let blend = |running: &Tensor, batch: Vec<f32>| -> Result<()> {
            if !running.is_variable() {
                candle_core::bail!("batch norm: an inference model (detached statistics) cannot train");
            }
            let running = Var::from_tensor(running)?; // shares the variable's storage
            let batch = Tensor::from_vec(batch, running.dims(), running.device())?;
            running.set(&((running.as_tensor() * (1.0 - m))? + (batch * m)?)?)
        };
        blend(&self.running_mean, mean.iter().map(|&v| v as f32).collect())?;
        blend(&self.running_var, var.iter().map(|&v| (v * unbias) as f32).collect())
    }
}

/// The `plane`-sized slices of channel `ch` in a contiguous [n, c, plane] buffer.
fn channel_planes(data: &[f32], c: usize, plane: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    data.chunks(c * plane).map(move |image| &image[ch * plane..(ch + 1) * plane])
}

/// The two rows of a `[2, c]` f64 tensor.
fn per_channel_pair(t: Tensor) -> Result<[Vec<f64>; 2]> {
    let mut rows = t.to_vec2::<f64>()?.into_iter();
    match (rows.next(), rows.next()) {
        (Some(a), Some(b)) => Ok([a, b]),
        _ => candle_core::bail!("batch norm: expected two rows of per-channel values"),
    }
}

/// `(c, plane)` of an [n, c, h, w] layout.
fn channels_and_plane(l: &Layout) -> (usize, usize) {
    let dims = l.shape().dims();
    (dims[1], dims[2] * dims[3])
}

/// `[n, c, h, w] -> [2, c]` (f64): each channel's mean and biased variance.
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "batch norm input")?;
        let (c, plane) = channels_and_plane(l);
        let [mean, var] = channel_stats(x, c, plane);
        Ok((CpuStorage::F64([mean, var].concat()), Shape::from((2, c))))
    }
}

/// Each channel's mean and biased variance over (n, h, w) of a contiguous
/// `[n, c, plane]` buffer, channels in parallel.
pub(super) fn channel_stats(x: &[f32], c: usize, plane: usize) -> [Vec<f64>; 2] {
    let count = (x.len() / c) as f64;
    let (mean, var): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || channel_planes(x, c, plane, ch);
            let mean = planes().map(|values| lane_sum(values, |v| v)).sum::<f64>() / count;
            let m = mean as f32;
            let var = planes().map(|values| lane_sum(values, |v| (v - m) * (v - m))).sum::<f64>() / count;
            (mean, var)
        })
        .unzip();
    [mean, var]
}

/// Normalises with the batch statistics computed beforehand, then applies
/// a ReLU when `with_relu`.
pub(super) struct BatchNormOp {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    with_relu: bool,
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
            f32_data(xs, xl, "batch norm input")?,
            f32_data(ws, wl, "batch norm weight")?,
            f32_data(bs, bl, "batch norm bias")?,
        );
        let (c, plane) = channels_and_plane(xl);
        Ok((CpuStorage::F32(self.normalize(x, (c, plane), gamma, beta)), xl.shape().clone()))
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

impl BatchNormOp {
    pub(super) fn new(mean: &[f64], var: &[f64], eps: f64, with_relu: bool) -> Self {
        let rstd = var.iter().map(|v| (1.0 / (v + eps).sqrt()) as f32).collect();
        let mean = mean.iter().map(|&m| m as f32).collect();
        BatchNormOp { mean, rstd, with_relu }
    }

    /// `x [n, c, plane]` normalised, scaled by `gamma`, shifted by `beta`
    /// (and through the ReLU).
    pub(super) fn normalize(&self, x: &[f32], (c, plane): (usize, usize), gamma: &[f32], beta: &[f32]) -> Vec<f32> {
        let floor = if self.with_relu { 0.0 } else { f32::NEG_INFINITY };
        written(x.len(), plane, |i| {
            let ch = i % c;
            let (m, g, b) = (self.mean[ch], gamma[ch] * self.rstd[ch], beta[ch]);
            x[i * plane..].iter().map(move |&x| ((x - m) * g + b).max(floor))
        })
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
        let [sum_dy, sum_dy_xhat] = per_channel_pair(x.apply_op3_no_bwd(&grad, y, &GradSums(self))?)?;
        let to_tensor =
            |v: &[f64]| Tensor::from_vec(v.iter().map(|&v| v as f32).collect::<Vec<_>>(), v.len(), &Device::Cpu);
        let dgamma = wanted[1].then(|| to_tensor(&sum_dy_xhat)).transpose()?;
        let dbeta = wanted[2].then(|| to_tensor(&sum_dy)).transpose()?;
        let dx = match wanted[0] {
            true => {
                let gamma = gamma.to_vec1::<f32>()?;
                Some(x.apply_op3_no_bwd(&grad, y, &InputGrad { op: self, gamma, sum_dy, sum_dy_xhat })?)
            }
            false => None,
        };
        Ok((dx, dgamma, dbeta))
    }
}

/// The data of the backward ops' arguments: input, output gradient, output.
fn grad_arguments<'a>(args: [(&'a CpuStorage, &Layout); 3]) -> Result<[&'a [f32]; 3]> {
    let [x, dy, y] = args;
    Ok([
        f32_data(x.0, x.1, "batch norm input")?,
        f32_data(dy.0, dy.1, "batch norm gradient")?,
        f32_data(y.0, y.1, "batch norm output")?,
    ])
}

/// Arguments `x`, `dy`, `y`: per channel over (n, h, w), `sum(dy)` and
/// `sum(dy * xhat)` (`dy` masked by the ReLU), as `[2, c]` f64.
struct GradSums<'a>(&'a BatchNormOp);

impl CustomOp3 for GradSums<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-grad-sums"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let [x, dy, y] = grad_arguments([(xs, xl), (gs, gl), (ys, yl)])?;
        let (c, plane) = channels_and_plane(xl);
        let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, r) = (op.mean[ch], op.rstd[ch]);
                let planes = channel_planes(x, c, plane, ch)
                    .zip(channel_planes(dy, c, plane, ch))
                    .zip(channel_planes(y, c, plane, ch));
                // sum(dy * xhat) = rstd * sum(dy * (x - mean)).
                let (sum_dy, sum_dy_centred) = planes.fold((0f64, 0f64), |(a, b), ((x, dy), y)| {
                    let [sum_dy, sum_dy_centred] = lane_sums(dy, x, y, |dy, x, y| {
                        let dy = through_relu(op.with_relu, dy, y);
                        [dy, dy * (x - m)]
                    });
                    (a + sum_dy, b + sum_dy_centred)
                });
                (sum_dy, sum_dy_centred * f64::from(r))
            })
            .unzip();
        Ok((CpuStorage::F64([sum_dy, sum_dy_xhat].concat()), Shape::from((2, c))))
    }
}

/// Arguments `x`, `dy`, `y`: the input gradient
/// `gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))`.
struct InputGrad<'a> {
    op: &'a BatchNormOp,
    gamma: Vec<f32>,
    sum_dy: Vec<f64>,
    sum_dy_xhat: Vec<f64>,
}

impl CustomOp3 for InputGrad<'_> {
    fn name(&self) -> &'static str {
        "batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.op;
        let [x, dy, y] = grad_arguments([(xs, xl), (gs, gl), (ys, yl)])?;
        let (c, plane) = channels_and_plane(xl);
        let count = (x.len() / c) as f64;
        let dx = written(x.len(), plane, |i| {
            let ch = i % c;
            let (m, r) = (op.mean[ch], op.rstd[ch]);
            let (mean_dy, mean_dy_xhat) = ((self.sum_dy[ch] / count) as f32, (self.sum_dy_xhat[ch] / count) as f32);
            let scale = self.gamma[ch] * r;
            let with_relu = op.with_relu;
            let inputs = x[i * plane..].iter().zip(&dy[i * plane..]).zip(&y[i * plane..]);
            inputs.map(move |((&x, &dy), &y)| {
                scale * (through_relu(with_relu, dy, y) - mean_dy - (x - m) * r * mean_dy_xhat)
            })
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probed_gradients};
    use candle_nn::VarMap;

    /// Outputs, gradients and running statistics equal Candle's BatchNorm in
    /// training mode (followed by Candle's ReLU for `forward_relu`);
    /// evaluation uses the running statistics.
    #[test]
    fn matches_candle_batch_norm() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [(2, 3, 5, 7), (4, 5, 1, 1), (1, 2, 3, 3)];
        for ((n, c, h, w), with_relu) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
            let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (n, c, h, w), &dev)? + 1.5)?)?;
            let build = || -> Result<(VarMap, BatchNorm)> {
                let vm = VarMap::new();
                let bn = batch_norm(c, 1e-5, 0.1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
                Ok((vm, bn))
            };
            let (ours_vm, ours) = build()?;
            let (_, theirs) = build()?;
            // Distinct affine parameters, the same in both.
            let gamma = Tensor::randn(1f32, 0.3, c, &dev)?;
            for bn in [&ours, &theirs] {
                Var::from_tensor(&bn.weight)?.set(&gamma)?;
            }
            let (y, reference) = match with_relu {
                false => (ours.forward_t(x.as_tensor(), true)?, theirs.fallback.forward_t(x.as_tensor(), true)?),
                true => (
                    ours.forward_maybe_relu(x.as_tensor(), true, true)?,
                    theirs.fallback.forward_t(x.as_tensor(), true)?.relu()?,
                ),
            };
            let what = format!("{n}x{c}x{h}x{w} relu {with_relu}");
            assert!(max_diff(&y, &reference)? < 1e-4, "forward {what}");
            for (a, b) in [(&ours.running_mean, &theirs.running_mean), (&ours.running_var, &theirs.running_var)] {
                assert!(max_diff(a, b)? < 1e-5, "running statistics {what}");
            }
            let (a, b) = probed_gradients(&y, &reference)?;
            for (ta, tb, name) in [
                (x.as_tensor(), x.as_tensor(), "input"),
                (&ours.weight, &theirs.weight, "weight"),
                (&ours.bias, &theirs.bias, "bias"),
            ] {
                let d = max_diff(a.get(ta).expect("gradient"), b.get(tb).expect("reference gradient"))?;
                assert!(d < 1e-3, "{name} gradient {what}: {d}");
            }
            let eval = ours.forward_t(x.as_tensor(), false)?;
            assert!(max_diff(&eval, &theirs.fallback.forward_t(x.as_tensor(), false)?)? < 1e-5);
            assert!(ours_vm.data().lock().expect("varmap lock").contains_key("running_var"));
        }
        Ok(())
    }
}
