//! Direct convolution for narrow layers on small planes, with AVX-512 or
//! AVX2 and FMA (whichever the CPU has, chosen at run time):
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
//! - Forward: a micro-tile is [`CHANNELS`] output channels by
//!   [`Isa::vectors`] vectors: 3 of 8 outputs with AVX2 (9 accumulators:
//!   3x3 ran faster on AVX2 machines than 4x3, whose 16 live registers
//!   spilled, or 2x6, which loads more), 6 of 16 with AVX-512 where the
//!   rows hold whole 16-float vectors (its 32 registers hold 18), and 6 of
//!   8 with AVX-512's registers at AVX2's width (AVX512VL) where rows hold
//!   8-float ones: on the `shapes` model's 8x8 planes that took its
//!   training step from 156-165 to 169-175 images/s (Intel, 2026-12-03).
//!   With those 32 registers, 3x3 stride-1 tiles run down a column of
//!   output vectors (`column_tile`), loading each input vector once for
//!   the three output rows that read it: a 64-channel 16x16 forward at
//!   batch 8 took 0.50 ms against 0.60-0.63 (torch: 0.43), the `shapes`
//!   step rose from 166-173 to 176-178 images/s (Intel, 2026-12-03).
//! - Input gradient: for a 3x3 stride-1 convolution with padding `p`, the
//!   output gradient convolved with the kernel flipped and its channel axes
//!   swapped, with padding `2 - p`: the same micro-tiles.
//! - Weight gradient: for [`CHANNELS`] output channels, one input channel
//!   and [`Isa::taps`] kernel taps (3 with AVX2, 9 with AVX-512's 32
//!   registers), vectors of products summed over every output position,
//!   then across lanes.
//!
//! Every sum runs in a fixed order, so results do not depend on threads
//! (they do on the lane count: AVX-512 sums 16 lanes where AVX2 sums 8).
//! Wide 3x3 layers go to Winograd (`winograd.rs`); wide layers on small
//! planes, other kernels, large planes, strided input gradients and CPUs
//! without AVX2 to im2col and GEMM.

use rayon::prelude::*;

use super::{phase_index, split_padded_row, threads, zeroed, Geometry};

/// Output channels per micro-tile.
const CHANNELS: usize = 3;
/// Most f32 values of the padded input rows one band of output rows reads
/// (256 KiB: the band stays in L2 while every channel block passes over it).
const BAND_INPUT: usize = 1 << 16;

/// Layers whose narrower side has this many channels or more take im2col
/// and GEMM (or Winograd) instead. There each GEMM is 128 rows tall or
/// more and the `gemm` crate's packing pays for itself: at 12x16 the `bccd`
/// body's 512-channel weight gradient took 0.079-0.088 s a step here and
/// 0.049 through GEMM, its 128->256 and 256->512 stride-2 ones halved, and
/// the 128-channel head at P5-P6 fell by a third (BENCHMARKS.md, CPU
/// training, 2026-12-03).
const MAX_CHANNELS: usize = 128;

/// Largest output planes that take this path. On larger ones a micro-tile's
/// windows over 64 channels no longer stay in L1, and im2col with GEMM was
/// faster (64 channels 128x128 n2: 69 ms against 55; 64x64 n8: 40 against 51).
const MAX_PLANE: usize = 64 * 64;

/// The instruction set a convolution's micro-kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx2,
    /// AVX-512's 32 registers at AVX2's width (AVX512VL), for rows of 8.
    Avx512Ymm,
    Avx512,
}

impl Isa {
    /// f32 lanes of one register.
    const fn lanes(self) -> usize {
        match self {
            Isa::Avx2 | Isa::Avx512Ymm => 8,
            Isa::Avx512 => 16,
        }
    }

    /// Output vectors per micro-tile: with [`CHANNELS`] of them, as many
    /// accumulators as the registers hold beside the inputs (AVX2's 16
    /// registers: 9 and 3; AVX-512's 32: 18 and 6).
    const fn vectors(self) -> usize {
        match self {
            Isa::Avx2 => 3,
            Isa::Avx512Ymm | Isa::Avx512 => 6,
        }
    }

    /// Kernel taps per weight-gradient pass: with [`CHANNELS`] output
    /// channels, as many accumulators as the registers hold beside those
    /// channels' gradients (AVX2: 9 and 3; AVX-512: 27 and 3). With nine
    /// taps a pass instead of three, a 64-channel 16x16 layer's forward and
    /// backward at batch 8 took 2.45 ms against 2.52, a 16-channel 32x32
    /// one's 1.02 against 1.05 (Intel, 2026-12-03).
    const fn taps(self) -> usize {
        match self {
            Isa::Avx2 => 3,
            Isa::Avx512Ymm | Isa::Avx512 => 9,
        }
    }

    fn available(self) -> bool {
        match self {
            Isa::Avx2 => has_avx2_fma(),
            Isa::Avx512Ymm => has_avx2_fma() && has_avx512vl(),
            Isa::Avx512 => has_avx512(),
        }
    }

    /// The widest instruction set this CPU has whose vectors tile rows of
    /// `out_w` outputs.
    fn for_rows(out_w: usize) -> Option<Isa> {
        [Isa::Avx512, Isa::Avx512Ymm, Isa::Avx2]
            .into_iter()
            .find(|isa| out_w.is_multiple_of(isa.lanes()) && isa.available())
    }

    /// [`Isa::for_rows`] of a convolution that [`applies`].
    fn of(g: &Geometry) -> Isa {
        Isa::for_rows(g.out_w).expect("direct conv: no instruction set tiles these rows")
    }
}

/// Whether [`forward`] and [`weight_grad`] compute this convolution: a
/// square 3x3, 5x5 or 7x7 kernel, stride 1 or 2, padding smaller than the
/// kernel, fewer than [`MAX_CHANNELS`] on one side (and on the output side
/// at stride 2), a plane of at most [`MAX_PLANE`], and a CPU with AVX-512
/// or AVX2 and FMA whose vectors (16 or 8 floats) tile the output rows.
///
/// A stride-2 layer that widens to [`MAX_CHANNELS`] or more (a ResNet
/// stage's entry, 64 -> 128) ran faster as im2col and GEMM, forward and
/// both gradients: 37-39 ms a step against 24 at 64x64 (batch 2), 55-56
/// against 43-46 at 48x64 (batch 4), while the heads' narrow outputs
/// (256 -> 36) stay faster here (BENCHMARKS.md, 2026-12-03, Intel).
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == g.kw && matches!(g.kh, 3 | 5 | 7) && matches!(g.stride, 1 | 2) && g.padding < g.kh;
    let sizes = g.n * g.c_in * g.c_out * g.out_h > 0 && g.out_w > 0;
    let narrow = g.c_in.min(g.c_out) < MAX_CHANNELS && !(g.stride == 2 && g.c_out >= MAX_CHANNELS);
    shape && sizes && narrow && g.out_plane() <= MAX_PLANE && Isa::for_rows(g.out_w).is_some()
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

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512vl() -> bool {
    is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512vl() -> bool {
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
    forward_on(Isa::of(g), g, x, w, out)
}

fn forward_on(isa: Isa, g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let taps = g.kh * g.kw;
    let packed = pack_weights(g, g.c_out, g.c_in, |o, i, tap| w[(o * g.c_in + i) * taps + tap]);
    convolve(g, &Reads::new(g, isa), x, &packed, out);
}

/// `dx [n, c, h, w]` from `grad [n, co, out_h, out_w]` for a convolution
/// whose input gradient [`applies_to_input_grad`].
pub(super) fn input_grad(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    input_grad_on(Isa::of(&gradient_geometry(g)), g, grad, w, dx)
}

fn input_grad_on(isa: Isa, g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    // Kernel (input channel i, output channel o) of the gradient's
    // convolution: w[o][i] flipped (tap 8 - tap).
    let transposed = gradient_geometry(g);
    let packed = pack_weights(&transposed, g.c_in, g.c_out, |i, o, tap| w[(o * g.c_in + i) * 9 + 8 - tap]);
    convolve(&transposed, &Reads::new(&transposed, isa), grad, &packed, dx);
}

/// How a convolution reads its prepared input ([`prepare`]): strides,
/// where each tap sits relative to an output vector's first read, and the
/// instruction set (so the vector width) of its kernels.
#[derive(Debug, Clone)]
struct Reads {
    isa: Isa,
    /// Padded input row length.
    wp: usize,
    /// Floats in one padded input channel.
    in_plane: usize,
    /// Offset of each tap `ky * k + kx` from the read of its output vector.
    taps: Vec<usize>,
    /// The largest of `taps`.
    last_tap: usize,
    /// Whether micro-tiles run down a column of output vectors
    /// ([`avx512::column_tile`]): 3x3 stride-1 kernels with AVX-512's
    /// registers.
    columns: bool,
}

impl Reads {
    fn new(g: &Geometry, isa: Isa) -> Self {
        let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
        let column = |kx: usize| phase_index(wp, g.stride, kx);
        let taps: Vec<usize> = (0..g.kh).flat_map(|ky| (0..g.kw).map(move |kx| ky * wp + column(kx))).collect();
        let last_tap = taps.iter().copied().max().unwrap_or(0);
        let columns = g.kh == 3 && g.kw == 3 && g.stride == 1 && isa != Isa::Avx2;
        Self { isa, wp, in_plane: hp * wp, taps, last_tap, columns }
    }

    /// Where the output vector at row `y`, column `x` starts reading.
    fn read(&self, g: &Geometry, y: usize, x: usize) -> usize {
        y * g.stride * self.wp + x
    }

    fn lanes(&self) -> usize {
        self.isa.lanes()
    }
}

/// The images `x` with their zero border, `[images, c, h + 2p, w + 2p]`,
/// each row split into `stride` phases (`conv::phase_index`), in parallel.
fn prepare(g: &Geometry, x: &[f32]) -> Vec<f32> {
    let (hp, wp) = (g.h + 2 * g.padding, g.w + 2 * g.padding);
    let mut padded = zeroed(x.len() / (g.h * g.w) * hp * wp);
    padded.par_chunks_mut(hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
        for (y, row) in src.chunks(g.w).enumerate() {
            let dst = &mut dst[(y + g.padding) * wp..][..wp];
            if g.stride == 1 {
                dst[g.padding..][..g.w].copy_from_slice(row);
            } else {
                // Stride 2, the other one `applies` takes.
                split_padded_row(row, g.padding, dst);
            }
        }
    });
    padded
}

/// `dw [co, c, k, k]` of a convolution that [`applies`], from its input `x`
/// and output gradient `grad`: for each output channel block, input channel
/// and [`Isa::taps`] kernel taps, vectors of products summed over every
/// output position of a run of images, then across the vector's lanes.
/// Runs of images as the GEMM path splits them, their sums added in order.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    weight_grad_on(Isa::of(g), g, x, grad)
}

fn weight_grad_on(isa: Isa, g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let kernel = g.c_in * g.kh * g.kw;
    let reads = &Reads::new(g, isa);
    let run = |(images, grads): (&[f32], &[f32])| {
        let prepared = prepare(g, images);
        let mut dw = vec![0f32; g.c_out * kernel];
        dw.par_chunks_mut(CHANNELS * kernel).enumerate().for_each(|(block, dw)| {
            weight_grad_block(g, reads, &prepared, grads, block * CHANNELS, dw);
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
        + reads.read(g, g.out_h - 1, g.out_w - reads.lanes())
        + reads.last_tap;
    let input_fits = prepared.len() >= last + reads.lanes() && grads.len() == images * out_image;
    assert!(input_fits && g.out_w.is_multiple_of(reads.lanes()), "direct conv: input too short");
    assert!(channels >= 1 && first + channels <= g.c_out && reads.isa.available());
    // A block short of CHANNELS reads its last channel again for the
    // missing ones and drops their sums.
    let planes: [usize; CHANNELS] = std::array::from_fn(|o| (first + o.min(channels - 1)) * out_plane);
    let strides = Strides {
        images,
        in_image,
        out_image,
        rows: g.out_h,
        vectors: g.out_w / reads.lanes(),
        row_step: g.stride * reads.wp,
        out_w: g.out_w,
    };
    let block = Block { prepared, grads, planes, strides, channels };
    match reads.isa {
        Isa::Avx2 => weight_grad_passes::<{ Isa::Avx2.taps() }>(g, reads, &block, dw),
        Isa::Avx512Ymm => weight_grad_passes::<{ Isa::Avx512Ymm.taps() }>(g, reads, &block, dw),
        Isa::Avx512 => weight_grad_passes::<{ Isa::Avx512.taps() }>(g, reads, &block, dw),
    }
}

/// What every weight-gradient pass of one output channel block reads.
struct Block<'a> {
    prepared: &'a [f32],
    grads: &'a [f32],
    /// Where each output channel's gradient plane starts in an image.
    planes: [usize; CHANNELS],
    strides: Strides,
    /// Output channels of the block to write (at most [`CHANNELS`]).
    channels: usize,
}

/// `dw [channels, c, k, k]` of one block, `J` taps of one input channel a
/// pass (its last pass repeats the kernel's last tap and drops the sums).
fn weight_grad_passes<const J: usize>(g: &Geometry, reads: &Reads, b: &Block, dw: &mut [f32]) {
    let taps = reads.taps.len();
    for i in 0..g.c_in {
        for first_tap in (0..taps).step_by(J) {
            let columns: [usize; J] =
                std::array::from_fn(|j| i * reads.in_plane + reads.taps[(first_tap + j).min(taps - 1)]);
            // SAFETY: `weight_grad_block` asserted that every read stays
            // inside `prepared` and `grads`, and that the CPU has the
            // kernel's features.
            #[cfg(target_arch = "x86_64")]
            let sums = unsafe {
                match reads.isa {
                    Isa::Avx2 => avx2::weight_grad_taps(b.prepared, b.grads, columns, b.planes, b.strides),
                    Isa::Avx512Ymm => avx512_ymm::weight_grad_taps(b.prepared, b.grads, columns, b.planes, b.strides),
                    Isa::Avx512 => avx512::weight_grad_taps(b.prepared, b.grads, columns, b.planes, b.strides),
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            let sums = [[0f32; J]; CHANNELS];
            let count = J.min(taps - first_tap);
            for (o, row) in sums.iter().enumerate().take(b.channels) {
                dw[(o * g.c_in + i) * taps + first_tap..][..count].copy_from_slice(&row[..count]);
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
fn convolve(g: &Geometry, reads: &Reads, x: &[f32], packed: &[f32], out: &mut [f32]) {
    let prepared = prepare(g, x);
    let (in_image, out_image) = (g.c_in * reads.in_plane, g.c_out * g.out_plane());
    let block_len = g.c_in * reads.taps.len() * CHANNELS;
    let blocks = g.c_out.div_ceil(CHANNELS);
    let groups = (2 * threads()).div_ceil(g.n).clamp(1, blocks);
    let group_channels = blocks.div_ceil(groups) * CHANNELS;
    out.par_chunks_mut(out_image).zip(prepared.par_chunks(in_image)).for_each(|(dst, image)| {
        dst.par_chunks_mut(group_channels * g.out_plane()).enumerate().for_each(|(group, dst)| {
            let first_block = group * group_channels / CHANNELS;
            convolve_group(g, reads, image, &packed[first_block * block_len..], dst);
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
    let lanes = reads.lanes();
    let vectors_per_row = g.out_w / lanes;
    for first_row in (0..g.out_h).step_by(band_rows) {
        let rows = band_rows.min(g.out_h - first_row);
        // Output vectors of the band, as (offset in the prepared plane of
        // the first read, offset in the output plane), row after row or,
        // for column tiles, column after column.
        let vectors: Vec<(usize, usize)> = (0..rows * vectors_per_row)
            .map(|v| {
                let (y, column) =
                    if reads.columns { (v % rows, v / rows) } else { (v / vectors_per_row, v % vectors_per_row) };
                let (y, x) = (first_row + y, column * lanes);
                (reads.read(g, y, x), y * g.out_w + x)
            })
            .collect();
        // Tiles within a run (a column, or the band), of equal size as far
        // as they go: 8 vectors as 4 and 4, not 6 and 2 (8x8 planes ran 8%
        // slower so).
        let run_len = if reads.columns { rows } else { vectors.len() };
        let tile_len = run_len.div_ceil(run_len.div_ceil(reads.isa.vectors()));
        for block in 0..channels.div_ceil(CHANNELS) {
            let weights = &packed[block * block_len..][..block_len];
            let block_out = &mut dst[block * CHANNELS * plane..];
            for tile in vectors.chunks(run_len).flat_map(|run| run.chunks(tile_len)) {
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
    let lanes = reads.lanes();
    assert!(image.len() >= last + lanes, "direct conv: input too short");
    assert!(out.len() >= channels.saturating_sub(1) * plane + last_write + lanes, "direct conv: output too short");
    assert!(weights.len() >= g.c_in * reads.taps.len() * CHANNELS, "direct conv: weights too short");
    assert!(tile.len() <= reads.isa.vectors() && reads.isa.available());
    let planes = Planes { c_in: g.c_in, in_plane: reads.in_plane, out_plane: plane, channels };
    // SAFETY: the asserts above bound every offset the kernel reads and
    // writes, and the CPU has the features the kernel is compiled for.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        if reads.columns {
            let (first_read, first_write) = tile[0];
            let down_a_column = tile
                .iter()
                .enumerate()
                .all(|(j, &(read, write))| read == first_read + j * reads.wp && write == first_write + j * g.out_w);
            assert!(down_a_column, "direct conv: a column tile's vectors are one below the other");
            return column_tile_of(reads.isa, image, weights, tile[0], tile.len(), (reads.wp, g.out_w), out, planes);
        }
        match reads.taps.len() {
            9 => tile_of::<9>(reads.isa, image, weights, &reads.taps, tile, out, planes),
            25 => tile_of::<25>(reads.isa, image, weights, &reads.taps, tile, out, planes),
            49 => tile_of::<49>(reads.isa, image, weights, &reads.taps, tile, out, planes),
            _ => unreachable!("direct conv: kernels are 3x3, 5x5 or 7x7"),
        }
    }
}

/// [`avx2::tile`] or [`avx512::tile`] for a tile of 1 to [`Isa::vectors`]
/// vectors and `T` taps.
///
/// # Safety
/// As for [`avx2::tile`].
#[cfg(target_arch = "x86_64")]
unsafe fn tile_of<const T: usize>(
    isa: Isa,
    image: &[f32],
    weights: &[f32],
    taps: &[usize],
    tile: &[(usize, usize)],
    out: &mut [f32],
    planes: Planes,
) {
    let taps: &[usize; T] = taps.try_into().expect("tap count");
    match (isa, tile) {
        (Isa::Avx2, &[a, b, c]) => avx2::tile(image, weights, taps, [a, b, c], out, planes),
        (Isa::Avx2, &[a, b]) => avx2::tile(image, weights, taps, [a, b], out, planes),
        (Isa::Avx2, &[a]) => avx2::tile(image, weights, taps, [a], out, planes),
        (Isa::Avx512Ymm, &[a, b, c, d, e, f]) => {
            avx512_ymm::tile(image, weights, taps, [a, b, c, d, e, f], out, planes)
        }
        (Isa::Avx512Ymm, &[a, b, c, d, e]) => avx512_ymm::tile(image, weights, taps, [a, b, c, d, e], out, planes),
        (Isa::Avx512Ymm, &[a, b, c, d]) => avx512_ymm::tile(image, weights, taps, [a, b, c, d], out, planes),
        (Isa::Avx512Ymm, &[a, b, c]) => avx512_ymm::tile(image, weights, taps, [a, b, c], out, planes),
        (Isa::Avx512Ymm, &[a, b]) => avx512_ymm::tile(image, weights, taps, [a, b], out, planes),
        (Isa::Avx512Ymm, &[a]) => avx512_ymm::tile(image, weights, taps, [a], out, planes),
        (Isa::Avx512, &[a, b, c, d, e, f]) => avx512::tile(image, weights, taps, [a, b, c, d, e, f], out, planes),
        (Isa::Avx512, &[a, b, c, d, e]) => avx512::tile(image, weights, taps, [a, b, c, d, e], out, planes),
        (Isa::Avx512, &[a, b, c, d]) => avx512::tile(image, weights, taps, [a, b, c, d], out, planes),
        (Isa::Avx512, &[a, b, c]) => avx512::tile(image, weights, taps, [a, b, c], out, planes),
        (Isa::Avx512, &[a, b]) => avx512::tile(image, weights, taps, [a, b], out, planes),
        (Isa::Avx512, &[a]) => avx512::tile(image, weights, taps, [a], out, planes),
        _ => {}
    }
}

/// [`avx512::column_tile`] or [`avx512_ymm::column_tile`] for a tile of 1
/// to [`Isa::vectors`] vectors.
///
/// # Safety
/// As for [`avx512::column_tile`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn column_tile_of(
    isa: Isa,
    image: &[f32],
    weights: &[f32],
    first: (usize, usize),
    len: usize,
    rows: (usize, usize),
    out: &mut [f32],
    planes: Planes,
) {
    match (isa, len) {
        (Isa::Avx512, 6) => avx512::column_tile::<6>(image, weights, first, rows, out, planes),
        (Isa::Avx512, 5) => avx512::column_tile::<5>(image, weights, first, rows, out, planes),
        (Isa::Avx512, 4) => avx512::column_tile::<4>(image, weights, first, rows, out, planes),
        (Isa::Avx512, 3) => avx512::column_tile::<3>(image, weights, first, rows, out, planes),
        (Isa::Avx512, 2) => avx512::column_tile::<2>(image, weights, first, rows, out, planes),
        (Isa::Avx512, 1) => avx512::column_tile::<1>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 6) => avx512_ymm::column_tile::<6>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 5) => avx512_ymm::column_tile::<5>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 4) => avx512_ymm::column_tile::<4>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 3) => avx512_ymm::column_tile::<3>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 2) => avx512_ymm::column_tile::<2>(image, weights, first, rows, out, planes),
        (Isa::Avx512Ymm, 1) => avx512_ymm::column_tile::<1>(image, weights, first, rows, out, planes),
        _ => unreachable!("direct conv: column tiles of 1 to 6 vectors with AVX-512's registers"),
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

/// The sum of a vector's lanes, halving them: for 16 lanes, 4 dependent
/// additions against 15 in a row (the weight gradient's small blocks spent
/// 1.5% of the `bccd` recipe's step in the sequential sum).
#[inline(always)]
fn halving_sum<const N: usize>(mut lanes: [f32; N]) -> f32 {
    let mut n = N;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            lanes[i] += lanes[i + n];
        }
    }
    lanes[0]
}

/// The micro-kernels for one instruction set (`$feature`): its f32 lanes
/// and intrinsics. A macro because AVX2 and AVX-512 differ only in those
/// names, and `#[target_feature]` compiles each set on its own.
macro_rules! kernels {
    ($isa:ident, $feature:literal, $lanes:literal,
     $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use std::arch::x86_64::*;

            use super::{halving_sum, Planes, Strides, CHANNELS};

            const LANES: usize = $lanes;

            /// `out[o][w + 0..LANES] = sum over i and t of weights[i][t][o]
            /// * image[i][r + taps[t] + 0..LANES]` for each vector `(r, w)` of
            /// `vectors` and each output channel `o < p.channels`.
            ///
            /// # Safety
            /// The CPU has the module's instruction set, and every offset named above lies inside
            /// its slice (the caller asserts both).
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn tile<const T: usize, const P: usize>(
                image: &[f32],
                weights: &[f32],
                taps: &[usize; T],
                vectors: [(usize, usize); P],
                out: &mut [f32],
                p: Planes,
            ) {
                let mut acc = [[$zero(); P]; CHANNELS];
                let mut inputs = [$zero(); P];
                for i in 0..p.c_in {
                    let channel = image.as_ptr().add(i * p.in_plane);
                    let kernel = weights.as_ptr().add(i * T * CHANNELS);
                    for (t, &tap) in taps.iter().enumerate() {
                        for (input, &(read, _)) in inputs.iter_mut().zip(&vectors) {
                            *input = $load(channel.add(read + tap));
                        }
                        let tap_weights = kernel.add(t * CHANNELS);
                        for (o, row) in acc.iter_mut().enumerate() {
                            let weight = $set1(*tap_weights.add(o));
                            for (sum, &input) in row.iter_mut().zip(&inputs) {
                                *sum = $fmadd(weight, input, *sum);
                            }
                        }
                    }
                }
                for (o, row) in acc.iter().enumerate().take(p.channels) {
                    for (sum, &(_, write)) in row.iter().zip(&vectors) {
                        $store(out.as_mut_ptr().add(o * p.out_plane + write), *sum);
                    }
                }
            }

            /// [`tile`] for a 3x3 stride-1 kernel and `R` vectors one below
            /// the other: the first reads at `first.0` and writes at `first.1`,
            /// `rows = (padded input row, output row)` floats apart. Each
            /// input vector is loaded once for the up to three output rows
            /// that read it, where [`tile`] loads it for each (18 loads of
            /// 8 rows for 6 vectors and one kernel column), with the kernel
            /// column's nine weights held in registers.
            ///
            /// # Safety
            /// As for [`tile`], with every read of rows `first.0 ..=
            /// first.0 + (R + 1) rows.0 + 2` in each input channel.
            #[target_feature(enable = $feature)]
            #[allow(dead_code)] // AVX2's 16 registers hold no column tile
            pub(super) unsafe fn column_tile<const R: usize>(
                image: &[f32],
                weights: &[f32],
                first: (usize, usize),
                rows: (usize, usize),
                out: &mut [f32],
                p: Planes,
            ) {
                let mut acc = [[$zero(); R]; CHANNELS];
                for i in 0..p.c_in {
                    let channel = image.as_ptr().add(i * p.in_plane + first.0);
                    let kernel = weights.as_ptr().add(i * 9 * CHANNELS);
                    for kx in 0..3 {
                        let w: [[_; CHANNELS]; 3] = std::array::from_fn(|ky| {
                            std::array::from_fn(|o| $set1(*kernel.add((ky * 3 + kx) * CHANNELS + o)))
                        });
                        for r in 0..R + 2 {
                            let input = $load(channel.add(r * rows.0 + kx));
                            // Output row j = r - ky reads this input row with kernel row ky.
                            for (ky, weights) in w.iter().enumerate() {
                                if r >= ky && r - ky < R {
                                    for (row, &weight) in acc.iter_mut().zip(weights) {
                                        row[r - ky] = $fmadd(weight, input, row[r - ky]);
                                    }
                                }
                            }
                        }
                    }
                }
                for (o, row) in acc.iter().enumerate().take(p.channels) {
                    for (j, sum) in row.iter().enumerate() {
                        $store(out.as_mut_ptr().add(o * p.out_plane + first.1 + j * rows.1), *sum);
                    }
                }
            }

            /// `sums[o][j] = sum over images, rows y and vectors v of
            /// grads[image][planes[o] + y * out_w + LANES v + 0..LANES]
            /// * input[image][columns[j] + y * row_step + LANES v + 0..LANES]`: J taps of
            /// the weight gradient of CHANNELS output channels (their planes at
            /// `planes`), each tap's input channel and offset in `columns`.
            ///
            /// # Safety
            /// The CPU has the module's instruction set, and every offset named above lies inside
            /// its slice (the caller asserts both).
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn weight_grad_taps<const J: usize>(
                input: &[f32],
                grads: &[f32],
                columns: [usize; J],
                planes: [usize; CHANNELS],
                s: Strides,
            ) -> [[f32; J]; CHANNELS] {
                let mut acc = [[$zero(); CHANNELS]; J];
                let mut g = [$zero(); CHANNELS];
                for image in 0..s.images {
                    let input = input.as_ptr().add(image * s.in_image);
                    let grad = grads.as_ptr().add(image * s.out_image);
                    for y in 0..s.rows {
                        for v in 0..s.vectors {
                            let row = input.add(y * s.row_step + v * LANES);
                            for (g, &plane) in g.iter_mut().zip(&planes) {
                                *g = $load(grad.add(plane + y * s.out_w + v * LANES));
                            }
                            // Tap by tap, so only one input vector is live
                            // beside the accumulators and gradients.
                            for (sums, &column) in acc.iter_mut().zip(&columns) {
                                let value = $load(row.add(column));
                                for (sum, &g) in sums.iter_mut().zip(&g) {
                                    *sum = $fmadd(g, value, *sum);
                                }
                            }
                        }
                    }
                }
                let mut sums = [[0f32; J]; CHANNELS];
                for (j, vectors) in acc.iter().enumerate() {
                    for (row, &vector) in sums.iter_mut().zip(vectors) {
                        let sum = &mut row[j];
                        let mut lanes = [0f32; LANES];
                        $store(lanes.as_mut_ptr(), vector);
                        *sum = halving_sum(lanes);
                    }
                }
                sums
            }
        }
    };
}

kernels!(avx2, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_fmadd_ps);
kernels!(
    avx512_ymm,
    "avx512f,avx512vl,avx2,fma",
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);
kernels!(avx512, "avx512f", 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_fmadd_ps);

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ops::testing::relative_error;

    fn random(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(a.len() == b.len() && diff <= 1e-5 * scale, "{what}: max difference {diff} (scale {scale})");
    }

    /// `dx` of a stride-1 convolution summed in f64, the reference.
    fn input_grad_f64(g: &Geometry, grad: &[f32], w: &[f32]) -> Vec<f64> {
        let (k, p) = (g.kh, g.padding as isize);
        let mut dx = vec![0f64; g.n * g.c_in * g.h * g.w];
        for (n, o, oy, ox) in grid4(g.n, g.c_out, g.out_h, g.out_w) {
            let dy = grad[((n * g.c_out + o) * g.out_h + oy) * g.out_w + ox] as f64;
            for (c, ky, kx) in (0..g.c_in).flat_map(|c| (0..k).flat_map(move |ky| (0..k).map(move |kx| (c, ky, kx)))) {
                let (y, x) = (oy as isize + ky as isize - p, ox as isize + kx as isize - p);
                if (0..g.h as isize).contains(&y) && (0..g.w as isize).contains(&x) {
                    let weight = w[((o * g.c_in + c) * k + ky) * k + kx] as f64;
                    dx[((n * g.c_in + c) * g.h + y as usize) * g.w + x as usize] += dy * weight;
                }
            }
        }
        dx
    }

    /// Every (i, j, k, l) below (a, b, c, d), row-major.
    fn grid4(a: usize, b: usize, c: usize, d: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        (0..a).flat_map(move |i| (0..b).flat_map(move |j| (0..c).flat_map(move |k| (0..d).map(move |l| (i, j, k, l)))))
    }

    /// The input gradient of the widest 3x3 convolutions this path takes
    /// (127 channels) on the small planes of a detection head's upper levels
    /// (12x16 and 6x8, as the `bccd` preset's P5-P6) against an f64 sum,
    /// with gradients of the small size they have in training.
    #[test]
    fn input_gradient_of_the_widest_layers_matches_f64() {
        if !has_avx2_fma() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let c = MAX_CHANNELS - 1;
        for (h, w) in [(12, 16), (6, 8)] {
            let g = Geometry::new((2, c, h, w), (c, c, 3, 3), 1, 1).expect("geometry");
            assert!(applies_to_input_grad(&g), "{g:?}");
            let weights: Vec<f32> = random(c * c * 9, &mut rng).iter().map(|v| v * 0.03).collect();
            let grad: Vec<f32> = random(2 * c * h * w, &mut rng).iter().map(|v| v * 1e-6).collect();
            let reference = input_grad_f64(&g, &grad, &weights);
            for isa in [Isa::Avx2, Isa::Avx512Ymm, Isa::Avx512] {
                if !isa.available() || w % isa.lanes() != 0 {
                    continue;
                }
                let mut dx = vec![0f32; reference.len()];
                input_grad_on(isa, &g, &grad, &weights, &mut dx);
                let error = relative_error(&dx, &reference);
                eprintln!("{isa:?} {h}x{w}: relative error {error:.2e}");
                assert!(error < 1e-6, "{isa:?} {h}x{w}: relative error {error:.2e}");
            }
        }
    }

    /// Which layers of the presets' models take this path: the narrow ones
    /// on small planes; 128 channels and more (on either side, or on the
    /// output side at stride 2) go to GEMM at any size.
    #[test]
    fn only_narrow_layers_on_small_planes_take_this_path() {
        if !has_avx2_fma() {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            return;
        }
        let geometry = |c, co, size: (usize, usize), stride| {
            Geometry::new((4, c, size.0, size.1), (co, c, 3, 3), 1, stride).expect("geometry")
        };
        let narrow = [geometry(64, 64, (32, 32), 1), geometry(127, 127, (12, 16), 1), geometry(256, 36, (48, 64), 1)];
        for g in narrow {
            assert!(applies(&g), "{g:?}");
        }
        // The `bccd` body's last stage and its stride-2 entries (layer 2's
        // widens from 64 channels), a head at P5.
        let wide = [
            geometry(512, 512, (12, 16), 1),
            geometry(256, 512, (24, 32), 2),
            geometry(64, 128, (96, 128), 2),
            geometry(128, 128, (12, 16), 1),
        ];
        for g in wide {
            assert!(!applies(&g) && !applies_to_input_grad(&g), "{g:?}");
        }
        assert!(!applies(&geometry(64, 64, (128, 128), 1)), "a plane above MAX_PLANE");
    }

    /// AVX-512's kernels, at 16 lanes and at 8, against AVX2's (which
    /// `conv.rs` checks against Candle) on the same convolutions: the
    /// forward, the weight gradient and, for 3x3 stride 1, the input
    /// gradient. They sum the same products in another order, so they agree
    /// to rounding.
    #[test]
    fn avx512_kernels_match_avx2() {
        if !(has_avx512() && has_avx512vl() && has_avx2_fma()) {
            eprintln!("skipped: this CPU lacks AVX-512");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let cases = [
            ((2, 5, 16, 16), (7, 3, 1, 1)),
            ((1, 16, 32, 32), (16, 3, 1, 1)),
            ((3, 4, 16, 50), (5, 3, 0, 1)),
            ((2, 3, 64, 64), (16, 7, 3, 2)),
            ((2, 6, 31, 32), (4, 3, 1, 2)),
            ((1, 4, 16, 16), (3, 5, 2, 1)),
            ((3, 9, 8, 8), (10, 3, 1, 1)),
            ((2, 4, 12, 24), (5, 3, 1, 1)),
            ((2, 3, 16, 16), (7, 3, 1, 2)),
            // Bands of 10 rows (`BAND_INPUT`), column tiles of 5 and 5.
            ((1, 100, 40, 48), (8, 3, 1, 1)),
        ];
        for ((n, c, h, w), (co, k, p, s)) in cases {
            let g = Geometry::new((n, c, h, w), (co, c, k, k), p, s).expect("geometry");
            let isas =
                if g.out_w.is_multiple_of(16) { vec![Isa::Avx512Ymm, Isa::Avx512] } else { vec![Isa::Avx512Ymm] };
            assert!(applies(&g) && Isa::of(&g) == *isas.last().unwrap(), "{g:?}");
            let x = random(n * c * h * w, &mut rng);
            let weights = random(co * c * k * k, &mut rng);
            let grad = random(n * co * g.out_plane(), &mut rng);
            let forward = |isa| {
                let mut out = vec![0f32; grad.len()];
                forward_on(isa, &g, &x, &weights, &mut out);
                out
            };
            let input_grad = |isa| {
                let mut dx = vec![0f32; x.len()];
                input_grad_on(isa, &g, &grad, &weights, &mut dx);
                dx
            };
            let gradient_rows = gradient_geometry(&g).out_w;
            for isa in isas {
                assert_close(&forward(isa), &forward(Isa::Avx2), &format!("{isa:?} forward {g:?}"));
                let dw = weight_grad_on(isa, &g, &x, &grad);
                assert_close(&dw, &weight_grad_on(Isa::Avx2, &g, &x, &grad), &format!("{isa:?} weight gradient {g:?}"));
                if applies_to_input_grad(&g) && gradient_rows.is_multiple_of(isa.lanes()) {
                    assert_close(&input_grad(isa), &input_grad(Isa::Avx2), &format!("{isa:?} input gradient {g:?}"));
                }
            }
        }
    }
}
