//! A 2D convolution whose backward pass works for every input size.
//!
//! Candle's conv2d backward derives `conv_transpose2d`'s output padding from
//! the height alone, so a strided conv whose height and width leave
//! different remainders `(n + 2p - k) % stride` fails in backward with a
//! shape mismatch (e.g. FPN P6 -> P7 on a 2x3 map). Strided convolutions
//! here pad explicitly: `padding` zeros before, and after just enough to
//! leave no remainder (cropping rows the kernel never reads), then run
//! unpadded. The result is identical.

use candle_core::{Module, Result, Tensor};

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
}

impl Module for Conv2d {
    /// [n, c_in, h, w] -> [n, c_out, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let y = if self.stride == 1 {
            x.conv2d(&self.weight, self.padding, 1, 1, 1)?
        } else {
            let x = self.pad_exact(&self.pad_exact(x, 2, kh)?, 3, kw)?;
            x.conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Same values as Candle's padded conv, and a backward pass on sizes
    /// whose remainders differ between height and width.
    #[test]
    fn matches_candle_and_differentiates_any_size() -> Result<()> {
        let dev = Device::Cpu;
        for (k, p, s, h, w) in [
            (3, 1, 2, 2, 3),
            (1, 0, 2, 6, 7),
            (7, 3, 2, 9, 12),
            (3, 1, 1, 5, 4),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, h, w), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, k, k), &dev)?)?;
            let bias = Tensor::randn(0f32, 1., 4, &dev)?;
            let conv = Conv2d::new(weight.as_tensor().clone(), Some(bias.clone()), p, s);
            let y = conv.forward(x.as_tensor())?;
            let reference = x
                .conv2d(&weight, p, s, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            assert_eq!(y.dims(), reference.dims());
            let diff = (&y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k{k} p{p} s{s} {h}x{w}: {diff}");
            let grads = y.sqr()?.sum_all()?.backward()?;
            assert_eq!(
                grads.get(x.as_tensor()).expect("input gradient").dims(),
                [2, 3, h, w]
            );
            assert_eq!(
                grads
                    .get(weight.as_tensor())
                    .expect("weight gradient")
                    .dims(),
                [4, 3, k, k]
            );
        }
        Ok(())
    }
}
