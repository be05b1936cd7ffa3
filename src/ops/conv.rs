//! 2D convolution with a fast CPU forward and backward.
//!
//! Candle's CPU convolution backward computes the input gradient with a
//! nested-loop transposed convolution and the weight gradient with a
//! convolution whose "kernel" is the output gradient; together they are
//! 5-10x slower than the forward (REFERENCE.md section 3). Here all three
//! products are plain GEMMs over im2col columns (the `gemm` crate that
//! Candle itself uses for matmul), as custom ops with their own backward:
//!
//! - forward:      `out  = W [co, c*kh*kw] x cols [c*kh*kw, n*ho*wo]`
//! - input grad:   `dcols = W^T x g`, then col2im (scatter-add)
//! - weight grad:  `dW   = g [co, n*ho*wo] x cols^T`
//!
//! The batch is processed in chunks whose columns stay under
//! [`COLUMN_BUDGET`] floats, so memory stays bounded for large images.
//! Other devices and dtypes use Candle's own convolution.

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// Most f32 values of im2col columns held at once (64 MiB).
const COLUMN_BUDGET: usize = 16 << 20;

/// Most f32 values of one image's columns for the per-image path (4 MiB,
/// well inside this machine's L3 cache; see [`Geometry::per_image`]).
const PER_IMAGE_COLUMNS: usize = 1 << 20;

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
        Self { weight, bias, padding, stride }
    }
}

impl Module for Conv2d {
    /// [n, c_in, h, w] -> [n, c_out, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = conv2d(x, &self.weight, self.padding, self.stride)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Convolution without bias: the GEMM custom op for f32 on the CPU,
/// Candle's `conv2d` elsewhere (see [`candle_conv2d`]).
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return candle_conv2d(x, weight, padding, stride);
    }
    let geometry = Geometry::new(x.dims4()?, weight.dims4()?, padding, stride)?;
    x.contiguous()?.apply_op2(&weight.contiguous()?, ConvForward(geometry))
}

/// Candle's convolution, made differentiable for every size: its backward
/// derives the transposed convolution's output padding from the height
/// alone, so a strided conv whose height and width leave different
/// remainders `(n + 2p - k) % s` fails (FPN P6 -> P7 on a 2x3 map). The
/// input is padded by hand and cropped so the kernel fits the strides
/// exactly, which gives the same values.
pub fn candle_conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return x.conv2d(weight, padding, 1, 1, 1);
    }
    let k = weight.dims4()?.2;
    let mut x = x.clone();
    for dim in [2, 3] {
        let n = x.dim(dim)? + 2 * padding;
        if n < k {
            candle_core::bail!("conv2d: input smaller than the {k}x{k} kernel with padding {padding}");
        }
        x = x.pad_with_zeros(dim, padding, padding)?.narrow(dim, 0, n - (n - k) % stride)?;
    }
    x.conv2d(weight, 0, stride, 1, 1)
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn new(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (n, c_in, h, width) = x;
        let (c_out, wc_in, kh, kw) = w;
        if wc_in != c_in {
            candle_core::bail!("conv2d: input has {c_in} channels, weight expects {wc_in}");
        }
        if h + 2 * padding < kh || width + 2 * padding < kw || stride == 0 {
            candle_core::bail!("conv2d: {h}x{width} input with padding {padding} is smaller than the {kh}x{kw} kernel");
        }
        let out_h = (h + 2 * padding - kh) / stride + 1;
        let out_w = (width + 2 * padding - kw) / stride + 1;
        Ok(Self { n, c_in, h, w: width, c_out, kh, kw, padding, stride, out_h, out_w })
    }

    /// Rows of the column matrix: c_in * kh * kw.
    fn patch(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// 1x1, stride 1, no padding: the columns are the input itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Many small images (the `shapes` model, FPN heads): each thread takes
    /// whole images and runs im2col and a single-threaded GEMM on columns
    /// that stay in its cache. Wide GEMMs over the whole batch instead send
    /// every column through memory, and for narrow layers (16-64 channels)
    /// that traffic, not arithmetic, sets the pace.
    fn per_image(&self) -> bool {
        self.n >= threads() && self.patch() * self.out_plane() <= PER_IMAGE_COLUMNS
    }

    /// Images per chunk so that the columns fit [`COLUMN_BUDGET`].
    fn chunk(&self) -> usize {
        (COLUMN_BUDGET / (self.patch() * self.out_plane()).max(1)).clamp(1, self.n.max(1))
    }
}

/// Threads for the convolutions: Candle's count (RAYON_NUM_THREADS or the cores).
/// Read once: Candle's count reads /proc/cpuinfo, which cost 3% of a step
/// when asked per GEMM.
fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// A GEMM over the whole batch uses every thread.
fn parallelism() -> Parallelism {
    match threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

thread_local! {
    /// im2col columns and GEMM products, kept between calls so each
    /// convolution does not allocate and zero them again.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    SCRATCH.with(|s| {
        let (a, b) = &mut *s.borrow_mut();
        f(a, b)
    })
}

/// `dst[m, n] (+)= lhs[m, k] x rhs[k, n]` with explicit row/column strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs, "matmul: lhs too small");
    assert!(n == 0 || k == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs, "matmul: rhs too small");
    // SAFETY: the asserts above keep every index gemm touches in bounds.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The output positions `lo..hi` along one axis whose input position
/// `o * stride + k - padding` falls inside `0..size`.
fn valid_range(out: usize, size: usize, k: usize, padding: usize, stride: usize) -> (usize, usize) {
    let lo = padding.saturating_sub(k).div_ceil(stride);
    let hi = if size + padding > k { ((size + padding - k - 1) / stride + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Writes the columns of `images` ([count, c, h, w]) into `cols`
/// ([patch, count * out_plane], image-major within a row), on every thread
/// or, inside a per-image task, on this one.
fn im2col(g: &Geometry, images: &[f32], count: usize, cols: &mut [f32], parallel: bool) {
    let row_len = count * g.out_plane();
    let fill = |(row, dst): (usize, &mut [f32])| im2col_row(g, images, row, dst);
    if parallel {
        cols.par_chunks_mut(row_len).enumerate().for_each(fill);
    } else {
        cols.chunks_mut(row_len).enumerate().for_each(fill);
    }
}

/// Row `row` (one channel and kernel tap) of [`im2col`]'s columns.
fn im2col_row(g: &Geometry, images: &[f32], row: usize, dst: &mut [f32]) {
    let plane = g.h * g.w;
    let (c, ki, kj) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
    let (y_lo, y_hi) = valid_range(g.out_h, g.h, ki, g.padding, g.stride);
    let (x_lo, x_hi) = valid_range(g.out_w, g.w, kj, g.padding, g.stride);
    for (i, image_cols) in dst.chunks_mut(g.out_plane()).enumerate() {
        let src = &images[(i * g.c_in + c) * plane..][..plane];
        for (oy, out_row) in image_cols.chunks_mut(g.out_w).enumerate() {
            if oy < y_lo || oy >= y_hi {
                out_row.fill(0.0);
                continue;
            }
            let iy = oy * g.stride + ki - g.padding;
            let src_row = &src[iy * g.w..][..g.w];
            out_row[..x_lo].fill(0.0);
            out_row[x_hi..].fill(0.0);
            let first = x_lo * g.stride + kj - g.padding;
            let inside = &mut out_row[x_lo..x_hi];
            if g.stride == 1 {
                inside.copy_from_slice(&src_row[first..first + inside.len()]);
            } else {
                for (v, &x) in inside.iter_mut().zip(src_row[first..].iter().step_by(g.stride)) {
                    *v = x;
                }
            }
        }
    }
}

/// Adds the columns `cols` ([patch, count * out_plane]) back into the
/// image gradients `images` ([count, c, h, w]), the adjoint of [`im2col`].
fn col2im(g: &Geometry, cols: &[f32], count: usize, images: &mut [f32]) {
    let row_len = count * g.out_plane();
    images.par_chunks_mut(g.c_in * g.h * g.w).enumerate().for_each(|(i, image)| {
        col2im_image(g, &cols[i * g.out_plane()..], row_len, image);
    });
}

/// [`col2im`] for one image whose columns start `cols` and whose rows are
/// `row_len` apart.
fn col2im_image(g: &Geometry, cols: &[f32], row_len: usize, image: &mut [f32]) {
    let plane = g.h * g.w;
    for (c, dst) in image.chunks_mut(plane).enumerate() {
        for ki in 0..g.kh {
            let (y_lo, y_hi) = valid_range(g.out_h, g.h, ki, g.padding, g.stride);
            for kj in 0..g.kw {
                let (x_lo, x_hi) = valid_range(g.out_w, g.w, kj, g.padding, g.stride);
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[row * row_len..][..g.out_plane()];
                for oy in y_lo..y_hi {
                    let iy = oy * g.stride + ki - g.padding;
                    let dst_row = &mut dst[iy * g.w..][..g.w];
                    let values = &src[oy * g.out_w + x_lo..oy * g.out_w + x_hi];
                    let first = x_lo * g.stride + kj - g.padding;
                    if g.stride == 1 {
                        for (d, &v) in dst_row[first..first + values.len()].iter_mut().zip(values) {
                            *d += v;
                        }
                    } else {
                        for (d, &v) in dst_row[first..].iter_mut().step_by(g.stride).zip(values) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

/// The per-image path (see [`Geometry::per_image`]): `out = conv(x, w)`.
fn forward_per_image(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    let shape = (g.c_out, g.out_plane(), g.patch());
    out.par_chunks_mut(out_image).zip(x.par_chunks(in_image)).for_each(|(dst, image)| {
        if g.is_pointwise() {
            return matmul(shape, dst, false, w, (g.patch(), 1), image, (g.out_plane(), 1), Parallelism::None);
        }
        with_scratch(|cols, _| {
            cols.resize(g.patch() * g.out_plane(), 0.0);
            im2col(g, image, 1, cols, false);
            matmul(shape, dst, false, w, (g.patch(), 1), cols, (g.out_plane(), 1), Parallelism::None);
        })
    });
}

/// The per-image path: `dx` from `grad` and `w`.
fn input_grad_per_image(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    // W^T [patch, co]: W is [co, patch] row-major.
    let shape = (g.patch(), g.out_plane(), g.c_out);
    dx.par_chunks_mut(in_image).zip(grad.par_chunks(out_image)).for_each(|(dst, grad)| {
        if g.is_pointwise() {
            return matmul(shape, dst, false, w, (1, g.patch()), grad, (g.out_plane(), 1), Parallelism::None);
        }
        with_scratch(|cols, _| {
            cols.resize(g.patch() * g.out_plane(), 0.0);
            matmul(shape, cols, false, w, (1, g.patch()), grad, (g.out_plane(), 1), Parallelism::None);
            col2im_image(g, cols, g.out_plane(), dst);
        })
    });
}

/// The per-image path: `dw` from `x` and `grad`. Each thread sums a fixed
/// run of images and the partial sums are added in order, so the result
/// does not depend on scheduling (training stays reproducible).
fn weight_grad_per_image(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    let per_task = g.n.div_ceil(threads().max(1));
    let shape = (g.c_out, g.patch(), g.out_plane());
    let partials: Vec<Vec<f32>> = x
        .par_chunks(per_task * in_image)
        .zip(grad.par_chunks(per_task * out_image))
        .map(|(images, grads)| {
            let mut dw = vec![0f32; g.c_out * g.patch()];
            with_scratch(|cols, _| {
                for (i, (image, grad)) in images.chunks(in_image).zip(grads.chunks(out_image)).enumerate() {
                    let cols: &[f32] = if g.is_pointwise() {
                        image
                    } else {
                        cols.resize(g.patch() * g.out_plane(), 0.0);
                        im2col(g, image, 1, cols, false);
                        cols
                    };
                    // dW [co, patch] += g [co, plane] x cols^T [plane, patch].
                    let (rhs, rs) = (cols, (1, g.out_plane()));
                    matmul(shape, &mut dw, i > 0, grad, (g.out_plane(), 1), rhs, rs, Parallelism::None);
                }
            });
            dw
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0f32; g.c_out * g.patch()]);
    for partial in partials {
        dw.iter_mut().zip(&partial).for_each(|(a, b)| *a += b);
    }
    dw
}

/// `[count, co, plane]` <-> `[co, count * plane]` (image-major rows).
fn to_channel_major(src: &[f32], count: usize, channels: usize, plane: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(count * plane).enumerate().for_each(|(c, row)| {
        for (i, block) in row.chunks_mut(plane).enumerate() {
            block.copy_from_slice(&src[(i * channels + c) * plane..][..plane]);
        }
    });
}

fn from_channel_major(src: &[f32], count: usize, channels: usize, plane: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(channels * plane).enumerate().for_each(|(i, image)| {
        for (c, block) in image.chunks_mut(plane).enumerate() {
            block.copy_from_slice(&src[c * count * plane + i * plane..][..plane]);
        }
    });
}

/// The contiguous f32 data of a custom-op argument.
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv2d: {what} must be contiguous"),
    }
}

/// `out = conv(x, w)`; arguments `x [n, c, h, w]`, `w [co, c, kh, kw]`.
struct ConvForward(Geometry);

impl CustomOp2 for ConvForward {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (x, w) = (f32_data(xs, xl, "input")?, f32_data(ws, wl, "weight")?);
        let mut out = vec![0f32; g.n * g.c_out * g.out_plane()];
        if g.per_image() {
            forward_per_image(g, x, w, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((g.n, g.c_out, g.out_h, g.out_w))));
        }
        let (chunk, in_image, out_image) = (g.chunk(), g.c_in * g.h * g.w, g.c_out * g.out_plane());
        with_scratch(|cols, product| {
            for first in (0..g.n).step_by(chunk) {
                let count = chunk.min(g.n - first);
                let images = &x[first * in_image..][..count * in_image];
                let dst = &mut out[first * out_image..][..count * out_image];
                if g.is_pointwise() && count == 1 {
                    matmul(
                        (g.c_out, g.out_plane(), g.patch()),
                        dst,
                        false,
                        w,
                        (g.patch(), 1),
                        images,
                        (g.out_plane(), 1),
                        parallelism(),
                    );
                    continue;
                }
                let width = count * g.out_plane();
                cols.resize(g.patch() * width, 0.0);
                im2col(g, images, count, cols, true);
                product.resize(g.c_out * width, 0.0);
                matmul((g.c_out, width, g.patch()), product, false, w, (g.patch(), 1), cols, (width, 1), parallelism());
                from_channel_major(product, count, g.c_out, g.out_plane(), dst);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c_out, g.out_h, g.out_w))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // Only what the graph needs: the stem's input is the image batch,
        // and frozen layers have constant weights.
        let dx = x.track_op().then(|| grad.apply_op2_no_bwd(w, &ConvInputGrad(self.0))).transpose()?;
        let dw = w.track_op().then(|| x.apply_op2_no_bwd(&grad, &ConvWeightGrad(self.0))).transpose()?;
        Ok((dx, dw))
    }
}

/// `dx` from arguments `grad [n, co, ho, wo]` and `w [co, c, kh, kw]`.
struct ConvInputGrad(Geometry);

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (grad, w) = (f32_data(gs, gl, "gradient")?, f32_data(ws, wl, "weight")?);
        let mut dx = vec![0f32; g.n * g.c_in * g.h * g.w];
        if g.per_image() {
            input_grad_per_image(g, grad, w, &mut dx);
            return Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c_in, g.h, g.w))));
        }
        let (chunk, in_image, out_image) = (g.chunk(), g.c_in * g.h * g.w, g.c_out * g.out_plane());
        with_scratch(|grad_cm, cols| {
            for first in (0..g.n).step_by(chunk) {
                let count = chunk.min(g.n - first);
                let grads = &grad[first * out_image..][..count * out_image];
                let dst = &mut dx[first * in_image..][..count * in_image];
                // W^T [patch, co]: W is [co, patch] row-major.
                if g.is_pointwise() && count == 1 {
                    matmul(
                        (g.patch(), g.out_plane(), g.c_out),
                        dst,
                        false,
                        w,
                        (1, g.patch()),
                        grads,
                        (g.out_plane(), 1),
                        parallelism(),
                    );
                    continue;
                }
                let width = count * g.out_plane();
                grad_cm.resize(g.c_out * width, 0.0);
                to_channel_major(grads, count, g.c_out, g.out_plane(), grad_cm);
                cols.resize(g.patch() * width, 0.0);
                matmul((g.patch(), width, g.c_out), cols, false, w, (1, g.patch()), grad_cm, (width, 1), parallelism());
                col2im(g, cols, count, dst);
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((g.n, g.c_in, g.h, g.w))))
    }
}

/// `dw` from arguments `x [n, c, h, w]` and `grad [n, co, ho, wo]`.
struct ConvWeightGrad(Geometry);

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (x, grad) = (f32_data(xs, xl, "input")?, f32_data(gs, gl, "gradient")?);
        let shape = Shape::from((g.c_out, g.c_in, g.kh, g.kw));
        if g.per_image() {
            return Ok((CpuStorage::F32(weight_grad_per_image(g, x, grad)), shape));
        }
        let mut dw = vec![0f32; g.c_out * g.patch()];
        let (chunk, in_image, out_image) = (g.chunk(), g.c_in * g.h * g.w, g.c_out * g.out_plane());
        with_scratch(|grad_cm, cols| {
            for (step, first) in (0..g.n).step_by(chunk).enumerate() {
                let count = chunk.min(g.n - first);
                let images = &x[first * in_image..][..count * in_image];
                let grads = &grad[first * out_image..][..count * out_image];
                let width = count * g.out_plane();
                grad_cm.resize(g.c_out * width, 0.0);
                to_channel_major(grads, count, g.c_out, g.out_plane(), grad_cm);
                let cols: &[f32] = if g.is_pointwise() && count == 1 {
                    images
                } else {
                    cols.resize(g.patch() * width, 0.0);
                    im2col(g, images, count, cols, true);
                    cols
                };
                // dW [co, patch] += g [co, width] x cols^T [width, patch].
                let shape = (g.c_out, g.patch(), width);
                matmul(shape, &mut dw, step > 0, grad_cm, (width, 1), cols, (1, width), parallelism());
            }
        });
        Ok((CpuStorage::F32(dw), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Forward and both gradients equal Candle's reference convolution on
    /// random shapes: stride 1 and 2, padding, 1x1, 7x7, non-square.
    #[test]
    fn matches_candle_forward_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            (2, 3, 9, 12, 4, 3, 1, 1),
            (2, 3, 9, 12, 4, 3, 1, 2),
            (3, 5, 6, 7, 2, 1, 0, 1),
            (1, 5, 6, 7, 2, 1, 0, 1),
            (2, 4, 8, 6, 3, 1, 0, 2),
            (1, 3, 17, 13, 5, 7, 3, 2),
            (2, 2, 2, 3, 3, 3, 1, 2),
        ];
        for (n, c, h, w, co, k, p, s) in cases {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, h, w), &dev)?)?;
            let weight = Var::from_tensor(&Tensor::randn(0f32, 1., (co, c, k, k), &dev)?)?;
            let y = conv2d(x.as_tensor(), weight.as_tensor(), p, s)?;
            let reference = candle_conv2d(x.as_tensor(), weight.as_tensor(), p, s)?;
            assert_eq!(y.dims(), reference.dims());
            let what = format!("n{n} c{c} {h}x{w} co{co} k{k} p{p} s{s}");
            assert_close(&y, &reference, &format!("{what} forward"))?;
            // A weighting makes every output position's gradient distinct.
            let probe = Tensor::randn(0f32, 1., y.dims(), &dev)?;
            let ours = (y * &probe)?.sum_all()?.backward()?;
            let theirs = (reference * &probe)?.sum_all()?.backward()?;
            for (var, name) in [(&x, "input"), (&weight, "weight")] {
                let a = ours.get(var.as_tensor()).expect("gradient");
                let b = theirs.get(var.as_tensor()).expect("gradient");
                assert_close(a, b, &format!("{what} {name} gradient"))?;
            }
        }
        Ok(())
    }

    #[test]
    fn constant_inputs_get_no_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let images = Tensor::randn(0f32, 1., (2, 3, 9, 9), &dev)?; // not a variable: the stem's input
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?)?;
        let grads = conv2d(&images, weight.as_tensor(), 1, 2)?.sum_all()?.backward()?;
        assert!(grads.get(&images).is_none());
        let reference = candle_conv2d(&images, weight.as_tensor(), 1, 2)?.sum_all()?.backward()?;
        let (ours, theirs) = (grads.get(weight.as_tensor()), reference.get(weight.as_tensor()));
        assert_close(ours.expect("weight gradient"), theirs.expect("weight gradient"), "weight gradient")
    }

    fn assert_close(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        assert!(diff <= 1e-4 * scale, "{what}: max difference {diff} (scale {scale})");
        Ok(())
    }

    #[test]
    fn valid_ranges_keep_inputs_in_bounds() {
        // 5 wide, 3x3 kernel, padding 1, stride 1 and 2.
        assert_eq!(valid_range(5, 5, 0, 1, 1), (1, 5));
        assert_eq!(valid_range(5, 5, 1, 1, 1), (0, 5));
        assert_eq!(valid_range(5, 5, 2, 1, 1), (0, 4));
        assert_eq!(valid_range(3, 5, 0, 1, 2), (1, 3));
        assert_eq!(valid_range(3, 5, 2, 1, 2), (0, 2));
        // A 7x7 kernel on a 2-wide input with padding 3: few taps land.
        assert_eq!(valid_range(1, 2, 6, 3, 2), (0, 0));
    }

    #[test]
    fn chunking_keeps_results() -> Result<()> {
        // Columns of 8 * 9 * 64 * 64 floats per image: forced into chunks of
        // one image when the budget is smaller than two images.
        let g = Geometry::new((3, 8, 64, 64), (4, 8, 3, 3), 1, 1)?;
        assert!(g.chunk() >= 1);
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 8, 64, 64), &dev)?;
        let w = Tensor::randn(0f32, 1., (4, 8, 3, 3), &dev)?;
        assert_close(&conv2d(&x, &w, 1, 1)?, &x.conv2d(&w, 1, 1, 1, 1)?, "chunked")
    }
}
