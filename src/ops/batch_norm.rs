//! BatchNorm with a fused CPU training kernel and backward pass.
//!
//! In training, Candle's `BatchNorm` runs a dozen tensor ops (transposes,
//! copies, reductions, broadcasts), each a full pass forward and more
//! backward; with a BN backbone that dominates a CPU training step. Here the
//! batch statistics are one parallel pass (in f64), the normalisation one
//! custom op, and its backward the closed form per channel over (n, h, w):
//!
//! - `dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))`,
//! - `dgamma = sum(dy * xhat)`, `dbeta = sum(dy)`.
//!
//! Running statistics update as in PyTorch (momentum, unbiased variance).
//! Evaluation, other devices and dtypes use Candle's `BatchNorm`.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, ModuleT, Result, Shape, Tensor, Var};
use candle_nn::{BatchNormConfig, Init, VarBuilder};
use rayon::prelude::*;

use super::f32_data;

#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// [channels]
    weight: Tensor,
    /// [channels]
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    fallback: candle_nn::BatchNorm,
}

/// `weight`, `bias`, `running_mean`, `running_var` under `vb`, initialised
/// like PyTorch (1, 0, 0, 1).
pub fn batch_norm(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<BatchNorm> {
    let get = |name, init| vb.get_with_hints(channels, name, Init::Const(init));
    let (weight, bias) = (get("weight", 1.0)?, get("bias", 0.0)?);
    // Var::from_tensor on a VarMap variable shares its storage.
    let running_mean = Var::from_tensor(&get("running_mean", 0.0)?)?;
    let running_var = Var::from_tensor(&get("running_var", 1.0)?)?;
    let cfg = BatchNormConfig { eps, momentum, ..Default::default() };
    let fallback = candle_nn::BatchNorm::new_with_momentum(
        channels,
        running_mean.as_tensor().clone(),
        running_var.as_tensor().clone(),
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
        if x.dtype() != self.weight.dtype() {
            // Mixed precision: normalise in f32, as torch.autocast does.
            return self.forward_t(&x.to_dtype(self.weight.dtype())?, train)?.to_dtype(x.dtype());
        }
        let fused = train
            && x.device().is_cpu()
            && x.rank() == 4
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3]
            && x.dim(1)? == self.weight.dim(0)?;
        if !fused {
            return self.fallback.forward_t(x, train);
        }
        let x = x.contiguous()?;
        let (n, c, h, w) = x.dims4()?;
        let count = n * h * w;
        if count < 2 {
            candle_core::bail!("batch norm: training needs more than one value per channel, got input {:?}", x.dims());
        }
        let (mean, var) = channel_stats(&x.detach().flatten_all()?.to_vec1::<f32>()?, c, h * w);
        self.update_running(&mean, &var, count)?;
        let rstd = var.iter().map(|v| (1.0 / (v + self.eps).sqrt()) as f32).collect();
        let mean = mean.iter().map(|&m| m as f32).collect();
        x.apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, BatchNormOp { mean, rstd })
    }
}

impl BatchNorm {
    /// `running = (1 - momentum) * running + momentum * batch`, with the
    /// unbiased batch variance.
    fn update_running(&self, mean: &[f64], var: &[f64], count: usize) -> Result<()> {
        let m = self.momentum;
        let unbias = count as f64 / (count - 1) as f64;
        let blend = |running: &Var, batch: Vec<f32>| -> Result<()> {
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

/// Per-channel mean and biased variance of a contiguous [n, c, plane] buffer.
fn channel_stats(x: &[f32], c: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    let count = (x.len() / c) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let values = || channel_planes(x, c, plane, ch).flatten();
            let mean = values().map(|&v| f64::from(v)).sum::<f64>() / count;
            let var = values().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / count;
            (mean, var)
        })
        .unzip()
}

/// Normalises with the batch statistics computed beforehand.
struct BatchNormOp {
    mean: Vec<f32>,
    rstd: Vec<f32>,
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
        let dims = xl.shape().dims();
        let (c, plane) = (dims[1], dims[2] * dims[3]);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(i, (y, x))| {
            let ch = i % c;
            let (m, g, b) = (self.mean[ch], gamma[ch] * self.rstd[ch], beta[ch]);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - m) * g + b;
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = x.dims().to_vec();
        let (c, plane) = (dims[1], dims[2] * dims[3]);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dy = grad.flatten_all()?.to_vec1::<f32>()?;
        let g = gamma.to_vec1::<f32>()?;
        let count = (xs.len() / c) as f64;
        // Per channel: sum(dy) and sum(dy * xhat).
        let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                channel_planes(&xs, c, plane, ch).zip(channel_planes(&dy, c, plane, ch)).fold(
                    (0f64, 0f64),
                    |(a, b), (x, dy)| {
                        x.iter().zip(dy).fold((a, b), |(a, b), (&x, &dy)| {
                            (a + f64::from(dy), b + f64::from(dy) * f64::from((x - m) * r))
                        })
                    },
                )
            })
            .unzip();
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(plane).zip(xs.par_chunks(plane).zip(dy.par_chunks(plane))).enumerate().for_each(
            |(i, (dx, (x, dy)))| {
                let ch = i % c;
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                let (mean_dy, mean_dy_xhat) = ((sum_dy[ch] / count) as f32, (sum_dy_xhat[ch] / count) as f32);
                let scale = g[ch] * r;
                for (dx, (&x, &dy)) in dx.iter_mut().zip(x.iter().zip(dy)) {
                    *dx = scale * (dy - mean_dy - (x - m) * r * mean_dy_xhat);
                }
            },
        );
        let to_tensor = |v: &[f64]| Tensor::from_vec(v.iter().map(|&v| v as f32).collect::<Vec<_>>(), c, &Device::Cpu);
        let dx = x.track_op().then(|| Tensor::from_vec(dx, dims.as_slice(), &Device::Cpu)).transpose()?;
        let dgamma = gamma.track_op().then(|| to_tensor(&sum_dy_xhat)).transpose()?;
        let dbeta = beta.track_op().then(|| to_tensor(&sum_dy)).transpose()?;
        Ok((dx, dgamma, dbeta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Outputs, gradients and running statistics equal Candle's BatchNorm in
    /// training mode; evaluation uses the running statistics.
    #[test]
    fn matches_candle_batch_norm() -> Result<()> {
        let dev = Device::Cpu;
        for (n, c, h, w) in [(2, 3, 5, 7), (4, 5, 1, 1), (1, 2, 3, 3)] {
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
            let y = ours.forward_t(x.as_tensor(), true)?;
            let reference = theirs.fallback.forward_t(x.as_tensor(), true)?;
            let what = format!("{n}x{c}x{h}x{w}");
            assert!(max_diff(&y, &reference)? < 1e-4, "forward {what}");
            for (a, b) in [(&ours.running_mean, &theirs.running_mean), (&ours.running_var, &theirs.running_var)] {
                assert!(max_diff(a.as_tensor(), b.as_tensor())? < 1e-5, "running statistics {what}");
            }
            let probe = Tensor::randn(0f32, 1., y.dims(), &dev)?;
            let a = (&y * &probe)?.sum_all()?.backward()?;
            let b = (&reference * &probe)?.sum_all()?.backward()?;
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
