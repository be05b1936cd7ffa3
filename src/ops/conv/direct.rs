//! Direct 3x3 stride-1 convolution for narrow layers on small planes, with
//! AVX2 and FMA: forward, input gradient and weight gradient summed straight
//! from the padded input, with no im2col columns and no col2im.
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
//!   and one kernel row, 3x3 vectors of products summed over every output
//!   position, then across lanes.
//!
//! Every sum runs in a fixed order, so results do not depend on threads.
//! Wide layers go to Winograd (`winograd.rs`); other kernels, large planes
//! and CPUs without AVX2 to im2col and GEMM.

use rayon::prelude::*;

use super::{threads, Geometry};

/// Output channels per micro-tile.
const CHANNELS: usize = 3;
/// Output vectors of [`LANES`] columns per micro-tile.
const VECTORS: usize = 3;
/// f32 lanes of an AVX2 register.
const LANES: usize = 8;
/// Most f32 values of the padded input rows one band of output rows reads
/// (256 KiB: the band stays in L2 while every channel block passes over it).
const BAND_INPUT: usize = 1 << 16;

/// Largest output planes that take this path. On larger ones a micro-tile's
/// windows over 64 channels no longer stay in L1, and im2col with GEMM was
/// faster (64 channels 128x128 n2: 69 ms against 55; 64x64 n8: 40 against 51).
const MAX_PLANE: usize = 64 * 64;

/// Whether [`forward`] can compute this convolution: 3x3, stride 1,
/// padding at most 2 (so the input gradient is one too), output rows a
/// whole number of vectors, a plane of at most [`MAX_PLANE`], and a CPU
/// with AVX2 and FMA. The weight gradient then takes this path too.
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2;
    let sizes = g.n * g.c_in * g.c_out * g.out_h > 0 && g.out_w > 0 && g.out_w.is_multiple_of(LANES);
    shape && sizes && g.out_plane() <= MAX_PLANE && has_avx2_fma()
}

/// Whether [`input_grad`] can compute this convolution's input gradient.
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

/// The convolution that gives `g`'s input gradient: the output gradient
/// `[n, co, out_h, out_w]` in, `[n, c, h, w]` out, padding `2 - p`.
fn gradient_geometry(g: &Geometry) -> Geometry {
    Geometry::new((g.n, g.c_out, g.out_h, g.out_w), (g.c_in, g.c_out, 3, 3), 2 - g.padding, 1)
        .expect("the gradient's convolution has the input's size")
}

/// `out [n, co, out_h, out_w] = conv(x, w)` for a convolution that [`applies`].
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let packed = pack_weights(g.c_out, g.c_in, |o, i, tap| w[(o * g.c_in + i) * 9 + tap]);
    convolve(g, x, &packed, out);
}

/// `dx [n, c, h, w]` from `grad [n, co, out_h, out_w]` for a convolution
/// whose input gradient [`applies_to_input_grad`].
pub(super) fn input_grad(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    // Kernel (input channel i, output channel o) of the gradient's
    // convolution: w[o][i] flipped (tap 8 - tap).
    let packed = pack_weights(g.c_in, g.c_out, |i, o, tap| w[(o * g.c_in + i) * 9 + 8 - tap]);
    convolve(&gradient_geometry(g), grad, &packed, dx);
}

/// `dw [co, c, 3, 3]` of a convolution that [`applies`], from its input `x`
/// and output gradient `grad`: for each output channel block, input channel
/// and kernel row, vectors of products summed over every output position
/// of a run of images, then across the vector's lanes. Runs of images as
/// the GEMM path splits them, their sums added in order.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let run = |(images, grads): (&[f32], &[f32])| {
        let padded = pad(g, images);
        let mut dw = vec![0f32; g.c_out * g.c_in * 9];
        dw.par_chunks_mut(CHANNELS * g.c_in * 9).enumerate().for_each(|(block, dw)| {
            weight_grad_block(g, &padded, grads, block * CHANNELS, dw);
        });
        dw
    };
    super::sum_over_image_runs(g, x, grad, g.c_out * g.c_in * 9, run)
}

/// Rows `dw [first.., c, 3, 3]` (as many output channels as it holds, at
/// most [`CHANNELS`]) from a run of padded images and their gradients.
fn weight_grad_block(g: &Geometry, padded: &[f32], grads: &[f32], first: usize, dw: &mut [f32]) {
    let wp = g.w + 2 * g.padding;
    let in_plane = (g.h + 2 * g.padding) * wp;
    let (out_plane, out_image) = (g.out_plane(), g.c_out * g.out_plane());
    let images = grads.len() / out_image;
    let channels = dw.len() / (g.c_in * 9);
    assert!(padded.len() >= images * g.c_in * in_plane && grads.len() == images * out_image);
    assert!(channels >= 1 && first + channels <= g.c_out && has_avx2_fma());
    // A block short of CHANNELS reads its last channel again for the
    // missing ones and drops their sums.
    let planes: [usize; CHANNELS] = std::array::from_fn(|o| (first + o.min(channels - 1)) * out_plane);
    let strides = Strides {
        images,
        in_image: g.c_in * in_plane,
        out_image,
        rows: g.out_h,
        vectors: g.out_w / LANES,
        wp,
        out_w: g.out_w,
    };
    for i in 0..g.c_in {
        for ky in 0..3 {
            // SAFETY: the asserts above keep every read inside `padded`
            // and `grads` (the rows read are `ky..ky + out_h <= h + 2p` of
            // channel `i`), and the CPU has the kernel's features.
            #[cfg(target_arch = "x86_64")]
            let sums = unsafe { avx2::weight_grad_row(&padded[i * in_plane + ky * wp..], grads, planes, strides) };
            #[cfg(not(target_arch = "x86_64"))]
            let sums = [[0f32; 3]; CHANNELS];
            for (o, row) in sums.iter().enumerate().take(channels) {
                dw[(o * g.c_in + i) * 9 + ky * 3..][..3].copy_from_slice(row);
            }
        }
    }
}

/// The loop bounds and strides of a weight-gradient row.
#[derive(Debug, Clone, Copy)]
struct Strides {
    images: usize,
    /// Floats in one padded input image.
    in_image: usize,
    /// Floats in one output gradient image.
    out_image: usize,
    rows: usize,
    /// Output vectors per row.
    vectors: usize,
    /// Padded input row length.
    wp: usize,
    out_w: usize,
}

/// The kernels `kernel(out channel, in channel, tap)` as
/// `[out block, in channel, tap, CHANNELS]`, the output channels rounded
/// up to whole blocks with zeros: a micro-tile reads its weights in order.
fn pack_weights(c_out: usize, c_in: usize, kernel: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<f32> {
    let mut packed = vec![0f32; c_out.div_ceil(CHANNELS) * c_in * 9 * CHANNELS];
    packed.par_chunks_mut(c_in * 9 * CHANNELS).enumerate().for_each(|(block, dst)| {
        for o in block * CHANNELS..(block * CHANNELS + CHANNELS).min(c_out) {
            for i in 0..c_in {
                for tap in 0..9 {
                    dst[(i * 9 + tap) * CHANNELS + o % CHANNELS] = kernel(o, i, tap);
                }
            }
        }
    });
    packed
}

/// The images `x` with their zero border, `[images, c, h + 2p, w + 2p]`,
/// in parallel.
fn pad(g: &Geometry, x: &[f32]) -> Vec<f32> {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let mut padded = vec![0f32; x.len() / (g.h * g.w) * hp * wp];
    padded.par_chunks_mut(hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
        for (y, row) in src.chunks(g.w).enumerate() {
            dst[(y + g.padding) * wp + g.padding..][..g.w].copy_from_slice(row);
        }
    });
    padded
}

/// `out = conv(x, packed)`: tasks of one image and a group of output
/// channel blocks (enough of them to keep every thread busy), each going
/// band by band over the output rows and, within a band, block by block.
fn convolve(g: &Geometry, x: &[f32], packed: &[f32], out: &mut [f32]) {
    let padded = pad(g, x);
    let (in_image, out_image) = (g.c_in * (g.h + 2 * g.padding) * (g.w + 2 * g.padding), g.c_out * g.out_plane());
    let blocks = g.c_out.div_ceil(CHANNELS);
    let groups = (2 * threads()).div_ceil(g.n).clamp(1, blocks);
    let group_channels = blocks.div_ceil(groups) * CHANNELS;
    out.par_chunks_mut(out_image).zip(padded.par_chunks(in_image)).for_each(|(dst, image)| {
        dst.par_chunks_mut(group_channels * g.out_plane()).enumerate().for_each(|(group, dst)| {
            let first_block = group * group_channels / CHANNELS;
            convolve_group(g, image, &packed[first_block * g.c_in * 9 * CHANNELS..], dst);
        })
    });
}

/// Output channels `dst [channels, out_h, out_w]` of one padded image, from
/// their packed kernels.
fn convolve_group(g: &Geometry, image: &[f32], packed: &[f32], dst: &mut [f32]) {
    let plane = g.out_plane();
    let channels = dst.len() / plane;
    let wp = g.w + 2 * g.padding;
    let band_rows = (BAND_INPUT / (g.c_in * wp)).saturating_sub(2).clamp(1, g.out_h);
    let vectors_per_row = g.out_w / LANES;
    for first_row in (0..g.out_h).step_by(band_rows) {
        let rows = band_rows.min(g.out_h - first_row);
        // Output vectors of the band, as (offset in the padded plane of the
        // window's top-left input, offset in the output plane).
        let vectors: Vec<(usize, usize)> = (first_row * vectors_per_row..(first_row + rows) * vectors_per_row)
            .map(|v| {
                let (y, x) = (v / vectors_per_row, v % vectors_per_row * LANES);
                (y * wp + x, y * g.out_w + x)
            })
            .collect();
        for block in 0..channels.div_ceil(CHANNELS) {
            let weights = &packed[block * g.c_in * 9 * CHANNELS..][..g.c_in * 9 * CHANNELS];
            let block_out = &mut dst[block * CHANNELS * plane..];
            for tile in vectors.chunks(VECTORS) {
                micro_tile(g, image, weights, tile, block_out);
            }
        }
    }
}

/// One micro-tile: up to [`CHANNELS`] output channels (as many as `out`
/// holds planes for) at the output vectors `tile`.
fn micro_tile(g: &Geometry, image: &[f32], weights: &[f32], tile: &[(usize, usize)], out: &mut [f32]) {
    let plane = g.out_plane();
    let wp = g.w + 2 * g.padding;
    let in_plane = (g.h + 2 * g.padding) * wp;
    let channels = (out.len() / plane).min(CHANNELS);
    // Every read stays inside the image: a window's last tap of the last
    // channel, and every write inside `out`.
    let (last_read, last_write) = tile.iter().fold((0, 0), |(r, w), &(a, b)| (r.max(a), w.max(b)));
    assert!(
        image.len() >= g.c_in.saturating_sub(1) * in_plane + last_read + 2 * wp + 2 + LANES,
        "direct conv: input too short"
    );
    assert!(out.len() >= channels.saturating_sub(1) * plane + last_write + LANES, "direct conv: output too short");
    assert!(weights.len() >= g.c_in * 9 * CHANNELS, "direct conv: weights too short");
    assert!(tile.len() <= VECTORS && has_avx2_fma());
    let geometry = Planes { c_in: g.c_in, in_plane, wp, out_plane: plane, channels };
    // SAFETY: the asserts above bound every offset the kernel reads and
    // writes, and the CPU has the features the kernel is compiled for.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match tile.len() {
            1 => avx2::tile::<1>(image, weights, tile.try_into().expect("1"), out, geometry),
            2 => avx2::tile::<2>(image, weights, tile.try_into().expect("2"), out, geometry),
            3 => avx2::tile::<3>(image, weights, tile.try_into().expect("3"), out, geometry),
            4 => avx2::tile::<4>(image, weights, tile.try_into().expect("4"), out, geometry),
            5 => avx2::tile::<5>(image, weights, tile.try_into().expect("5"), out, geometry),
            6 => avx2::tile::<6>(image, weights, tile.try_into().expect("6"), out, geometry),
            _ => {}
        }
    }
}

/// Strides a micro-tile walks.
#[derive(Debug, Clone, Copy)]
struct Planes {
    c_in: usize,
    /// Floats in one padded input channel.
    in_plane: usize,
    /// Padded input row length.
    wp: usize,
    /// Floats in one output channel.
    out_plane: usize,
    /// Output channels to write (at most [`CHANNELS`]).
    channels: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Planes, Strides, CHANNELS, LANES};

    /// `out[o][w + 0..8] = sum over i, ky, kx of weights[i][3ky + kx][o]
    /// * image[i][r + ky * wp + kx + 0..8]` for each vector `(r, w)` of
    /// `vectors` and each output channel `o < p.channels`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and every offset named above lies inside
    /// its slice (the caller asserts both).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const P: usize>(
        image: &[f32],
        weights: &[f32],
        vectors: [(usize, usize); P],
        out: &mut [f32],
        p: Planes,
    ) {
        let mut acc = [[_mm256_setzero_ps(); P]; CHANNELS];
        let mut inputs = [_mm256_setzero_ps(); P];
        for i in 0..p.c_in {
            let channel = image.as_ptr().add(i * p.in_plane);
            let kernel = weights.as_ptr().add(i * 9 * CHANNELS);
            for ky in 0..3 {
                for kx in 0..3 {
                    for (input, &(read, _)) in inputs.iter_mut().zip(&vectors) {
                        *input = _mm256_loadu_ps(channel.add(read + ky * p.wp + kx));
                    }
                    let taps = kernel.add((ky * 3 + kx) * CHANNELS);
                    for (o, row) in acc.iter_mut().enumerate() {
                        let weight = _mm256_broadcast_ss(&*taps.add(o));
                        for (sum, &input) in row.iter_mut().zip(&inputs) {
                            *sum = _mm256_fmadd_ps(weight, input, *sum);
                        }
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

    /// `sums[o][kx] = sum over images, rows y and columns x of
    /// grads[image][planes[o] + y * out_w + x] * input[image][y * wp + x + kx]`:
    /// one kernel row of the weight gradient of CHANNELS output channels
    /// (their planes at `planes`) and one input channel (`input` starts at
    /// its row `ky`).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA, and every offset named above lies inside
    /// its slice (the caller asserts both).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weight_grad_row(
        input: &[f32],
        grads: &[f32],
        planes: [usize; CHANNELS],
        s: Strides,
    ) -> [[f32; 3]; CHANNELS] {
        let mut acc = [[_mm256_setzero_ps(); 3]; CHANNELS];
        let mut inputs = [_mm256_setzero_ps(); 3];
        for image in 0..s.images {
            let input = input.as_ptr().add(image * s.in_image);
            let grad = grads.as_ptr().add(image * s.out_image);
            for y in 0..s.rows {
                for v in 0..s.vectors {
                    let row = input.add(y * s.wp + v * LANES);
                    for (kx, value) in inputs.iter_mut().enumerate() {
                        *value = _mm256_loadu_ps(row.add(kx));
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
        let mut sums = [[0f32; 3]; CHANNELS];
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
