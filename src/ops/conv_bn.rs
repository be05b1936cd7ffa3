//! A convolution and the training-mode BatchNorm after it as one graph
//! node on the CPU. As two nodes, Candle's backward pass kept a gradient
//! for the convolution's output and filled it the way it fills every
//! node's: a zeroed buffer, then an add of the BatchNorm's input gradient,
//! both on one thread. Those fills took 19% of the main thread's samples
//! in the `bccd` recipe's backward pass, 14% with the convolutions fused,
//! and the backward pass went from 1.30-1.34 s to 1.27-1.28 (BENCHMARKS.md,
//! 2026-12-03, Intel). Fused, the BatchNorm's input gradient goes straight
//! into the convolution's backward.
//!
//! The forward computes the convolution (`conv.rs`), the batch statistics
//! and the normalisation (`batch_norm.rs`), and keeps the convolution's
//! output and the statistics for the backward, as the two nodes kept
//! them; the values are the two ops' to the bit.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};

use super::batch_norm::{channel_stats, BatchNorm, BatchNormOp};
use super::conv::{self, Conv2d, Geometry};
use super::{f32_data, zeroed};

/// `bn(conv(x))` (then a ReLU when `with_relu`): one op where the CPU
/// trains in f32, else the two modules one after the other.
pub(crate) fn conv_batch_norm(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: &Tensor,
    train: bool,
    with_relu: bool,
) -> Result<Tensor> {
    let plain = conv.plain().filter(|(weight, _, _)| train && fusable(x, weight, bn));
    let geometry = match plain {
        Some((weight, padding, stride)) => Some(Geometry::new(x.dims4()?, weight.dims4()?, padding, stride)?),
        None => None,
    };
    let (Some((weight, _, _)), Some(geometry)) = (plain, geometry.filter(|g| g.n * g.out_plane() >= 2)) else {
        return bn.forward_maybe_relu(&conv.forward(x)?, train, with_relu);
    };
    let params = Tensor::stack(&[bn.weight(), bn.bias()], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvBatchNorm { geometry, eps: bn.eps(), with_relu, saved: saved.clone() };
    let y = x.contiguous()?.apply_op3(&weight.contiguous()?, &params, op)?;
    let guard = saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm: state poisoned".into()))?;
    let Some(saved) = guard.as_ref() else {
        candle_core::bail!("conv-batch-norm: the forward left no statistics");
    };
    bn.update_running(&saved.mean, &saved.var, geometry.n * geometry.out_plane())?;
    Ok(y)
}

/// f32 on the CPU, with as many norm channels as output channels.
fn fusable(x: &Tensor, weight: &Tensor, bn: &BatchNorm) -> bool {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    [x, weight, bn.weight(), bn.bias()].into_iter().all(f32_cpu)
        && x.rank() == 4
        && weight.rank() == 4
        && weight.dim(0).ok() == bn.weight().dim(0).ok()
}

/// What the forward leaves the backward and the running statistics.
struct Saved {
    /// [n, c_out, out_h, out_w]: the convolution's output (the norm's input).
    conv_out: Tensor,
    /// The normalisation with the batch statistics.
    norm: BatchNormOp,
    /// Per channel, in f64.
    mean: Vec<f64>,
    var: Vec<f64>,
}

/// Arguments `x [n, c, h, w]`, `w [c_out, c, k, k]`, `params [2, c_out]`
/// (the norm's weight, then its bias).
struct ConvBatchNorm {
    geometry: Geometry,
    eps: f64,
    with_relu: bool,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for ConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv2d-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let (x, w) = (f32_data(xs, xl, "conv2d input")?, f32_data(ws, wl, "conv2d weight")?);
        let params = f32_data(ps, pl, "batch norm weight and bias")?;
        let (c, plane) = (g.c_out, g.out_plane());
        let mut conv_out = zeroed(g.n * c * plane);
        conv::forward(g, x, w, &mut conv_out);
        let [mean, var] = channel_stats(&conv_out, c, plane);
        let norm = BatchNormOp::new(&mean, &var, self.eps, self.with_relu);
        let out = norm.normalize(&conv_out, (c, plane), &params[..c], &params[c..]);
        let shape = Shape::from((g.n, c, g.out_h, g.out_w));
        let conv_out = Tensor::from_vec(conv_out, shape.clone(), &Device::Cpu)?;
        let mut saved = self.saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm: poisoned".into()))?;
        *saved = Some(Saved { conv_out, norm, mean, var });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        params: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm: poisoned".into()))?;
        let Some(saved) = saved.as_ref() else {
            candle_core::bail!("conv-batch-norm: backward before forward");
        };
        let (gamma, train_params) = (params.get(0)?, params.track_op());
        let wanted = [true, train_params, train_params];
        let (d_conv_out, dgamma, dbeta) = saved.norm.grads(&saved.conv_out, &gamma, y, grad, wanted)?;
        let Some(d_conv_out) = d_conv_out else {
            candle_core::bail!("conv-batch-norm: no gradient for the convolution's output");
        };
        let (dx, dw) = conv::backward(self.geometry, x, w, &d_conv_out)?;
        let dparams = match (dgamma, dbeta) {
            (Some(dgamma), Some(dbeta)) => Some(Tensor::stack(&[dgamma, dbeta], 0)?),
            _ => None,
        };
        Ok((dx, dw, dparams))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Var;
    use candle_nn::{VarBuilder, VarMap};

    use super::*;
    use crate::ops::batch_norm::batch_norm;
    use crate::ops::testing::probed_gradients;

    /// The fused op against the convolution and the BatchNorm as two ops:
    /// the same output, gradients (input, weight, norm weight and bias)
    /// and running statistics, to the bit; with and without the ReLU, at
    /// stride 1 and 2, and for an input without a gradient (the stem's).
    #[test]
    fn matches_the_two_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (stride, with_relu, input_grad) in [(1, false, true), (1, true, true), (2, true, true), (1, true, false)] {
            let x = Tensor::randn(0f32, 1., (2, 6, 9, 11), &dev)?;
            let x = if input_grad { Var::from_tensor(&x)?.as_tensor().clone() } else { x };
            let weight = Var::from_tensor(&Tensor::randn(0f32, 0.3, (5, 6, 3, 3), &dev)?)?;
            let conv = Conv2d::new(weight.as_tensor().clone(), None, 1, stride);
            let build = || -> Result<(VarMap, BatchNorm)> {
                let vm = VarMap::new();
                let bn = batch_norm(5, 1e-5, 0.1, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
                Var::from_tensor(bn.weight())?.set(&Tensor::randn(1f32, 0.3, 5, &dev)?)?;
                Ok((vm, bn))
            };
            let ((fused_vm, fused_bn), (two_vm, two_bn)) = (build()?, build()?);
            Var::from_tensor(two_bn.weight())?.set(fused_bn.weight())?;
            let fused = conv_batch_norm(&conv, &fused_bn, &x, true, with_relu)?;
            let two = two_bn.forward_maybe_relu(&conv.forward(&x)?, true, with_relu)?;
            let what = format!("stride {stride}, relu {with_relu}, input gradient {input_grad}");
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            assert_eq!(bits(&fused)?, bits(&two)?, "output, {what}");
            let (a, b) = probed_gradients(&fused, &two)?;
            let pairs = [
                (weight.as_tensor(), weight.as_tensor(), "weight"),
                (fused_bn.weight(), two_bn.weight(), "norm weight"),
                (fused_bn.bias(), two_bn.bias(), "norm bias"),
            ];
            for (ours, theirs, name) in pairs {
                let (ours, theirs) = (a.get(ours).expect("gradient"), b.get(theirs).expect("reference gradient"));
                assert_eq!(bits(ours)?, bits(theirs)?, "{name} gradient, {what}");
            }
            match input_grad {
                true => assert_eq!(
                    bits(a.get(&x).expect("input gradient"))?,
                    bits(b.get(&x).expect("reference"))?,
                    "input gradient, {what}"
                ),
                false => assert!(a.get(&x).is_none(), "a gradient for a constant input, {what}"),
            }
            let fused_vars = fused_vm.data().lock().expect("varmap").clone();
            for name in ["running_mean", "running_var"] {
                let reference = two_vm.data().lock().expect("varmap")[name].as_tensor().clone();
                assert_eq!(bits(fused_vars[name].as_tensor())?, bits(&reference)?, "{name}, {what}");
            }
        }
        Ok(())
    }
}
