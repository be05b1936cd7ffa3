//! A 2D convolution with a fast backward pass on the CPU, and a backward
//! that works for every input size elsewhere.
//!
//! - CPU, gradients needed: the values come from Candle's forward; the
//!   gradients from a custom op doing im2col + GEMM per image
//!   (`grad_w += grad_y · cols^T`, `grad_x = col2im(W^T · grad_y)`), several
//!   times faster than Candle's `conv_transpose2d` loop.
//! - Other devices: Candle's conv2d backward derives `conv_transpose2d`'s
//!   output padding from the height alone, so a strided conv whose height and
//!   width leave different remainders `(n + 2p - k) % stride` fails with a
//!   shape mismatch (e.g. FPN P6 -> P7 on a 2x3 map). Strided convolutions pad
//!   explicitly there: `padding` zeros before, and after just enough to leave
//!   no remainder (cropping rows the kernel never reads), then run unpadded.
//!
//! A 1x1 stride-1 convolution runs as a matrix product, about twice as fast
//! as Candle's im2col path on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Conv2d {
    /// [c_out, c_in, k, k]
    weight: Tensor,
    /// [c_out]
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Self {
        Self {
            weight,
            bias,
            padding,
            stride,
        }
    }

    /// Pads `dim` explicitly so that the kernel exactly fits the strides.
    fn pad_exact(&self, x: &Tensor, dim: usize, kernel: usize) -> Result<Tensor> {
        let n = x.dim(dim)?;
        let p = self.padding;
        if n + 2 * p < kernel {
            candle_core::bail!(
                "conv2d: input size {n} is smaller than the kernel {kernel} with padding {p}"
            );
        }
        let remainder = (n + 2 * p - kernel) % self.stride;
        x.pad_with_zeros(dim, p, p)?
            .narrow(dim, 0, n + 2 * p - remainder)
    }

    /// The convolution through Candle's ops (differentiable on any device).
    fn conv(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if (kh, kw, self.stride, self.padding) == (1, 1, 1, 0) {
            let (n, _, h, w) = x.dims4()?;
            let x = x.reshape((n, c_in, h * w))?; // [n, c_in, h*w]
            weight
                .reshape((1, c_out, c_in))?
                .broadcast_matmul(&x)?
                .reshape((n, c_out, h, w))
        } else if self.stride == 1 {
            x.conv2d(weight, self.padding, 1, 1, 1)
        } else {
            let x = self.pad_exact(&self.pad_exact(x, 2, kh)?, 3, kw)?;
            x.conv2d(weight, 0, self.stride, 1, 1)
        }
    }
}

impl Module for Conv2d {
    /// [n, c_in, h, w] -> [n, c_out, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cpu_grad = x.device().is_cpu()
            && x.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && (x.track_op() || self.weight.track_op());
        let y = if cpu_grad {
            let values = self.conv(&x.detach(), &self.weight.detach())?;
            x.apply_op3(
                &self.weight,
                &values,
                Im2colBackward {
                    padding: self.padding,
                    stride: self.stride,
                },
            )?
        } else {
            self.conv(x, &self.weight)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Geometry of one convolution over one image.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c_in: usize,
    h: usize,
    w: usize,
    k: (usize, usize),
    out: (usize, usize),
    padding: usize,
    stride: usize,
}

impl Geometry {
    /// Outputs `o` whose tap `k` reads inside `0..size`: `o * stride + k - padding`
    /// in range, as a half-open range of `o` within `0..out`.
    fn valid(&self, k: usize, size: usize, out: usize) -> std::ops::Range<usize> {
        let s = self.stride;
        let lo = self.padding.saturating_sub(k).div_ceil(s);
        // o * s + k - p < size  <=>  o * s < size + p - k
        let hi = (size + self.padding).saturating_sub(k).div_ceil(s).min(out);
        lo..hi.max(lo)
    }

    /// For tap (ky, kx), calls `f(oy * ow, input offset of the first read,
    /// ox range)` for each output row whose reads fall inside the image;
    /// consecutive `ox` read every `stride`-th input element.
    fn for_each_run(
        &self,
        ky: usize,
        kx: usize,
        mut f: impl FnMut(usize, usize, std::ops::Range<usize>),
    ) {
        let (oh, ow) = self.out;
        let cols = self.valid(kx, self.w, ow);
        if cols.is_empty() {
            return;
        }
        for oy in self.valid(ky, self.h, oh) {
            let y = oy * self.stride + ky - self.padding;
            let x0 = (cols.start * self.stride + kx).saturating_sub(self.padding);
            f(oy * ow, y * self.w + x0, cols.clone());
        }
    }

    /// [c_in, h, w] -> columns [c_in * kh * kw, oh * ow], zero where the
    /// kernel reads padding. Parallel over column rows.
    fn im2col(&self, x: &[f32]) -> Vec<f32> {
        let (oh, ow) = self.out;
        let (kh, kw) = self.k;
        let mut cols = vec![0f32; self.c_in * kh * kw * oh * ow];
        cols.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(row, dst)| {
                let (c, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
                let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
                self.for_each_run(ky, kx, |out, src, range| {
                    let dst = &mut dst[out + range.start..out + range.end];
                    if self.stride == 1 {
                        dst.copy_from_slice(&plane[src..src + dst.len()]);
                    } else {
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = plane[src + i * self.stride];
                        }
                    }
                });
            });
        cols
    }

    /// Adds columns [c_in * kh * kw, oh * ow] back onto [c_in, h, w].
    /// Parallel over channels (each channel's taps write only its plane).
    fn col2im_add(&self, cols: &[f32], x: &mut [f32]) {
        let (oh, ow) = self.out;
        let (kh, kw) = self.k;
        x.par_chunks_mut(self.h * self.w)
            .enumerate()
            .for_each(|(c, plane)| {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = (c * kh + ky) * kw + kx;
                        let src_row = &cols[row * oh * ow..(row + 1) * oh * ow];
                        self.for_each_run(ky, kx, |out, dst, range| {
                            let src = &src_row[out + range.start..out + range.end];
                            for (i, v) in src.iter().enumerate() {
                                plane[dst + i * self.stride] += v;
                            }
                        });
                    }
                }
            });
    }
}

/// Passes the forward values (third argument) through and computes the
/// input and weight gradients by im2col + GEMM, one image at a time.
struct Im2colBackward {
    padding: usize,
    stride: usize,
}

impl CustomOp3 for Im2colBackward {
    fn name(&self) -> &'static str {
        "conv2d-im2col-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        values: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = values else {
            candle_core::bail!(
                "{}: expected f32 values, got {:?}",
                self.name(),
                values.dtype()
            );
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: expected contiguous values", self.name());
        };
        Ok((
            CpuStorage::F32(data[start..end].to_vec()),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c_in, h, w) = x.dims4()?;
        let (c_out, _, kh, kw) = weight.dims4()?;
        let (_, _, oh, ow) = grad.dims4()?;
        let geo = Geometry {
            c_in,
            h,
            w,
            k: (kh, kw),
            out: (oh, ow),
            padding: self.padding,
            stride: self.stride,
        };
        let taps = c_in * kh * kw;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let grad = grad.contiguous()?;
        let w_t = weight.reshape((c_out, taps))?.t()?; // [taps, c_out]
        let mut grad_w = Tensor::zeros((c_out, taps), DType::F32, &Device::Cpu)?;
        let mut grad_x = vec![0f32; xs.len()];
        for i in 0..n {
            let g = grad.get(i)?.reshape((c_out, oh * ow))?; // [c_out, oh*ow]
            if weight.track_op() {
                let cols = geo.im2col(&xs[i * c_in * h * w..(i + 1) * c_in * h * w]);
                let cols = Tensor::from_vec(cols, (taps, oh * ow), &Device::Cpu)?;
                grad_w = (grad_w + g.matmul(&cols.t()?)?)?;
            }
            if x.track_op() {
                let grad_cols = w_t.matmul(&g)?.flatten_all()?.to_vec1::<f32>()?; // [taps, oh*ow]
                geo.col2im_add(
                    &grad_cols,
                    &mut grad_x[i * c_in * h * w..(i + 1) * c_in * h * w],
                );
            }
        }
        let grad_x = match x.track_op() {
            true => Some(Tensor::from_vec(grad_x, (n, c_in, h, w), &Device::Cpu)?),
            false => None,
        };
        let grad_w = match weight.track_op() {
            true => Some(grad_w.reshape(weight.shape())?),
            false => None,
        };
        Ok((grad_x, grad_w, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    const CASES: [(usize, usize, usize, usize, usize); 7] = [
        (3, 1, 2, 2, 3),
        (1, 0, 2, 6, 7),
        (7, 3, 2, 9, 12),
        (3, 1, 1, 5, 4),
        (1, 0, 1, 3, 5),
        (3, 1, 2, 8, 8),
        (3, 1, 2, 1, 1),
    ];

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Values equal Candle's padded conv; gradients of the fast CPU
    /// backward equal those of Candle's own ops (explicitly padded), for
    /// sizes whose remainders differ between height and width.
    #[test]
    fn matches_candle_and_differentiates_any_size() -> Result<()> {
        let dev = Device::Cpu;
        for (k, p, s, h, w) in CASES {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev)?)?;
            let bias = Tensor::randn(0f32, 1., 4, &dev)?;
            let conv = Conv2d::new(weight.as_tensor().clone(), Some(bias.clone()), p, s);
            let y = conv.forward(x.as_tensor())?;
            let reference = x
                .conv2d(&weight, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            assert_eq!(y.dims(), reference.dims());
            assert!(max_diff(&y, &reference)? < 1e-5, "k{k} p{p} s{s} {h}x{w}");

            let probe = Tensor::randn(0f32, 1., y.dims(), &dev)?;
            let fast = (&y * &probe)?.sum_all()?.backward()?;
            let slow_y = conv.conv(x.as_tensor(), weight.as_tensor())?;
            let slow = (&slow_y * &probe)?.sum_all()?.backward()?;
            for t in [x.as_tensor(), weight.as_tensor()] {
                let (a, b) = (
                    fast.get(t).expect("fast gradient"),
                    slow.get(t).expect("reference gradient"),
                );
                assert_eq!(a.dims(), t.dims());
                assert!(
                    max_diff(a, b)? < 1e-4,
                    "k{k} p{p} s{s} {h}x{w}: gradient differs by {}",
                    max_diff(a, b)?
                );
            }
        }
        Ok(())
    }

    /// im2col against its definition, and col2im as its adjoint.
    #[test]
    fn im2col_and_col2im_are_adjoint() {
        for (k, p, s, h, w) in CASES {
            let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
            let geo = Geometry {
                c_in: 2,
                h,
                w,
                k: (k, k),
                out: (oh, ow),
                padding: p,
                stride: s,
            };
            let x: Vec<f32> = (0..2 * h * w).map(|i| (i as f32 * 0.37).sin()).collect();
            let cols = geo.im2col(&x);
            for (row, chunk) in cols.chunks(oh * ow).enumerate() {
                let (c, ky, kx) = (row / (k * k), row / k % k, row % k);
                for (o, &v) in chunk.iter().enumerate() {
                    let (y, xx) = (
                        (o / ow * s + ky) as isize - p as isize,
                        (o % ow * s + kx) as isize - p as isize,
                    );
                    let inside = (0..h as isize).contains(&y) && (0..w as isize).contains(&xx);
                    let expected = if inside {
                        x[(c * h + y as usize) * w + xx as usize]
                    } else {
                        0.0
                    };
                    assert_eq!(v, expected, "k{k} p{p} s{s} {h}x{w} row {row} out {o}");
                }
            }
            // <im2col(x), g> == <x, col2im(g)>
            let g: Vec<f32> = (0..cols.len()).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut back = vec![0f32; x.len()];
            geo.col2im_add(&g, &mut back);
            let lhs: f64 = cols.iter().zip(&g).map(|(a, b)| f64::from(a * b)).sum();
            let rhs: f64 = x.iter().zip(&back).map(|(a, b)| f64::from(a * b)).sum();
            assert!(
                (lhs - rhs).abs() < 1e-3 * (1.0 + lhs.abs()),
                "{lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 5, 5), &dev)?)?;
        let weight = Tensor::randn(0f32, 1., (3, 2, 3, 3), &dev)?;
        let y = Conv2d::new(weight.clone(), None, 1, 2).forward(x.as_tensor())?;
        let grads = y.sum_all()?.backward()?;
        assert!(grads.get(&weight).is_none());
        assert_eq!(
            grads.get(x.as_tensor()).expect("input gradient").dims(),
            [1, 2, 5, 5]
        );
        Ok(())
    }
}
