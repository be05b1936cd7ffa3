//! ReLU, residual add + ReLU and per-channel bias with parallel CPU kernels
//! and one-pass backward passes.
//!
//! Candle's element-wise ops run on the calling thread here (see
//! `runtime.rs`), and its ReLU backward takes four passes (zeros, compare,
//! cast, multiply); at 480x640 these serial passes were about a fifth of a
//! training step. Each op here is one parallel pass forward and one
//! backward. Other devices and dtypes use Candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_data, f32_data_mut, written};

/// What errors call an argument of these ops.
const ARG: &str = "element-wise op argument";

/// Elements per parallel task: large enough that handing a task to another
/// thread costs little beside it. Smaller tensors stay on the calling
/// thread.
pub(super) const CHUNK: usize = 1 << 17;

/// The gradient reaching a norm's output when a ReLU may follow it in the
/// same op: `dy`, or 0 where that ReLU was closed (`y <= 0`).
#[inline(always)]
pub(super) fn through_relu(with_relu: bool, dy: f32, y: f32) -> f32 {
    if with_relu && y <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// `max(x, 0)`.
pub(crate) fn relu(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x]) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

/// `max(a + b, 0)` for tensors of one shape: a residual block's output.
pub(crate) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[a, b]) || a.dims() != b.dims() {
        return (a + b)?.relu();
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
}

/// [`add_relu`] on `fresh`, an output no one else holds (a residual
/// block's last convolution's, just made). Without a graph (inference) the
/// sum goes into `fresh`'s own buffer: one activation-sized buffer less per
/// block (69 MB for a ResNet-50 layer1 output at 800x1333).
pub(crate) fn add_relu_to_fresh(fresh: Tensor, other: &Tensor) -> Result<Tensor> {
    if !(writable_in_place(&fresh, other) && fresh.dims() == other.dims()) {
        return add_relu(&fresh, other);
    }
    fresh.inplace_op2(&other.contiguous()?, &AddRelu)?;
    Ok(fresh)
}

/// `x + bias[c]` for `x [n, c, h, w]` and `bias [c]`.
pub(crate) fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x, bias]) || x.rank() != 4 || bias.dims() != [x.dim(1)?] {
        return x.broadcast_add(&bias.reshape((1, (), 1, 1))?);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias { with_relu: false })
}

/// `max(x + bias[c], 0)` in one op (one graph node, one pass each way):
/// a convolution's bias and the ReLU after it.
pub(crate) fn add_channel_bias_relu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[x, bias]) || x.rank() != 4 || bias.dims() != [x.dim(1)?] {
        return relu(&add_channel_bias(x, bias)?);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias { with_relu: true })
}

/// [`add_channel_bias`] (or [`add_channel_bias_relu`] when `with_relu`) on
/// `fresh`, an output no one else holds (a convolution's, just made).
/// Without a graph (inference) the bias goes into `fresh`'s own buffer: one
/// activation-sized buffer less per convolution (69 MB for a ResNet-50
/// layer1 output at 800x1333).
pub(crate) fn add_channel_bias_to_fresh(fresh: Tensor, bias: &Tensor, with_relu: bool) -> Result<Tensor> {
    let in_place = writable_in_place(&fresh, bias) && fresh.rank() == 4 && bias.dims() == [fresh.dim(1)?];
    match (in_place, with_relu) {
        (true, _) => {
            fresh.inplace_op2(&bias.contiguous()?, &ChannelBias { with_relu })?;
            Ok(fresh)
        }
        (false, false) => add_channel_bias(&fresh, bias),
        (false, true) => add_channel_bias_relu(&fresh, bias),
    }
}

/// Whether an op on `fresh` and `other` may write into `fresh`'s buffer:
/// f32 on the CPU, `fresh` contiguous, and neither in a graph (inference),
/// so no backward pass needs `fresh`'s old values.
fn writable_in_place(fresh: &Tensor, other: &Tensor) -> bool {
    is_cpu_f32(&[fresh, other]) && !fresh.track_op() && !other.track_op() && fresh.is_contiguous()
}

fn is_cpu_f32(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// Calls `f(index, chunk)` on each `size`-element chunk of `out`: on every
/// thread when the op touches more than [`CHUNK`] elements in all, else on
/// this one.
pub(super) fn for_each_chunk(out: &mut [f32], size: usize, touched: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if touched <= CHUNK {
        out.chunks_mut(size).enumerate().for_each(|(i, chunk)| f(i, chunk));
    } else {
        out.par_chunks_mut(size).enumerate().for_each(|(i, chunk)| f(i, chunk));
    }
}

/// `out[i] = f(a[i], b[i])`.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    written(a.len(), CHUNK, |i| a[i * CHUNK..].iter().zip(&b[i * CHUNK..]).map(|(&a, &b)| f(a, b)))
}

/// `grad * (y > 0)`: the gradient through a ReLU whose output is `y`.
fn relu_grad(grad: &Tensor, y: &Tensor) -> Result<Tensor> {
    grad.contiguous()?.apply_op2_no_bwd(y, &MaskByOutput)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-par"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, ARG)?;
        let out = written(x.len(), CHUNK, |i| x[i * CHUNK..].iter().map(|&x| x.max(0.0)));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        relu_grad(grad, y).map(Some)
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu-par"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = zip_map(f32_data(s1, l1, ARG)?, f32_data(s2, l2, ARG)?, |a, b| (a + b).max(0.0));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let masked = relu_grad(grad, y)?;
        Ok((Some(masked.clone()), Some(masked)))
    }
}

/// The same op in the first argument's buffer (no backward: inference).
impl InplaceOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let other = f32_data(s2, l2, ARG)?;
        let x = f32_data_mut(s1, l1, ARG)?;
        let len = x.len();
        for_each_chunk(x, CHUNK, len, |i, o| {
            for (o, &b) in o.iter_mut().zip(&other[i * CHUNK..]) {
                *o = (*o + b).max(0.0);
            }
        });
        Ok(())
    }
}

/// Arguments `grad`, `y`: `grad * (y > 0)`.
struct MaskByOutput;

impl CustomOp2 for MaskByOutput {
    fn name(&self) -> &'static str {
        "relu-grad-par"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = zip_map(f32_data(s1, l1, ARG)?, f32_data(s2, l2, ARG)?, |g, y| if y > 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + bias[c]`, then a ReLU when `with_relu`.
struct ChannelBias {
    with_relu: bool,
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        if self.with_relu {
            "channel-bias-relu-par"
        } else {
            "channel-bias-par"
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (f32_data(s1, l1, ARG)?, f32_data(s2, l2, ARG)?);
        let plane = l1.shape().dims()[2..].iter().product::<usize>().max(1);
        let floor = self.floor();
        let out = written(x.len(), plane, |i| {
            let b = bias[i % bias.len()];
            x[i * plane..].iter().map(move |&x| (x + b).max(floor))
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, bias: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (grad, dbias) = channel_bias_grads(self.with_relu, bias, y, grad)?;
        Ok((Some(grad), dbias))
    }
}

/// The gradient before `y = max(x + bias[c], floor)` (`with_relu`: floor
/// 0) from the output `y` and its gradient, and the bias's gradient (the
/// sum of that over each channel) where `bias` takes one.
pub(crate) fn channel_bias_grads(
    with_relu: bool,
    bias: &Tensor,
    y: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let grad = if with_relu { relu_grad(grad, y)? } else { grad.clone() };
    let dbias = bias.track_op().then(|| grad.contiguous()?.apply_op1_no_bwd(&ChannelSum)).transpose()?;
    Ok((grad, dbias))
}

/// `x [.., plane]` += `bias[c]` for each plane of channel `c`, then
/// `max(., 0)` when `with_relu`, in place (parallel for large `x`).
pub(crate) fn add_channel_bias_in_place(x: &mut [f32], bias: &[f32], plane: usize, with_relu: bool) {
    let floor = if with_relu { 0.0 } else { f32::NEG_INFINITY };
    let len = x.len();
    for_each_chunk(x, plane.max(1), len, |i, o| {
        let b = bias[i % bias.len()];
        o.iter_mut().for_each(|o| *o = (*o + b).max(floor));
    });
}

impl ChannelBias {
    /// The least output value: 0 after a ReLU.
    fn floor(&self) -> f32 {
        if self.with_relu {
            0.0
        } else {
            f32::NEG_INFINITY
        }
    }
}

/// The same op in the first argument's buffer (no backward: inference).
impl InplaceOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias-in-place"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let bias = f32_data(s2, l2, ARG)?;
        let plane = l1.shape().dims()[2..].iter().product::<usize>();
        add_channel_bias_in_place(f32_data_mut(s1, l1, ARG)?, bias, plane, self.with_relu);
        Ok(())
    }
}

/// `[n, c, h, w] -> [c]`: the sum of each channel, in f64.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum-par"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let grad = f32_data(s, l, ARG)?;
        let dims = l.shape().dims();
        let (n, c) = (dims[0], dims[1]);
        let plane = dims[2..].iter().product::<usize>();
        let mut sums = vec![0f32; c];
        for_each_chunk(&mut sums, 1, grad.len(), |ch, sum| {
            let planes = (0..n).map(|i| &grad[(i * c + ch) * plane..][..plane]);
            sum[0] = planes.map(|p| p.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() as f32;
        });
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{max_diff, probed_gradients};
    use candle_core::{Device, Var};

    /// Each op and its gradients equal Candle's ops on the same values.
    #[test]
    fn matches_candle_ops_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 7), &dev)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1., 3, &dev)?)?;
        let ours = [
            relu(a.as_tensor())?,
            add_relu(a.as_tensor(), b.as_tensor())?,
            add_channel_bias(a.as_tensor(), bias.as_tensor())?,
            add_channel_bias_relu(a.as_tensor(), bias.as_tensor())?,
        ];
        let theirs = [
            a.as_tensor().relu()?,
            (a.as_tensor() + b.as_tensor())?.relu()?,
            a.as_tensor().broadcast_add(&bias.as_tensor().reshape((1, 3, 1, 1))?)?,
            a.as_tensor().broadcast_add(&bias.as_tensor().reshape((1, 3, 1, 1))?)?.relu()?,
        ];
        for (i, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
            let diff = max_diff(ours, theirs)?;
            assert!(diff < 1e-6, "op {i}: forward differs by {diff}");
            let (g_ours, g_theirs) = probed_gradients(ours, theirs)?;
            for var in [&a, &b, &bias] {
                match (g_ours.get(var.as_tensor()), g_theirs.get(var.as_tensor())) {
                    (Some(x), Some(y)) => {
                        let diff = max_diff(x, y)?;
                        assert!(diff < 1e-5, "op {i}: gradient differs by {diff}");
                    }
                    (None, None) => {}
                    _ => panic!("op {i}: a gradient on one side only"),
                }
            }
        }
        Ok(())
    }

    /// Without a graph, the bias (and ReLU) go into the output's own buffer,
    /// with the same values; with one, the op keeps its backward.
    #[test]
    fn bias_in_place_without_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let bias = Tensor::randn(0f32, 1., 3, &dev)?;
        for with_relu in [false, true] {
            let fresh = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
            let expected = fresh.broadcast_add(&bias.reshape((1, 3, 1, 1))?)?;
            let expected = if with_relu { expected.relu()? } else { expected };
            let y = add_channel_bias_to_fresh(fresh.clone(), &bias, with_relu)?;
            assert_eq!(max_diff(&y, &expected)?, 0.0);
            assert_eq!(max_diff(&fresh, &expected)?, 0.0, "not in place");
            let tracked = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?)?;
            let before = tracked.as_tensor().copy()?;
            let y = add_channel_bias_to_fresh(tracked.as_tensor().clone(), &bias, with_relu)?;
            assert!(y.track_op());
            assert_eq!(max_diff(tracked.as_tensor(), &before)?, 0.0, "a graph's tensor changed");
        }
        Ok(())
    }

    #[test]
    fn residual_add_in_place_without_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let other = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        let fresh = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?;
        let expected = (&fresh + &other)?.relu()?;
        let y = add_relu_to_fresh(fresh.clone(), &other)?;
        assert_eq!(max_diff(&y, &expected)?, 0.0);
        assert_eq!(max_diff(&fresh, &expected)?, 0.0, "not in place");
        let tracked = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev)?)?;
        let before = tracked.as_tensor().copy()?;
        let y = add_relu_to_fresh(tracked.as_tensor().clone(), &other)?;
        assert!(y.track_op());
        assert_eq!(max_diff(tracked.as_tensor(), &before)?, 0.0, "a graph's tensor changed");
        Ok(())
    }
}
