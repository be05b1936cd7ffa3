//! 2D convolution with a fast CPU forward and backward.
//!
//! Candle's CPU convolution backward computes the input gradient with a
//! nested-loop transposed convolution and the weight gradient with a
//! convolution whose "kernel" is the output gradient; together they are
//! 5-10x slower than the forward (docs/REFERENCE.md section 3). Here all three
//! products are plain GEMMs over im2col columns (the `gemm` crate that
//! Candle itself uses for matmul), as custom ops with their own backward:
//!
//! - forward:      `out  = W [co, c*kh*kw] x cols [c*kh*kw, n*ho*wo]`
//! - input grad:   `dcols = W^T x g`, then col2im (scatter-add)
//! - weight grad:  `dW   = g [co, n*ho*wo] x cols^T`
//!
//! Each image's output rows are cut into bands whose columns stay under
//! [`BAND_COLUMNS`] floats: im2col writes a band's columns and the GEMM
//! reads them back while they are still in cache, and memory stays bounded
//! for large images. With at least as many images as threads, each thread
//! takes whole images and runs single-threaded GEMMs; otherwise the GEMMs
//! use every thread. Some convolutions skip the columns: wide 3x3 stride-1
//! ones through Winograd (`conv/winograd.rs`), narrow ones on small planes
//! (3x3 to 7x7, stride 1 or 2, the stem's included) through direct AVX2 or AVX-512
//! kernels (`conv/direct.rs`).
//! Other devices and dtypes use Candle's own convolution.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::thread::LocalKey;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::cuda_kernels::{conv_kernel, ConvKernel};
use super::elementwise::{add_channel_bias_in_place, add_channel_bias_to_fresh, channel_bias_grads, relu};
use super::{f32_data, uninit, zeroed};
use transpose::transpose;

#[cfg(feature = "cudnn")]
mod cudnn;
mod direct;
mod transpose;
mod winograd;

/// Most f32 values of one band's im2col columns (4 MiB, well inside this
/// machine's L3 cache). Whole-batch columns of a 480x640 image went through
/// memory, and with them a 64-channel convolution ran at a quarter of the
/// GEMM's speed.
const BAND_COLUMNS: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    /// [c_out, c_in, k, k]
    weight: Tensor,
    /// [c_out]
    bias: Option<Tensor>,
    /// [c_out, 1, 1, 1]: multiplies the weight at every forward.
    channel_scale: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>, padding: usize, stride: usize) -> Self {
        Self { weight, bias, channel_scale: None, padding, stride }
    }

    /// The same convolution with each output channel's kernel multiplied by
    /// `scale` ([c_out, 1, 1, 1]) at every forward: a frozen BatchNorm folded
    /// into a convolution whose weight trains in place, so each forward sees
    /// the optimiser's last update (a product taken once would not).
    pub(crate) fn with_channel_scale(self, scale: Tensor) -> Self {
        Self { channel_scale: Some(scale), ..self }
    }

    /// The weight the product uses, in `dtype`.
    fn weight_as(&self, dtype: DType) -> Result<Tensor> {
        let weight = match &self.channel_scale {
            Some(scale) => self.weight.broadcast_mul(scale)?,
            None => self.weight.clone(),
        };
        weight.to_dtype(dtype)
    }

    /// `(weight, padding, stride)` of a convolution with neither bias nor
    /// channel scale, which [`conv_norm`](super::conv_norm) can fuse.
    pub(super) fn plain(&self) -> Option<(&Tensor, usize, usize)> {
        let plain = self.bias.is_none() && self.channel_scale.is_none();
        plain.then_some((&self.weight, self.padding, self.stride))
    }

    /// `relu(forward(x))`, the bias and the ReLU in one op.
    pub(crate) fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_relu(x, true)
    }

    /// [`Module::forward`], then a ReLU when `with_relu`. With a bias, in
    /// CPU training, the product, the bias and the ReLU are one graph node
    /// ([`ConvBiasForward`]); otherwise the bias goes into the product's
    /// fresh output (in place when nothing is differentiated).
    fn forward_maybe_relu(&self, x: &Tensor, with_relu: bool) -> Result<Tensor> {
        let weight = self.weight_as(x.dtype())?;
        let Some(bias) = &self.bias else {
            let y = conv2d(x, &weight, self.padding, self.stride)?;
            return if with_relu { relu(&y) } else { Ok(y) };
        };
        let bias = bias.to_dtype(x.dtype())?;
        let differentiated = [x, &weight, &bias].iter().any(|t| t.track_op());
        if differentiated
            && x.dtype() == DType::F32
            && matches!(conv_kernel(x.device(), x.dtype()), ConvKernel::CpuGemm)
        {
            let geometry = Geometry::new(x.dims4()?, weight.dims4()?, self.padding, self.stride)?;
            let op = ConvBiasForward { geometry, with_relu };
            return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
        }
        let y = conv2d(x, &weight, self.padding, self.stride)?;
        add_channel_bias_to_fresh(y, &bias, with_relu)
    }
}

impl Module for Conv2d {
    /// [n, c_in, h, w] -> [n, c_out, (h + 2p - k) / s + 1, (w + 2p - k) / s + 1],
    /// computed in `x`'s dtype: under mixed precision the f32 parameters are
    /// cast (differentiably) to bf16 for the product.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_relu(x, false)
    }
}

/// Convolution without bias: the GEMM custom op for f32 (and bf16) on the
/// CPU, cuDNN on CUDA, Candle's `conv2d` elsewhere (see [`candle_conv2d`]
/// and `cuda_kernels::conv_kernel`).
pub fn conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if x.dtype() != weight.dtype() {
        return candle_conv2d(x, weight, padding, stride);
    }
    match conv_kernel(x.device(), x.dtype()) {
        ConvKernel::CpuGemm if x.dtype() == DType::BF16 => {
            // No bf16 GEMM on the CPU (Candle widens its bf16 matmul too):
            // bf16 inputs and weights, f32 products and sums, a bf16 result,
            // which is what a GPU's bf16 convolution computes.
            let y = conv2d(&x.to_dtype(DType::F32)?, &weight.to_dtype(DType::F32)?, padding, stride)?;
            y.to_dtype(DType::BF16)
        }
        ConvKernel::CpuGemm => {
            let geometry = Geometry::new(x.dims4()?, weight.dims4()?, padding, stride)?;
            x.contiguous()?.apply_op2(&weight.contiguous()?, ConvForward(geometry))
        }
        #[cfg(feature = "cudnn")]
        ConvKernel::Cudnn => {
            let geometry = Geometry::new(x.dims4()?, weight.dims4()?, padding, stride)?;
            x.contiguous()?.apply_op2(&weight.contiguous()?, cudnn::CudnnForward(geometry))
        }
        _ => candle_conv2d(x, weight, padding, stride),
    }
}

/// Candle's convolution, made differentiable for every size: its backward
/// derives the transposed convolution's output padding from the height
/// alone, so a strided conv whose height and width leave different
/// remainders `(n + 2p - k) % s` fails (FPN P6 -> P7 on a 2x3 map). The
/// input is padded by hand and cropped so the kernel fits the strides
/// exactly, which gives the same values.
pub(crate) fn candle_conv2d(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Geometry {
    pub(super) n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    pub(super) c_out: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    stride: usize,
    pub(super) out_h: usize,
    pub(super) out_w: usize,
}

impl Geometry {
    pub(super) fn new(
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

    pub(super) fn out_plane(&self) -> usize {
        self.out_h * self.out_w
    }

    /// 1x1, stride 1, no padding: the columns are the input itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// One thread per image (single-threaded GEMMs) when there are enough
    /// images; otherwise images one after another with parallel GEMMs.
    fn per_thread(&self) -> bool {
        self.n >= threads()
    }

    /// The GEMM parallelism that goes with [`Geometry::per_thread`].
    fn gemm_parallelism(&self) -> Parallelism {
        if self.per_thread() {
            Parallelism::None
        } else {
            parallelism()
        }
    }

    /// One image's output rows in bands whose columns fit [`BAND_COLUMNS`].
    fn bands(&self) -> impl Iterator<Item = Band> + '_ {
        let rows = (BAND_COLUMNS / (self.patch() * self.out_w).max(1)).clamp(1, self.out_h.max(1));
        self.bands_of(rows)
    }

    /// [`Geometry::bands`] cut thinner, to about a multiple of the thread
    /// count, so that spread over the threads each takes about as many;
    /// `None` when there are fewer bands than threads (the GEMMs share the
    /// threads then).
    fn bands_for_threads(&self) -> Option<impl Iterator<Item = Band> + '_> {
        let (count, threads) = (self.bands().count(), threads());
        (count >= threads && threads > 1).then(|| self.bands_of(self.out_h.div_ceil(count.div_ceil(threads) * threads)))
    }

    fn bands_of(&self, rows: usize) -> impl Iterator<Item = Band> + '_ {
        (0..self.out_h).step_by(rows.max(1)).map(move |first| Band { first, rows: rows.min(self.out_h - first) })
    }
}

/// Output rows `first..first + rows` of one image.
#[derive(Debug, Clone, Copy)]
struct Band {
    first: usize,
    rows: usize,
}

impl Band {
    /// Output positions in the band: the width of its column matrix.
    fn plane(&self, g: &Geometry) -> usize {
        self.rows * g.out_w
    }

    /// Where the band starts within one output channel plane.
    fn offset(&self, g: &Geometry) -> usize {
        self.first * g.out_w
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

/// A per-thread scratch buffer, kept between calls so each convolution
/// does not allocate and zero it again.
type Scratch = LocalKey<RefCell<Vec<f32>>>;

thread_local! {
    /// im2col columns (and the Winograd path's transformed tiles).
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The phase-split input rows of a strided convolution's band.
    static PHASES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// One GEMM operand laid out again (a weight gradient's columns or
    /// transformed input, transposed).
    static OPERAND: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's `buffer`, sized to `len` floats.
fn with_scratch<R>(buffer: &'static Scratch, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    buffer.with(|data| {
        let mut data = data.borrow_mut();
        data.resize(len, 0.0);
        f(&mut data[..len])
    })
}

/// Runs `f` with this thread's column buffer, sized to `len` floats.
fn with_columns<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(&COLUMNS, len, f)
}

/// A matrix in a slice: its data and (row, column) strides.
type Strided<'a> = (&'a [f32], (usize, usize));

/// `dst[m, n] (+)= lhs[m, k] x rhs[k, n]`; `dst` rows are `dst_rs` apart.
fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    (lhs, (lhs_rs, lhs_cs)): Strided,
    (rhs, (rhs_rs, rhs_cs)): Strided,
    parallelism: Parallelism,
) {
    assert!(m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n, "matmul: destination too small");
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
            dst_rs as isize,
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

/// `dst[m, n] (+)= lhs[m, k] x src^T` for `src [n, k]` with rows `src_rs`
/// apart: the weight gradients, whose two operands both hold the sum axis
/// contiguous. `src` is transposed into this thread's operand buffer first
/// (on every thread when `parallel`), so that the `gemm` crate packs whole
/// rows instead of gathering each value (`conv/transpose.rs`).
fn matmul_by_transposed(
    (m, n, k): (usize, usize, usize),
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: Strided,
    (src, src_rs): (&[f32], usize),
    (parallelism, parallel): (Parallelism, bool),
) {
    with_scratch(&OPERAND, k * n, |src_t| {
        transpose((src, src_rs), (n, k), src_t, parallel);
        matmul((m, n, k), dst, accumulate, lhs, (src_t, (n, 1)), parallelism);
    })
}

/// The output positions `lo..hi` along one axis whose input position
/// `o * stride + k - padding` falls inside `0..size`.
fn valid_range(out: usize, size: usize, k: usize, padding: usize, stride: usize) -> (usize, usize) {
    let lo = padding.saturating_sub(k).div_ceil(stride);
    let hi = if size + padding > k { ((size + padding - k - 1) / stride + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Writes the columns of one band of `image` ([c, h, w]) into `cols`
/// ([patch, band plane]); rows in parallel when `parallel`.
fn im2col(g: &Geometry, image: &[f32], band: Band, cols: &mut [f32], parallel: bool) {
    if g.stride == 1 {
        return fill_columns(g, InputRows { data: image, first: 0, count: g.h }, band, cols, parallel);
    }
    let (first, end) = band_input_rows(g, band);
    with_scratch(&PHASES, g.c_in * (end - first) * g.w, |phases| {
        split_phases(g, image, (first, end), phases);
        fill_columns(g, InputRows { data: phases, first, count: end - first }, band, cols, parallel)
    })
}

/// Input rows `first..first + count` of every channel, as `data [c, count, w]`.
#[derive(Debug, Clone, Copy)]
struct InputRows<'a> {
    data: &'a [f32],
    first: usize,
    count: usize,
}

/// The input rows `first..end` that the kernel reads for `band`'s outputs.
fn band_input_rows(g: &Geometry, band: Band) -> (usize, usize) {
    let first = (band.first * g.stride).saturating_sub(g.padding);
    let end = ((band.first + band.rows - 1) * g.stride + g.kh).saturating_sub(g.padding).min(g.h);
    (first, end.max(first))
}

/// [`im2col`] from `source`: the image itself at stride 1; at larger
/// strides the rows the band reads, split into phases ([`split_phases`]).
fn fill_columns(g: &Geometry, source: InputRows, band: Band, cols: &mut [f32], parallel: bool) {
    let fill = |(row, dst): (usize, &mut [f32])| im2col_row(g, source, band, row, dst);
    if parallel {
        cols.par_chunks_mut(band.plane(g)).enumerate().for_each(fill);
    } else {
        cols.chunks_mut(band.plane(g)).enumerate().for_each(fill);
    }
}

/// Where column `x` of an input row sits once the row is split into
/// `stride` phases (columns `x % stride == 0` first, then `== 1`, ...):
/// a kernel tap of a strided convolution then reads a contiguous run, not
/// every `stride`-th value (that gather did not vectorise, and was most of
/// the stem convolution's im2col).
fn phase_index(w: usize, stride: usize, x: usize) -> usize {
    let phase = x % stride;
    // Columns in the earlier phases: ceil((w - p) / stride) for each p < phase.
    let before: usize = (0..phase).map(|p| (w - p).div_ceil(stride)).sum();
    before + x / stride
}

/// Copies input rows `first..end` of every channel of `image`, each split
/// into phases, into `phases` ([c, end - first, w]): only the rows one band
/// reads, so that the buffer is a band's size and not the image's (a
/// ResNet-50's 128-channel stride-2 layer at 800x1333 reads a 34 MB image).
fn split_phases(g: &Geometry, image: &[f32], (first, end): (usize, usize), phases: &mut [f32]) {
    let rows = end - first;
    for (src, dst) in image.chunks(g.h * g.w).zip(phases.chunks_mut(rows * g.w)) {
        for (y, dst) in (first..end).zip(dst.chunks_mut(g.w)) {
            split_row(&src[y * g.w..][..g.w], g.stride, dst);
        }
    }
}

/// `row` into `dst` split into `stride` phases: its columns `x % stride ==
/// 0` first, then `== 1`, ... (each column where [`phase_index`] puts it).
pub(super) fn split_row(row: &[f32], stride: usize, dst: &mut [f32]) {
    if stride == 2 {
        let (even, odd) = dst.split_at_mut(row.len().div_ceil(2));
        return split_pairs(row, even, odd);
    }
    let mut dst = dst.iter_mut();
    for phase in 0..stride.min(row.len()) {
        // The phase's values first: `zip` stops on them without taking a
        // slot of `dst`.
        for (&value, d) in row[phase..].iter().step_by(stride).zip(&mut dst) {
            *d = value;
        }
    }
}

/// [`split_row`] at stride 2 of `row` with `padding` zeros before it and
/// zeros after it up to `dst.len()` (the zero-bordered row, cut there),
/// without building that row: copying each input row into a zeroed buffer
/// first was a third of the Winograd input transform's time. `dst` holds at
/// least `padding` values.
pub(super) fn split_padded_row(row: &[f32], padding: usize, dst: &mut [f32]) {
    dst.fill(0.0);
    let row = &row[..row.len().min(dst.len().saturating_sub(padding))];
    let (even, odd) = dst.split_at_mut(dst.len().div_ceil(2));
    // Column x of `row` is column x + padding of the bordered row.
    if padding.is_multiple_of(2) {
        split_pairs(row, &mut even[padding / 2..], &mut odd[padding / 2..]);
    } else {
        split_pairs(row, &mut odd[padding / 2..], &mut even[padding / 2 + 1..]);
    }
}

/// `row`'s even-indexed values into `first` and odd-indexed ones into
/// `second`, in order. A pair at a time, so that the compiler vectorises
/// the de-interleave (a value at a time took 3% of the `bccd` recipe's
/// step, from the Winograd input transform).
fn split_pairs(row: &[f32], first: &mut [f32], second: &mut [f32]) {
    for ((pair, a), b) in row.chunks_exact(2).zip(first.iter_mut()).zip(second.iter_mut()) {
        (*a, *b) = (pair[0], pair[1]);
    }
    if let ([.., last], true) = (row, row.len() % 2 == 1) {
        first[row.len() / 2] = *last;
    }
}

/// Row `row` (one channel and kernel tap) of [`im2col`]'s columns, from
/// `source` as [`fill_columns`] has it.
fn im2col_row(g: &Geometry, source: InputRows, band: Band, row: usize, dst: &mut [f32]) {
    let plane = source.count * g.w;
    let (c, ki, kj) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
    let (y_lo, y_hi) = valid_range(g.out_h, g.h, ki, g.padding, g.stride);
    let (x_lo, x_hi) = valid_range(g.out_w, g.w, kj, g.padding, g.stride);
    let src = &source.data[c * plane..][..plane];
    // The first input column the tap reads, and where its run starts.
    let first = x_lo * g.stride + kj - g.padding;
    let start = if g.stride == 1 { first } else { phase_index(g.w, g.stride, first) };
    for (out_row, oy) in dst.chunks_mut(g.out_w).zip(band.first..) {
        if oy < y_lo || oy >= y_hi {
            out_row.fill(0.0);
            continue;
        }
        let iy = oy * g.stride + ki - g.padding - source.first;
        let src_row = &src[iy * g.w..][..g.w];
        out_row[..x_lo].fill(0.0);
        out_row[x_hi..].fill(0.0);
        let inside = &mut out_row[x_lo..x_hi];
        inside.copy_from_slice(&src_row[start..start + inside.len()]);
    }
}

/// Adds one band's columns `cols` ([patch, band plane]) back into the
/// image gradient `image` ([c, h, w]), the adjoint of [`im2col`].
fn col2im(g: &Geometry, cols: &[f32], band: Band, image: &mut [f32]) {
    let plane = g.h * g.w;
    let band_end = band.first + band.rows;
    for (c, dst) in image.chunks_mut(plane).enumerate() {
        for ki in 0..g.kh {
            let (y_lo, y_hi) = valid_range(g.out_h, g.h, ki, g.padding, g.stride);
            for kj in 0..g.kw {
                let (x_lo, x_hi) = valid_range(g.out_w, g.w, kj, g.padding, g.stride);
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &cols[row * band.plane(g)..][..band.plane(g)];
                for oy in y_lo.max(band.first)..y_hi.min(band_end) {
                    let iy = oy * g.stride + ki - g.padding;
                    let dst_row = &mut dst[iy * g.w..][..g.w];
                    let at = (oy - band.first) * g.out_w;
                    let values = &src[at + x_lo..at + x_hi];
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

/// Runs `f` on each (output item, input item) pair of the batch: on its own
/// thread per image when [`Geometry::per_thread`], else one after another.
fn for_each_image<F>(g: &Geometry, outs: &mut [f32], out_len: usize, ins: &[f32], in_len: usize, f: F)
where
    F: Fn(&mut [f32], &[f32]) + Sync,
{
    if g.per_thread() {
        outs.par_chunks_mut(out_len).zip(ins.par_chunks(in_len)).for_each(|(o, i)| f(o, i));
    } else {
        outs.chunks_mut(out_len).zip(ins.chunks(in_len)).for_each(|(o, i)| f(o, i));
    }
}

/// `out = conv(x, w)`, one image at a time: `out [co, plane] = W [co,
/// patch] x cols [patch, plane]`, band by band.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let (in_image, out_image, plane) = (g.c_in * g.h * g.w, g.c_out * g.out_plane(), g.out_plane());
    if winograd::applies(g) {
        return winograd::forward(g, x, w, out);
    }
    if direct::applies(g) {
        return direct::forward(g, x, w, out);
    }
    let parallelism = g.gemm_parallelism();
    let weights = (w, (g.patch(), 1));
    for_each_image(g, out, out_image, x, in_image, |dst, image| {
        if g.is_pointwise() {
            let shape = (g.c_out, plane, g.patch());
            return matmul(shape, (dst, plane), false, weights, (image, (plane, 1)), parallelism);
        }
        if let Some(bands) = g.bands_for_threads().filter(|_| !g.per_thread()) {
            return forward_bands_on_threads(g, image, w, bands.collect(), dst);
        }
        for band in g.bands() {
            with_columns(g.patch() * band.plane(g), |cols| {
                im2col(g, image, band, cols, !g.per_thread());
                let shape = (g.c_out, band.plane(g), g.patch());
                let dst = (&mut dst[band.offset(g)..], plane);
                matmul(shape, dst, false, weights, (cols, (band.plane(g), 1)), parallelism);
            })
        }
    });
}

/// [`forward`] of one image whose `bands` go to the threads in rounds of
/// one band each: a band's im2col and GEMM on one thread, into a buffer of
/// its own, copied into `dst` once the round is done. With fewer images
/// than threads (inference) the bands went one after another with every
/// thread on each im2col and GEMM, two hand-overs per band; a ResNet's
/// 64-channel 128x128 layer at batch 1 took 8.2 ms that way and 7.1 this
/// way (BENCHMARKS.md, 2026-12-03, Intel).
fn forward_bands_on_threads(g: &Geometry, image: &[f32], w: &[f32], bands: Vec<Band>, dst: &mut [f32]) {
    let plane = g.out_plane();
    for round in bands.chunks(threads()) {
        let outputs: Vec<Vec<f32>> = round
            .par_iter()
            .map(|&band| {
                with_columns(g.patch() * band.plane(g), |cols| {
                    im2col(g, image, band, cols, false);
                    let mut out = vec![0f32; g.c_out * band.plane(g)];
                    let shape = (g.c_out, band.plane(g), g.patch());
                    let cols = (&*cols, (band.plane(g), 1));
                    matmul(shape, (&mut out, band.plane(g)), false, (w, (g.patch(), 1)), cols, Parallelism::None);
                    out
                })
            })
            .collect();
        for (band, out) in round.iter().zip(&outputs) {
            for (channel, row) in out.chunks(band.plane(g)).enumerate() {
                dst[channel * plane + band.offset(g)..][..row.len()].copy_from_slice(row);
            }
        }
    }
}

/// `dx [n, c, h, w]` from `grad` and `w`, in a buffer zeroed only where
/// col2im sums patches into it: the other paths write each value once.
fn input_grad(g: &Geometry, grad: &[f32], w: &[f32]) -> Vec<f32> {
    let len = g.n * g.c_in * g.h * g.w;
    let mut dx = if input_grad_overwrites(g) {
        // SAFETY: on these paths `input_grad_into` writes every value
        // without reading one (checked by the tests'
        // `input_grad_writes_every_value_and_reads_none`).
        unsafe { uninit(len) }
    } else {
        zeroed(len)
    };
    input_grad_into(g, grad, w, &mut dx);
    dx
}

/// Whether [`input_grad_into`] writes every value of `dx` rather than
/// summing into it: all paths but col2im's.
fn input_grad_overwrites(g: &Geometry) -> bool {
    winograd::applies(g) || direct::applies_to_input_grad(g) || g.is_pointwise()
}

/// `dx` from `grad` and `w`, one image at a time: `dcols [patch, plane] =
/// W^T x grad [co, plane]`, then col2im, band by band.
fn input_grad_into(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    let (in_image, out_image, plane) = (g.c_in * g.h * g.w, g.c_out * g.out_plane(), g.out_plane());
    if winograd::applies(g) {
        return winograd::input_grad(g, grad, w, dx);
    }
    if direct::applies_to_input_grad(g) {
        return direct::input_grad(g, grad, w, dx);
    }
    let parallelism = g.gemm_parallelism();
    let weights_t = (w, (1, g.patch())); // W is [co, patch] row-major.
    for_each_image(g, dx, in_image, grad, out_image, |dst, grad| {
        if g.is_pointwise() {
            let shape = (g.patch(), plane, g.c_out);
            return matmul(shape, (dst, plane), false, weights_t, (grad, (plane, 1)), parallelism);
        }
        for band in g.bands() {
            with_columns(g.patch() * band.plane(g), |cols| {
                let shape = (g.patch(), band.plane(g), g.c_out);
                let grad_band = (&grad[band.offset(g)..], (plane, 1));
                matmul(shape, (&mut *cols, band.plane(g)), false, weights_t, grad_band, parallelism);
                col2im(g, cols, band, dst);
            })
        }
    });
}

/// `dw [co, patch] = sum over images and bands of grad [co, band] x
/// cols^T [band, patch]`.
fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    if winograd::applies(g) {
        return winograd::weight_grad(g, x, grad);
    }
    if direct::applies(g) {
        return direct::weight_grad(g, x, grad);
    }
    let (in_image, out_image, plane) = (g.c_in * g.h * g.w, g.c_out * g.out_plane(), g.out_plane());
    let parallelism = g.gemm_parallelism();
    let run = |(images, grads): (&[f32], &[f32])| {
        let mut dw = vec![0f32; g.c_out * g.patch()];
        let mut first = true;
        let parallel = (parallelism, !g.per_thread());
        for (image, grad) in images.chunks(in_image).zip(grads.chunks(out_image)) {
            if g.is_pointwise() {
                // The image's positions in runs that fit [`BAND_COLUMNS`].
                let positions = (BAND_COLUMNS / g.patch()).clamp(1, plane.max(1));
                for start in (0..plane).step_by(positions) {
                    let shape = (g.c_out, g.patch(), positions.min(plane - start));
                    let (grad, image) = ((&grad[start..], (plane, 1)), (&image[start..], plane));
                    matmul_by_transposed(shape, (&mut dw, g.patch()), !first, grad, image, parallel);
                    first = false;
                }
                continue;
            }
            for band in g.bands() {
                with_columns(g.patch() * band.plane(g), |cols| {
                    im2col(g, image, band, cols, !g.per_thread());
                    let shape = (g.c_out, g.patch(), band.plane(g));
                    let grad_band = (&grad[band.offset(g)..], (plane, 1));
                    let cols = (&*cols, band.plane(g));
                    matmul_by_transposed(shape, (&mut dw, g.patch()), !first, grad_band, cols, parallel);
                });
                first = false;
            }
        }
        dw
    };
    sum_over_image_runs(g, x, grad, g.c_out * g.patch(), run)
}

/// `run` on each thread's fixed run of (images, gradients) when
/// [`Geometry::per_thread`], else on the whole batch, and the sum of what
/// the runs return (`len` floats each). The partial sums are added in
/// order, so the result does not depend on scheduling (training stays
/// reproducible).
fn sum_over_image_runs<F>(g: &Geometry, x: &[f32], grad: &[f32], len: usize, run: F) -> Vec<f32>
where
    F: Fn((&[f32], &[f32])) -> Vec<f32> + Sync,
{
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    let partials: Vec<Vec<f32>> = if g.per_thread() {
        let per_task = g.n.div_ceil(threads().max(1));
        x.par_chunks(per_task * in_image).zip(grad.par_chunks(per_task * out_image)).map(&run).collect()
    } else {
        vec![run((x, grad))]
    };
    let mut partials = partials.into_iter();
    let mut sum = partials.next().unwrap_or_else(|| vec![0f32; len]);
    for partial in partials {
        sum.iter_mut().zip(&partial).for_each(|(a, b)| *a += b);
    }
    sum
}

/// `out = conv(x, w)`; arguments `x [n, c, h, w]`, `w [co, c, kh, kw]`.
struct ConvForward(Geometry);

impl CustomOp2 for ConvForward {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let (x, w) = (f32_data(xs, xl, "conv2d input")?, f32_data(ws, wl, "conv2d weight")?);
        // SAFETY: `forward` writes every output value without reading one
        // (checked by the tests' `forward_writes_every_output_and_reads_none`).
        let mut out = unsafe { uninit(g.n * g.c_out * g.out_plane()) };
        forward(g, x, w, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c_out, g.out_h, g.out_w))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward(self.0, x, w, grad)
    }
}

/// The gradients of `x` and `w` from the output's, each where the graph
/// needs it: the stem's input is the image batch, and frozen layers have
/// constant weights.
pub(super) fn backward(g: Geometry, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let dx = x.track_op().then(|| grad.apply_op2_no_bwd(w, &ConvInputGrad(g))).transpose()?;
    let dw = w.track_op().then(|| x.apply_op2_no_bwd(&grad, &ConvWeightGrad(g))).transpose()?;
    Ok((dx, dw))
}

/// `out = conv(x, w) + bias[co]`, then a ReLU when `with_relu`, as one
/// graph node (training); arguments `x [n, c, h, w]`, `w [co, c, kh, kw]`,
/// `bias [co]`. As two nodes, Candle's backward zero-filled and added a
/// gradient for the product's output on one thread, for every convolution
/// of the heads and the FPN (BENCHMARKS.md, 2026-12-03, Intel).
struct ConvBiasForward {
    geometry: Geometry,
    with_relu: bool,
}

impl CustomOp3 for ConvBiasForward {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias"
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
        let g = &self.geometry;
        let (x, w) = (f32_data(xs, xl, "conv2d input")?, f32_data(ws, wl, "conv2d weight")?);
        let bias = f32_data(bs, bl, "conv2d bias")?;
        if bias.len() != g.c_out {
            candle_core::bail!("conv2d: {} bias values for {} output channels", bias.len(), g.c_out);
        }
        // SAFETY: as in `ConvForward`.
        let mut out = unsafe { uninit(g.n * g.c_out * g.out_plane()) };
        forward(g, x, w, &mut out);
        add_channel_bias_in_place(&mut out, bias, g.out_plane(), self.with_relu);
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c_out, g.out_h, g.out_w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad, dbias) = channel_bias_grads(self.with_relu, bias, y, grad)?;
        let (dx, dw) = backward(self.geometry, x, w, &grad)?;
        Ok((dx, dw, dbias))
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
        let (grad, w) = (f32_data(gs, gl, "conv2d gradient")?, f32_data(ws, wl, "conv2d weight")?);
        let dx = input_grad(g, grad, w);
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
        let (x, grad) = (f32_data(xs, xl, "conv2d input")?, f32_data(gs, gl, "conv2d gradient")?);
        let shape = Shape::from((g.c_out, g.c_in, g.kh, g.kw));
        Ok((CpuStorage::F32(weight_grad(g, x, grad)), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::probed_gradients;
    use candle_core::{Device, Var};

    /// Each column lands where `phase_index` says, for every stride the
    /// kernels use and odd and even widths.
    #[test]
    fn split_row_puts_columns_at_their_phase_index() {
        for stride in 1..=4 {
            for w in 0..10 {
                let row: Vec<f32> = (0..w).map(|x| x as f32).collect();
                let mut split = vec![-1f32; w];
                split_row(&row, stride, &mut split);
                for x in 0..w {
                    assert_eq!(split[phase_index(w, stride, x)], x as f32, "stride {stride}, width {w}, column {x}");
                }
            }
        }
    }

    /// The same values as [`split_row`] of the bordered row built in full,
    /// for every padding the kernels use, rows cut by the border or not.
    #[test]
    fn split_padded_row_matches_splitting_the_bordered_row() {
        for padding in 0..4 {
            for w in 0..9 {
                for len in padding..w + 2 * padding + 3 {
                    let row: Vec<f32> = (1..=w).map(|x| x as f32).collect();
                    let mut bordered = vec![0f32; len];
                    let width = w.min(len - padding);
                    bordered[padding..][..width].copy_from_slice(&row[..width]);
                    let mut expected = vec![-1f32; len];
                    split_row(&bordered, 2, &mut expected);
                    let mut split = vec![-1f32; len];
                    split_padded_row(&row, padding, &mut split);
                    assert_eq!(split, expected, "padding {padding}, width {w}, length {len}");
                }
            }
        }
    }

    /// Forward and both gradients equal Candle's reference convolution on
    /// random shapes: stride 1 and 2, padding, 1x1, 7x7, non-square.
    #[test]
    fn matches_candle_forward_and_gradients() -> Result<()> {
        let cases = [
            (2, 3, 9, 12, 4, 3, 1, 1),
            (2, 3, 9, 12, 4, 3, 1, 2),
            (3, 5, 6, 7, 2, 1, 0, 1),
            (1, 5, 6, 7, 2, 1, 0, 1),
            (2, 4, 8, 6, 3, 1, 0, 2),
            (1, 3, 17, 13, 5, 7, 3, 2),
            (2, 2, 2, 3, 3, 3, 1, 2),
            (2, 3, 7, 9, 4, 1, 0, 2),
            (1, 2, 11, 10, 3, 3, 1, 3),
        ];
        for (n, c, h, w, co, k, p, s) in cases {
            check_against_candle((n, c, h, w), (co, c, k, k), p, s)?;
        }
        Ok(())
    }

    /// Our convolution's forward and both gradients against Candle's on
    /// random values.
    fn check_against_candle(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        p: usize,
        s: usize,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x_var = Var::from_tensor(&Tensor::randn(0f32, 1., x, &dev)?)?;
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1., w, &dev)?)?;
        let y = conv2d(x_var.as_tensor(), weight.as_tensor(), p, s)?;
        let geometry = Geometry::new(x, w, p, s)?;
        forward_writes_every_output_and_reads_none(&geometry, x_var.as_tensor(), weight.as_tensor())?;
        input_grad_writes_every_value_and_reads_none(&geometry, &y, weight.as_tensor())?;
        let reference = candle_conv2d(x_var.as_tensor(), weight.as_tensor(), p, s)?;
        assert_eq!(y.dims(), reference.dims());
        let what = format!("input {x:?} weight {w:?} p{p} s{s}");
        assert_close(&y, &reference, &format!("{what} forward"))?;
        let (ours, theirs) = probed_gradients(&y, &reference)?;
        for (var, name) in [(&x_var, "input"), (&weight, "weight")] {
            let (a, b) = (ours.get(var.as_tensor()), theirs.get(var.as_tensor()));
            assert_close(a.expect("gradient"), b.expect("gradient"), &format!("{what} {name} gradient"))?;
        }
        Ok(())
    }

    /// `forward` on an output buffer of NaNs gives the bits it gives on one
    /// of zeros: it writes every value and reads none, as the ops that hand
    /// it an uninitialised buffer ([`uninit`]) need. Run by
    /// `check_against_candle`, so on every path the tests here take.
    fn forward_writes_every_output_and_reads_none(g: &Geometry, x: &Tensor, w: &Tensor) -> Result<()> {
        let (x, w) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
        assert_overwrites(g.n * g.c_out * g.out_plane(), &format!("{g:?}: the output"), |out| forward(g, &x, &w, out));
        Ok(())
    }

    /// `write` on a buffer of `len` NaNs gives the bits it gives on zeros.
    fn assert_overwrites(len: usize, what: &str, write: impl Fn(&mut [f32])) {
        let (mut on_zeros, mut on_nans) = (vec![0f32; len], vec![f32::NAN; len]);
        write(&mut on_zeros);
        write(&mut on_nans);
        let same = on_zeros.iter().zip(&on_nans).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what} depends on what the buffer held");
    }

    /// The same of `input_grad_into` on the paths that [`uninit`] serves
    /// (`input_grad_overwrites`), with `like_grad`'s shape for the output
    /// gradient.
    fn input_grad_writes_every_value_and_reads_none(g: &Geometry, like_grad: &Tensor, w: &Tensor) -> Result<()> {
        if !input_grad_overwrites(g) {
            return Ok(());
        }
        let grad = Tensor::randn(0f32, 1., like_grad.shape(), &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        let what = format!("{g:?}: the input gradient");
        assert_overwrites(g.n * g.c_in * g.h * g.w, &what, |dx| input_grad_into(g, &grad, &w, dx));
        Ok(())
    }

    /// The Winograd path (3x3, stride 1, 128 channels and more, 16x16
    /// outputs and more) against Candle's convolution: padding 0, 1 and 2,
    /// odd sizes (tiles cropped at the edges), one image (parallel GEMMs)
    /// and several (one per thread), and an image tall enough for several
    /// bands of tiles.
    #[test]
    fn winograd_matches_candle_forward_and_gradients() -> Result<()> {
        let cases = [
            (2, 128, 17, 20, 130, 1),
            (1, 129, 19, 18, 128, 0),
            (3, 128, 16, 17, 144, 2),
            (1, 128, 16, 16, 128, 1),
            (1, 128, 120, 64, 128, 1),
        ];
        for (n, c, h, w, co, p) in cases {
            let g = Geometry::new((n, c, h, w), (co, c, 3, 3), p, 1)?;
            assert!(winograd::applies(&g), "{g:?}");
            check_against_candle((n, c, h, w), (co, c, 3, 3), p, 1)?;
        }
        Ok(())
    }

    /// The direct path against Candle's convolution: channel counts that
    /// leave a partial block, 3x3 with padding 0, 1 and 2 (the input
    /// gradient only where the input rows are whole vectors), 5x5, the
    /// stem's 7x7/2 and a 3x3/2 (forward and weight gradient; their input
    /// gradient is im2col's), one image (channel groups on every thread)
    /// and several, odd heights, and a plane tall enough for several bands.
    #[test]
    fn direct_matches_candle_forward_and_gradients() -> Result<()> {
        let cases = [
            ((2, 5, 16, 16), (7, 3, 1, 1), true),
            ((1, 64, 64, 64), (4, 3, 1, 1), true),
            ((3, 3, 9, 24), (5, 3, 1, 1), true),
            ((1, 16, 8, 8), (1, 3, 1, 1), true),
            ((2, 4, 10, 10), (3, 3, 0, 1), false),
            ((1, 4, 7, 6), (2, 3, 2, 1), false),
            ((2, 3, 8, 8), (4, 5, 2, 1), false),
            ((2, 3, 16, 16), (5, 7, 3, 2), false),
            ((3, 3, 33, 32), (16, 7, 3, 2), false),
            ((2, 6, 15, 16), (4, 3, 1, 2), false),
            ((1, 5, 17, 17), (2, 3, 0, 2), false),
        ];
        if !direct::has_avx2_fma() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return Ok(());
        }
        for ((n, c, h, w), (co, k, p, s), backward_too) in cases {
            let g = Geometry::new((n, c, h, w), (co, c, k, k), p, s)?;
            assert!(direct::applies(&g), "{g:?}");
            assert_eq!(direct::applies_to_input_grad(&g), backward_too, "{g:?}");
            assert!(!winograd::applies(&g));
            check_against_candle((n, c, h, w), (co, c, k, k), p, s)?;
        }
        Ok(())
    }

    /// The product, bias and ReLU as one node against the product and
    /// `elementwise`'s bias op as two: the same output and gradients to
    /// the bit, with and without the ReLU, for a trained bias and for a
    /// constant one (a frozen BatchNorm's, folded).
    #[test]
    fn bias_in_the_product_matches_the_bias_op() -> Result<()> {
        use crate::ops::elementwise::{add_channel_bias, add_channel_bias_relu};
        let dev = Device::Cpu;
        for (with_relu, bias_trains) in [(false, true), (true, true), (true, false)] {
            let x = Var::randn(0f32, 1., (2, 6, 9, 11), &dev)?;
            let w = Var::randn(0f32, 0.3, (5, 6, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1., 5, &dev)?;
            let b = if bias_trains { Var::from_tensor(&b)?.as_tensor().clone() } else { b };
            let conv = Conv2d::new(w.as_tensor().clone(), Some(b.clone()), 1, 2);
            let fused = conv.forward_maybe_relu(x.as_tensor(), with_relu)?;
            let product = conv2d(x.as_tensor(), w.as_tensor(), 1, 2)?;
            let two = if with_relu { add_channel_bias_relu(&product, &b)? } else { add_channel_bias(&product, &b)? };
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
            };
            let what = format!("relu {with_relu}, bias trains {bias_trains}");
            assert_eq!(bits(&fused)?, bits(&two)?, "output, {what}");
            let (ours, theirs) = probed_gradients(&fused, &two)?;
            for (t, name) in [(x.as_tensor(), "input"), (w.as_tensor(), "weight")] {
                let (a, b) = (ours.get(t).expect("gradient"), theirs.get(t).expect("reference gradient"));
                assert_eq!(bits(a)?, bits(b)?, "{name} gradient, {what}");
            }
            match bias_trains {
                true => {
                    assert_eq!(bits(ours.get(&b).expect("bias gradient"))?, bits(theirs.get(&b).expect("reference"))?)
                }
                false => assert!(ours.get(&b).is_none(), "a gradient for a constant bias"),
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
    fn bands_and_single_images_keep_results() -> Result<()> {
        // 32 * 9 * 64 floats per output row: 113 rows do not fit one band,
        // so the image is cut into several (the last one shorter), and one
        // image takes the parallel-GEMM path. Gradients too.
        let g = Geometry::new((1, 32, 113, 64), (4, 32, 3, 3), 1, 1)?;
        let bands: Vec<Band> = g.bands().collect();
        assert!(bands.len() > 1);
        assert_eq!(bands.iter().map(|b| b.rows).sum::<usize>(), g.out_h);
        for n in [1, 3] {
            check_against_candle((n, 32, 113, 64), (4, 32, 3, 3), 1, 1)?;
        }
        // Spread over the threads (one image, two threads or more), the
        // bands give every thread one and still cover every row; at stride
        // 2 each band splits only the input rows it reads.
        if let Some(spread) = g.bands_for_threads() {
            let spread: Vec<Band> = spread.collect();
            assert!(spread.len() >= threads());
            assert_eq!(spread.iter().map(|b| b.rows).sum::<usize>(), g.out_h);
        }
        let strided = Geometry::new((1, 64, 226, 128), (8, 64, 3, 3), 1, 2)?;
        assert!(strided.bands().count() > 1 && !direct::applies(&strided));
        check_against_candle((1, 64, 226, 128), (8, 64, 3, 3), 1, 2)?;
        // A 1x1 convolution's weight gradient takes the image's positions
        // in runs of BAND_COLUMNS / 1024 = 1024: 33x33 makes two.
        check_against_candle((2, 1024, 33, 33), (4, 1024, 1, 1), 0, 1)
    }
}
