//! A convolution and the norm after it (BatchNorm in training, or
//! GroupNorm), with the ReLU that often follows, as one graph node on the
//! CPU. As two nodes, Candle's backward pass kept a gradient for the
//! convolution's output and filled it the way it fills every node's: a
//! zeroed buffer, then an add of the norm's input gradient, both on one
//! thread. Those fills took 19% of the main thread's samples in the
//! `bccd` recipe's backward pass, 14% with the backbone's convolutions
//! fused, and the backward pass went from 1.30-1.34 s to 1.27-1.28
//! (BENCHMARKS.md, 2026-12-03, Intel). Fused, the norm's input gradient
//! goes straight into the convolution's backward.
//!
//! The forward computes the convolution (`conv.rs`) and the norm
//! (`batch_norm.rs`, `group_norm.rs`), and keeps the convolution's output
//! (and BatchNorm's batch statistics) for the backward, as the two nodes
//! kept them; the values are the two ops' to the bit.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};

use super::batch_norm::{channel_stats, BatchNorm, BatchNormOp};
use super::conv::{self, Conv2d, Geometry};
use super::group_norm::{GroupNorm, GroupNormOp};
use super::{f32_data, uninit};

/// `bn(conv(x))` (then a ReLU when `with_relu`): one op where the CPU
/// trains in f32, else the two modules one after the other.
pub(crate) fn conv_batch_norm(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: &Tensor,
    train: bool,
    with_relu: bool,
) -> Result<Tensor> {
    let norm = Norm::Batch { eps: bn.eps(), with_relu };
    let Some((y, saved)) = fused(conv, x, [bn.weight(), bn.bias()], norm, train)? else {
        return bn.forward_maybe_relu(&conv.forward(x)?, train, with_relu);
    };
    if let Some(Saved { applied: Applied::Batch { mean, var, .. }, .. }) = lock(&saved)?.as_ref() {
        bn.update_running(mean, var, x.dim(0)? * y.dim(2)? * y.dim(3)?)?;
    }
    Ok(y)
}

/// `gn(conv(x))` (then a ReLU when `with_relu`): one op where the CPU
/// differentiates in f32, else the two modules one after the other.
pub(crate) fn conv_group_norm(conv: &Conv2d, gn: &GroupNorm, x: &Tensor, with_relu: bool) -> Result<Tensor> {
    let differentiated = x.track_op() || conv.plain().is_some_and(|(w, _, _)| w.track_op());
    let norm = Norm::Group(gn.op(with_relu));
    match fused(conv, x, [gn.weight(), gn.bias()], norm, differentiated)? {
        Some((y, _)) => Ok(y),
        None => gn.forward_maybe_relu(&conv.forward(x)?, with_relu),
    }
}

/// The fused op's output and what it saved, when `wanted` and the tensors
/// allow it: f32 on the CPU, a convolution without bias, as many norm
/// channels as output channels, more than one value per BatchNorm channel.
fn fused(
    conv: &Conv2d,
    x: &Tensor,
    [gamma, beta]: [&Tensor; 2],
    norm: Norm,
    wanted: bool,
) -> Result<Option<(Tensor, SharedState)>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let Some((weight, padding, stride)) = conv.plain() else {
        return Ok(None);
    };
    let tensors_fit = [x, weight, gamma, beta].into_iter().all(f32_cpu)
        && x.rank() == 4
        && weight.rank() == 4
        && weight.dim(0).ok() == gamma.dim(0).ok();
    if !(wanted && tensors_fit) {
        return Ok(None);
    }
    let geometry = Geometry::new(x.dims4()?, weight.dims4()?, padding, stride)?;
    if matches!(norm, Norm::Batch { .. }) && geometry.n * geometry.out_plane() < 2 {
        return Ok(None);
    }
    let params = Tensor::stack(&[gamma, beta], 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = ConvNorm { geometry, norm, saved: saved.clone() };
    Ok(Some((x.contiguous()?.apply_op3(&weight.contiguous()?, &params, op)?, saved)))
}

/// The op's [`Saved`], shared with the caller (BatchNorm's running
/// statistics are updated from it after the forward).
type SharedState = Arc<Mutex<Option<Saved>>>;

fn lock(saved: &Mutex<Option<Saved>>) -> Result<std::sync::MutexGuard<'_, Option<Saved>>> {
    saved.lock().map_err(|_| candle_core::Error::Msg("conv-norm: state poisoned".into()))
}

/// The norm the fused op applies to the convolution's output.
enum Norm {
    /// BatchNorm with the batch's statistics.
    Batch {
        eps: f64,
        with_relu: bool,
    },
    Group(GroupNormOp),
}

/// The norm as applied, for the backward.
enum Applied {
    /// The normalisation with the batch statistics, and those statistics
    /// per channel in f64 (for the running ones).
    Batch {
        op: BatchNormOp,
        mean: Vec<f64>,
        var: Vec<f64>,
    },
    Group(GroupNormOp),
}

/// What the forward leaves the backward.
struct Saved {
    /// [n, c_out, out_h, out_w]: the convolution's output (the norm's input).
    conv_out: Tensor,
    applied: Applied,
}

/// Arguments `x [n, c, h, w]`, `w [c_out, c, k, k]`, `params [2, c_out]`
/// (the norm's weight, then its bias).
struct ConvNorm {
    geometry: Geometry,
    norm: Norm,
    saved: SharedState,
}

impl CustomOp3 for ConvNorm {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Batch { .. } => "conv2d-batch-norm-train",
            Norm::Group(_) => "conv2d-group-norm",
        }
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
        let params = f32_data(ps, pl, "norm weight and bias")?;
        let (c, plane) = (g.c_out, g.out_plane());
        // SAFETY: `conv::forward` writes every output value without reading
        // one (checked by its tests' `forward_writes_every_output_and_reads_none`).
        let mut conv_out = unsafe { uninit(g.n * c * plane) };
        conv::forward(g, x, w, &mut conv_out);
        let (gamma, beta) = params.split_at(c);
        let (out, applied) = match &self.norm {
            Norm::Batch { eps, with_relu } => {
                let [mean, var] = channel_stats(&conv_out, c, plane);
                let op = BatchNormOp::new(&mean, &var, *eps, *with_relu);
                (op.normalize(&conv_out, (c, plane), gamma, beta), Applied::Batch { op, mean, var })
            }
            Norm::Group(op) => {
                (op.normalize(&conv_out, &[g.n, c, g.out_h, g.out_w], gamma, beta)?, Applied::Group(*op))
            }
        };
        let shape = Shape::from((g.n, c, g.out_h, g.out_w));
        let conv_out = Tensor::from_vec(conv_out, shape.clone(), &Device::Cpu)?;
        *lock(&self.saved)? = Some(Saved { conv_out, applied });
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
        let saved = lock(&self.saved)?;
        let Some(Saved { conv_out, applied }) = saved.as_ref() else {
            candle_core::bail!("conv-norm: backward before forward");
        };
        let (gamma, train_params) = (params.get(0)?, params.track_op());
        let wanted = [true, train_params, train_params];
        let (d_conv_out, dgamma, dbeta) = match applied {
            Applied::Batch { op, .. } => op.grads(conv_out, &gamma, y, grad, wanted)?,
            Applied::Group(op) => op.grads(conv_out, &gamma, y, grad, wanted)?,
        };
        let Some(d_conv_out) = d_conv_out else {
            candle_core::bail!("conv-norm: no gradient for the convolution's output");
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
    use crate::ops::group_norm::group_norm;
    use crate::ops::testing::probed_gradients;

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// The fused op against the convolution and the norm as two ops: the
    /// same output, gradients (input, weight, norm weight and bias) and
    /// BatchNorm running statistics, to the bit; BatchNorm and GroupNorm
    /// (4 groups of 2), with and without the ReLU, at stride 1 and 2, and
    /// for an input without a gradient (the stem's).
    #[test]
    fn matches_the_two_ops() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [(1, false, true), (1, true, true), (2, true, true), (1, true, false)];
        for (group, (stride, with_relu, input_grad)) in [false, true].into_iter().flat_map(|g| cases.map(|c| (g, c))) {
            let x = Tensor::randn(0f32, 1., (2, 6, 9, 11), &dev)?;
            let x = if input_grad { Var::from_tensor(&x)?.as_tensor().clone() } else { x };
            let weight = Var::from_tensor(&Tensor::randn(0f32, 0.3, (8, 6, 3, 3), &dev)?)?;
            let conv = Conv2d::new(weight.as_tensor().clone(), None, 1, stride);
            let gamma = Tensor::randn(1f32, 0.3, 8, &dev)?;
            let (fused_vm, two_vm) = (VarMap::new(), VarMap::new());
            let vb = |vm: &VarMap| VarBuilder::from_varmap(vm, DType::F32, &dev);
            let (fused, two) = match group {
                false => {
                    let (ours, theirs) =
                        (batch_norm(8, 1e-5, 0.1, vb(&fused_vm))?, batch_norm(8, 1e-5, 0.1, vb(&two_vm))?);
                    for bn in [&ours, &theirs] {
                        Var::from_tensor(bn.weight())?.set(&gamma)?;
                    }
                    let fused = conv_batch_norm(&conv, &ours, &x, true, with_relu)?;
                    (fused, theirs.forward_maybe_relu(&conv.forward(&x)?, true, with_relu)?)
                }
                true => {
                    let (ours, theirs) = (group_norm(4, 8, 1e-5, vb(&fused_vm))?, group_norm(4, 8, 1e-5, vb(&two_vm))?);
                    for gn in [&ours, &theirs] {
                        Var::from_tensor(gn.weight())?.set(&gamma)?;
                    }
                    let fused = conv_group_norm(&conv, &ours, &x, with_relu)?;
                    (fused, theirs.forward_maybe_relu(&conv.forward(&x)?, with_relu)?)
                }
            };
            let what = format!("group norm {group}, stride {stride}, relu {with_relu}, input gradient {input_grad}");
            assert_eq!(bits(&fused)?, bits(&two)?, "output, {what}");
            let (a, b) = probed_gradients(&fused, &two)?;
            let (ours, theirs) =
                (fused_vm.data().lock().expect("varmap").clone(), two_vm.data().lock().expect("varmap").clone());
            assert_eq!(
                bits(a.get(weight.as_tensor()).expect("gradient"))?,
                bits(b.get(weight.as_tensor()).expect("reference"))?,
                "weight gradient, {what}"
            );
            for name in ["weight", "bias"] {
                let (da, db) = (
                    a.get(ours[name].as_tensor()).expect("gradient"),
                    b.get(theirs[name].as_tensor()).expect("reference"),
                );
                assert_eq!(bits(da)?, bits(db)?, "norm {name} gradient, {what}");
            }
            match input_grad {
                true => assert_eq!(
                    bits(a.get(&x).expect("input gradient"))?,
                    bits(b.get(&x).expect("reference"))?,
                    "input gradient, {what}"
                ),
                false => assert!(a.get(&x).is_none(), "a gradient for a constant input, {what}"),
            }
            for name in ["running_mean", "running_var"].into_iter().filter(|_| !group) {
                assert_eq!(bits(ours[name].as_tensor())?, bits(theirs[name].as_tensor())?, "{name}, {what}");
            }
        }
        Ok(())
    }
}
