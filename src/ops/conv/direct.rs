//! Direct convolution for narrow layers on small planes, with AVX2 and FMA:
//! the forward and the weight gradient of 3x3 to 7x7 kernels at stride 1
//! or 2 (the stem's 7x7/2 included), and the input gradient of 3x3
//! stride-1 ones, summed straight from the padded input, with no im2col
//! columns and no col2im. At stride 2 each padded row is split into its
//! even and odd columns, so every tap reads 8 consecutive floats.
//!
//! Why by hand: at 16-64 channels im2col writes nine copies of the input
//! and the `gemm` crate packs them again for products only 16-64 rows tall:
//! a 64-channel 16x16 convolution ran at 2/3 of torch's speed, a 16-channel
//! 32x32 one at half (oneDNN computes these directly too). No crate offers
//! a direct convolution over Candle's NCHW buffers.
//!
//! - Forward: a micro-tile is [`CHANNELS`] output channels by [`VECTORS`]
//!   vectors of 8 outputs (9 accumulators: 3x3 ran faster on AVX2 machines
//!   than 4x3, whose 16 live registers spilled, or 2x6, which loads more).
//! - Input gradient: for a 3x3 stride-1 convolution with padding `p`, the
//!   output gradient convolved with the kernel flipped and its channel axes
//!   swapped, with padding `2 - p`: the same micro-tiles.
//! - Weight gradient: for [`CHANNELS`] output channels, one input channel
//!   and three taps of one kernel row, 3x3 vectors of products summed over
//!   every output position, then across lanes.
//!
//! Every sum runs in a fixed order, so results do not depend on threads.
//! Wide 3x3 layers go to Winograd (`winograd.rs`); other kernels, large
//! planes, strided input gradients and CPUs without AVX2 to im2col and GEMM.

use rayon::prelude::*;

use super::{phase_index, split_row, threads, Geometry};

/// Output channels per micro-tile.
const CHANNELS: usize = 3;
/// Output vectors of [`LANES`] columns per micro-tile.
const VECTORS: usize = 3;
/// f32 lanes of an AVX2 register.
const LANES: usize = 8;
/// Kernel columns per weight-gradient pass.
const COLUMNS: usize = 3;
/// Most f32 values of the padded input rows one band of output rows reads
/// (256 KiB: the band stays in L2 while every channel block passes over it).
const BAND_INPUT: usize = 1 << 16;

/// Largest output planes that take this path. On larger ones a micro-tile's
/// windows over 64 channels no longer stay in L1, and im2col with GEMM was
/// faster (64 channels 128x128 n2: 69 ms against 55; 64x64 n8: 40 against 51).
const MAX_PLANE: usize = 64 * 64;

/// Whether [`forward`] and [`weight_grad`] can compute this convolution: a
/// square 3x3, 5x5 or 7x7 kernel, stride 1 or 2, padding smaller than the
/// kernel, output rows a whole number of vectors, a plane of at most
/// [`MAX_PLANE`], and a CPU with AVX2 and FMA.
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == g.kw && matches!(g.kh, 3 | 5 | 7) && matches!(g.stride, 1 | 2) && g.padding < g.kh;
    let sizes = g.n * g.c_in * g.c_out * g.out_h > 0 && g.out_w > 0 && g.out_w.is_multiple_of(LANES);
    shape && sizes && g.out_plane() <= MAX_PLANE && has_avx2_fma()
}

/// Whether [`input_grad`] can compute this convolution's input gradient:
/// 3x3, stride 1, padding at most 2, and the gradient's convolution [`applies`].
pub(super) fn applies_to_input_grad(g: &Geometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2 && applies(&gradient_geometry(g))
}

#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_avx2_fma() -> bool {
    false
}

/// The convolution that gives a 3x3 stride-1 convolution's input gradient:
/// the output gradient `[n, co, out_h, out_w]` in, `[n, c, h, w]` out,
/// padding `2 - p`.
fn gradient_geometry(g: &Geometry) -> Geometry {
    Geometry::new((g.n, g.c_out, g.out_h, g.out_w), (g.c_in, g.c_out, 3, 3), 2 - g.padding, 1)
        .expect("the gradient's convolution has the input's size")
}

/// `out [n, co, out_h, out_w] = conv(x, w)` for a convolution that [`applies`].
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let taps = g.kh * g.kw;
    let packed = pack_weights(g, g.c_out, g.c_in, |o, i, tap| w[(o * g.c_in + i) * taps + tap]);
    convolve(g, x, &packed, out);
}

/// `dx [n, c, h, w]` from `grad [n, co, out_h, out_w]` for a convolution
/// whose input gradient [`applies_to_input_grad`].
pub(super) fn input_grad(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    // Kernel (input channel i, output channel o) of the gradient's
    // convolution: w[o][i] flipped (tap 8 - tap).
    let transposed = gradient_geometry(g);
    let packed = pack_weights(&transposed, g.c_in, g.c_out, |i, o, tap| w[(o * g.c_in + i) * 9 + 8 - tap]);
    convolve(&transposed, grad, &packed, dx);
}

/// How a convolution reads its prepared input ([`prepare`]): strides, and
/// where each tap sits relative to an output vector's first read.
#[derive(Debug, Clone)]
struct Reads {
    /// Padded input row length.
    wp: usize,
    /// Floats in one padded input channel.
    in_plane: usize,
    /// Offset of each tap `ky * k + kx` from the read of its output vector.
    taps: Vec<usize>,
    /// The largest of `taps`.
    last_tap: usize,
}

impl Reads {
    fn new(g: &Geometry) -> Self {
        let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
        let column = |kx: usize| phase_index(wp, g.stride, kx);
        let taps: Vec<usize> = (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| ky * wp + column(kx))).collect();
        let last_tap = taps.iter().copied().max().unwrap_or(0);
        Self { wp, in_plane: hp * wp, taps, last_tap }
    }

    /// Where the output vector at row `y`, column `x` starts reading.
    fn read(&self, g: &Geometry, y: usize, x: usize) -> usize {
        y * g.stride * self.wp + x
    }
}

/// The images `x` with their zero border, `[images, c, h + 2p, w + 2p]`,
/// each row split into `stride` phases (`conv::phase_index`), in parallel.
fn prepare(g: &Geometry, x: &[f32]) -> Vec<f32> {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let mut padded = vec![0f32; x.len() / (g.h * g.w) * hp * wp];
    padded.par_chunks_mut(hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
        let mut row_buffer = vec![0f32; if g.stride == 1 { 0 } else { wp }];
        for (y, row) in src.chunks(g.w).enumerate() {
            let dst = &mut dst[(y + g.padding) * wp..][..wp];
            if g.stride == 1 {
                dst[g.padding..][..g.w].copy_from_slice(row);
                continue;
            }
            row_buffer[g.padding..][..g.w].copy_from_slice(row);
            split_row(&row_buffer, g.stride, dst);
        }
    });
    padded
}

/// `dw [co, c, k, k]` of a convolution that [`applies`], from its input `x`
/// and output gradient `grad`: for each output channel block, input channel
/// and three taps of a kernel row, vectors of products summed over every
/// output position of a run of images, then across the vector's lanes.
/// Runs of images as the GEMM path splits them, their sums added in order.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let kernel = g.c_in * g.kh * g.kw;
    let reads = Reads::new(g);
    let run = |(images, grads): (&[f32], &[f32])| {
        let prepared = prepare(g, images);
        let mut dw = vec![0f32; g.c_out * kernel];
        dw.par_chunks_mut(CHANNELS * kernel).enumerate().for_each(|(block, dw)| {
            weight_grad_block(g, &reads, &prepared, grads, block * CHANNELS, dw);
        });
        dw
    };
    super::sum_over_image_runs(g, x, grad, g.c_out * kernel, run)
}

/// Rows `dw [first.., c, k, k]` (as many output channels as it holds, at
/// most [`CHANNELS`]) from a run of prepared images and their gradients.
fn weight_grad_block(g: &Geometry, reads: &Reads, prepared: &[f32], grads: &[f32], first: usize, dw: &mut [f32]) {
    let k = g.kw;
    let (out_plane, out_image) = (g.out_plane(), g.c_out * g.out_plane());
    let images = grads.len() / out_image;
    let channels = dw.len() / (g.c_in * k * k);
    let in_image = g.c_in * reads.in_plane;
    // The last read: the last image's last channel, the last output
    // vector's read and its last tap.
    let last = (images.max(1) - 1) * in_image
        + (g.c_in - 1) * reads.in_plane
        + reads.read(g, g.out_h - 1, g.out_w - LANES)
        + reads.last_tap;
    assert!(prepared.len() >= last + LANES && grads.len() == images * out_image, "direct conv: input too short");
    assert!(channels >= 1 && first + channels <= g.c_out && has_avx2_fma());
    // A block short of CHANNELS reads its last channel again for the
    // missing ones and drops their sums.
    let planes: [usize; CHANNELS] = std::array::from_fn(|o| (first + o.min(channels - 1)) * out_plane);
    let strides = Strides {
        images,
        in_image,
        out_image,
        rows: g.out_h,
        vectors: g.out_w / LANES,
        row_step: g.stride * reads.wp,
        out_w: g.out_w,
    };
    for i in 0..g.c_in {
        for ky in 0..k {
            for kx in (0..k).step_by(COLUMNS) {
                // Three taps of row ky from kx; past the row's end the last
                // one again, its sums dropped.
                let columns: [usize; COLUMNS] = std::array::from_fn(|j| {
                    let tap = ky * k + (kx + j).min(k - 1);
                    i * reads.in_plane + reads.taps[tap]
                });
                // SAFETY: the asserts above keep every read inside
                // `prepared` and `grads`, and the CPU has the kernel's
                // features.
                #[cfg(target_arch = "x86_64")]
                let sums = unsafe { avx2::weight_grad_taps(prepared, grads, columns, planes, strides) };
                #[cfg(not(target_arch = "x86_64"))]
                let sums = [[0f32; COLUMNS]; CHANNELS];
                let count = COLUMNS.min(k - kx);
                for (o, row) in sums.iter().enumerate().take(channels) {
                    dw[(o * g.c_in + i) * k * k + ky * k + kx..][..count].copy_from_slice(&row[..count]);
                }
            }
        }
    }
}

/// The loop bounds and strides of a weight-gradient pass.
#[derive(Debug, Clone, Copy)]
struct Strides {
    images: usize,
    /// Floats in one prepared input image.
    in_image: usize,
    /// Floats in one output gradient image.
    out_image: usize,
    rows: usize,
    /// Output vectors per row.
    vectors: usize,
    /// Input floats from one output row's reads to the next one's.
    row_step: usize,
    out_w: usize,
}

/// The kernels `kernel(out channel, in channel, tap)` of a convolution with
/// `g`'s kernel size as `[out block, in channel, tap, CHANNELS]`, the
/// output channels rounded up to whole blocks with zeros: a micro-tile
/// reads its weights in order.
fn pack_weights(
    g: &Geometry,
    c_out: usize,
    c_in: usize,
    kernel: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let mut packed = vec![0f32; c_out.div_ceil(CHANNELS) * c_in * taps * CHANNELS];
    packed.par_chunks_mut(c_in * taps * CHANNELS).enumerate().for_each(|(block, dst)| {
        for o in block * CHANNELS..(block * CHANNELS + CHANNELS).min(c_out) {
            for i in 0..c_in {
                for tap in 0..taps {
                    dst[(i * taps + tap) * CHANNELS + o % CHANNELS] = kernel(o, i, tap);
                }
            }
        }
    });
    packed
}

/// `out = conv(x, packed)`: tasks of one image and a group of output
/// channel blocks (enough of them to keep every thread busy), each going
/// band by band over the output rows and, within a band, block by block.
fn convolve(g: &Geometry, x: &[f32], packed: &[f32], out: &mut [f32]) {
    let prepared = prepare(g, x);
    let reads = Reads::new(g);
    let (in_image, out_image) = (g.c_in * reads.in_plane, g.c_out * g.out_plane());
    let block_len = g.c_in * reads.taps.len() * CHANNELS;
    let blocks = g.c_out.div_ceil(CHANNELS);
    let groups = (2 * threads()).div_ceil(g.n).clamp(1, blocks);
    let group_channels = blocks.div_ceil(groups) * CHANNELS;
    out.par_chunks_mut(out_image).zip(prepared.par_chunks(in_image)).for_each(|(dst, image)| {
        dst.par_chunks_mut(group_channels * g.out_plane()).enumerate().for_each(|(group, dst)| {
            let first_block = group * group_channels / CHANNELS;
            convolve_group(g, &reads, image, &packed[first_block * block_len..], dst);
        })
    });
}

/// Output channels `dst [channels, out_h, out_w]` of one prepared image,
/// from their packed kernels.
fn convolve_group(g: &Geometry, reads: &Reads, image: &[f32], packed: &[f32], dst: &mut [f32]) {
    let plane = g.out_plane();
    let channels = dst.len() / plane;
    let block_len = g.c_in * reads.taps.len() * CHANNELS;
    let band_rows = (BAND_INPUT / (g.c_in * reads.wp * g.stride)).saturating_sub(g.kh).clamp(1, g.out_h);
    let vectors_per_row = g.out_w / LANES;
    for first_row in (0..g.out_h).step_by(band_rows) {
        let rows = band_rows.min(g.out_h - first_row);
        // Output vectors of the band, as (offset in the prepared plane of
        // the first read, offset in the output plane).
        let vectors: Vec<(usize, usize)> = (first_row * vectors_per_row..(first_row + rows) * vectors_per_row)
            .map(|v| {
                let (y, x) = (v / vectors_per_row, v % vectors_per_row * LANES);
                (reads.read(g, y, x), y * g.out_w + x)
            })
            .collect();
        for block in 0..channels.div_ceil(CHANNELS) {
            let weights = &packed[block * block_len..][..block_len];
            let block_out = &mut dst[block * CHANNELS * plane..];
            for tile in vectors.chunks(VECTORS) {
                micro_tile(g, reads, image, weights, tile, block_out);
            }
        }
    }
}

/// One micro-tile: up to [`CHANNELS`] output channels (as many as `out`
/// holds planes for) at the output vectors `tile`.
fn micro_tile(g: &Geometry, reads: &Reads, image: &[f32], weights: &[f32], tile: &[(usize, usize)], out: &mut [f32]) {
    let plane = g.out_plane();
    let channels = (out.len() / plane).min(CHANNELS);
    // Every read stays inside the image: the last tap of the last channel,
    // and every write inside `out`.
    let (last_read, last_write) = tile.iter().fold((0, 0), |(r, w), &(a, b)| (r.max(a), w.max(b)));
    let last = g.c_in.saturating_sub(1) * reads.in_plane + last_read + reads.last_tap;
    assert!(image.len() >= last + LANES, "direct conv: input too short");
    assert!(out.len() >= channels.saturating_sub(1) * plane + last_write + LANES, "direct conv: output too short");
    assert!(weights.len() >= g.c_in * reads.taps.len() * CHANNELS, "direct conv: weights too short");
    assert!(tile.len() <= VECTORS && has_avx2_fma());
    let planes = Planes { c_in: g.c_in, in_plane: reads.in_plane, out_plane: plane, channels };
    // SAFETY: the asserts above bound every offset the kernel reads and
    // writes, and the CPU has the features the kernel is compiled for.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match reads.taps.len() {
            9 => tile_of::<9>(image, weights, &reads.taps, tile, out, planes),
            25 => tile_of::<25>(image, weights, &reads.taps, tile, out, planes),
            49 => tile_of::<49>(image, weights, &reads.taps, tile, out, planes),
            _ => unreachable!("direct conv: kernels are 3x3, 5x5 or 7x7"),
        }
    }
}

/// [`avx2::tile`] for a tile of 1 to [`VECTORS`] vectors and `T` taps.
///
/// # Safety
/// As for [`avx2::tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_of<const T: usize>(
    image: &[f32],
    weights: &[f32],
    taps: &[usize],
    tile: &[(usize, usize)],
    out: &mut [f32],
    planes: Planes,
) {
    let taps: &[usize; T] = taps.try_into().expect("tap count");
    match *tile {
        [a, b, c] => avx2::tile(image, weights, taps, [a, b, c], out, planes),
        [a, b] => avx2::tile(image, weights, taps, [a, b], out, planes),
        [a] => avx2::tile(image, weights, taps, [a], out, planes),
        _ => {}
    }
}

/// Strides a micro-tile walks.
#[derive(Debug, Clone, Copy)]
struct Planes {
    c_in: usize,
    /// Floats in one prepared input channel.
    in_plane: usize,
    /// Floats in one output channel.
    out_plane: usize,
    /// Output channels to write (at most [`CHANNELS`]).
    channels: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Planes, Strides, CHANNELS, COLUMNS, LANES};

    /// `out[o][w + 0..8] = sum over i and t of weights[i][t][o]
    /// * image[i][r + taps[t] + 0..8]` for each vector `(r, w)` of
    /// `vectors` and each output channel `o < p.channels`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and every offset named above lies inside
    /// its slice (the caller asserts both).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const T: usize, const P: usize>(
        image: &[f32],
        weights: &[f32],
        taps: &[usize; T],
        vectors: [(usize, usize); P],
        out: &mut [f32],
        p: Planes,
    ) {
        let mut acc = [[_mm256_setzero_ps(); P]; CHANNELS];
        let mut inputs = [_mm256_setzero_ps(); P];
        for i in 0..p.c_in {
            let channel = image.as_ptr().add(i * p.in_plane);
            let kernel = weights.as_ptr().add(i * T * CHANNELS);
            for (t, &tap) in taps.iter().enumerate() {
                for (input, &(read, _)) in inputs.iter_mut().zip(&vectors) {
                    *input = _mm256_loadu_ps(channel.add(read + tap));
                }
                let tap_weights = kernel.add(t * CHANNELS);
                for (o, row) in acc.iter_mut().enumerate() {
                    let weight = _mm256_broadcast_ss(&*tap_weights.add(o));
                    for (sum, &input) in row.iter_mut().zip(&inputs) {
                        *sum = _mm256_fmadd_ps(weight, input, *sum);
                    }
                }
            }
        }
        for (o, row) in acc.iter().enumerate().take(p.channels) {
            for (sum, &(_, write)) in row.iter().zip(&vectors) {
                _mm256_storeu_ps(out.as_mut_ptr().add(o * p.out_plane + write), *sum);
            }
        }
    }

    /// `sums[o][j] = sum over images, rows y and vectors v of
    /// grads[image][planes[o] + y * out_w + 8v + 0..8]
    /// * input[image][columns[j] + y * row_step + 8v + 0..8]`: three taps of
    /// the weight gradient of CHANNELS output channels (their planes at
    /// `planes`), each tap's input channel and offset in `columns`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and every offset named above lies inside
    /// its slice (the caller asserts both).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad_taps(
        input: &[f32],
        grads: &[f32],
        columns: [usize; COLUMNS],
        planes: [usize; CHANNELS],
        s: Strides,
    ) -> [[f32; COLUMNS]; CHANNELS] {
        let mut acc = [[_mm256_setzero_ps(); COLUMNS]; CHANNELS];
        let mut inputs = [_mm256_setzero_ps(); COLUMNS];
        for image in 0..s.images {
            let input = input.as_ptr().add(image * s.in_image);
            let grad = grads.as_ptr().add(image * s.out_image);
            for y in 0..s.rows {
                for v in 0..s.vectors {
                    let row = input.add(y * s.row_step + v * LANES);
                    for (value, &column) in inputs.iter_mut().zip(&columns) {
                        *value = _mm256_loadu_ps(row.add(column));
                    }
                    for (sums, &plane) in acc.iter_mut().zip(&planes) {
                        let g = _mm256_loadu_ps(grad.add(plane + y * s.out_w + v * LANES));
                        for (sum, &value) in sums.iter_mut().zip(&inputs) {
                            *sum = _mm256_fmadd_ps(g, value, *sum);
                        }
                    }
                }
            }
        }
        let mut sums = [[0f32; COLUMNS]; CHANNELS];
        for (row, vectors) in sums.iter_mut().zip(&acc) {
            for (sum, &vector) in row.iter_mut().zip(vectors) {
                let mut lanes = [0f32; LANES];
                _mm256_storeu_ps(lanes.as_mut_ptr(), vector);
                *sum = lanes.iter().sum();
            }
        }
        sums
    }
}
