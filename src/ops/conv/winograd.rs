//! Winograd's minimal filtering for 3x3 stride-1 convolutions (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each
//! m x m block of outputs comes from an (m + 2) x (m + 2) input tile with
//! (m + 2)^2 multiplications per channel pair instead of im2col's 9 m^2,
//! so the GEMMs, which are most of a training step, do less work: 2.25x
//! with F(2x2, 3x3) ([`f2`]), 4x with F(4x4, 3x3) ([`f4`]), which takes the
//! large planes. With `c` input channels, `co` output channels, `t` tiles
//! and `s = m + 2`:
//!
//! - weights:  `U[xi] = G w G^T`, `s^2` matrices `[co, c]`
//! - input:    `V[xi] = B^T d B` for every tile `d`, `s^2` matrices `[c, t]`
//! - products: `M[xi] = U[xi] x V[xi]`, `s^2` GEMMs giving `[co, t]`
//! - output:   `y = A^T M A`, the tile's m x m outputs
//!
//! The weight gradient follows from the same identity: `dU[xi]` sums
//! `dM[xi] x V[xi]^T` over the tiles, where `dM = A dy A^T` spreads each
//! tile's output gradient over the tile, and `dw = G^T dU G`, with as few
//! multiplications as the forward. The input gradient of such a
//! convolution is one as well: the output gradient convolved with the
//! kernel flipped and its two channel axes swapped, with padding `2 - p`.
//! Tiles are taken a band of tile rows at a time so the transformed values
//! stay in cache, like the im2col columns; `transforms.rs` holds the
//! transforms, and `f2.rs` and `f4.rs` the matrices.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{for_each_image, matmul, matmul_by_transposed, sum_over_image_runs, threads, with_columns, Geometry};
use f2::F2x2;
use f4::F4x4;
use transforms::{Matrices, LANES};

mod f2;
mod f4;
mod transforms;

thread_local! {
    /// The rows of a band's transforms, kept between calls: a transform
    /// runs once per channel and band, and fresh buffers each time made
    /// every thread take the allocator's lock (shared by all threads for
    /// inference, see `runtime.rs`).
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Narrowest layers that take this path on planes under [`WIDE_PLANE`].
/// Each of the products sums only `c` terms, so for narrow layers
/// writing and re-reading them can cost more than the multiplications
/// saved.
///
/// On small planes narrow layers do gain (2026-12-02, AVX2, forward +
/// backward: 64 channels 16x16 n8 8.6 ms against 9.9, 32x32 n8 26 against
/// 37), and taking them made the `shapes` training step about 15% faster.
/// But the quickstart then ended at AP 0.632 / AP50 0.890 against 0.654 /
/// 0.914, and with `train.seed = 1` at 0.627 / 0.891 against 0.641 / 0.900
/// (BENCHMARKS.md): lower with both seeds, so narrow layers on small planes
/// stay on im2col.
const MIN_CHANNELS: usize = 128;

/// Output planes from which 64-channel layers take this path too: a
/// ResNet's layer 1 (64 channels at a quarter of the image's side). With
/// the transforms a row at a time and the taps over the threads, the
/// `bccd` recipe's layer 1 (96x128, batch 4) took 161-168 ms a step,
/// forward and both gradients, against 271-306 with im2col, and a
/// ResNet-18's at 128x128, batch 1 (inference), 20-21 ms against 30-34
/// (BENCHMARKS.md, 2026-12-03, Intel). No layer of the `shapes` model is
/// this wide on so large a plane.
const WIDE_PLANE: usize = 64 * 64;

/// The narrowest layers on a [`WIDE_PLANE`].
const MIN_CHANNELS_WIDE_PLANE: usize = 64;

/// Smallest output planes that take this path: a few tiles per image make
/// thin GEMMs, and transforming the weights costs more than the products
/// save (the `shapes` model's 4x4 last stage ran slower). At 12x16 (the
/// `bccd` recipe's last stage, 48 tiles an image) the forward and backward
/// at batch 4 took 28.5-30.5 ms against 33.8-34.0 through im2col for 512
/// channels, 8.6 against 10.1 for 256, and the same for 128 (3.5 and 3.4;
/// Intel, 2026-12-03).
const MIN_PLANE: usize = 12 * 16;

/// Smallest output planes that take F(4x4, 3x3) rather than F(2x2, 3x3):
/// 192 of its tiles an image. With fewer, its 36 thin GEMMs repack the
/// transformed weights (36 values per channel pair) for too few columns.
/// Forward and both gradients, `cargo bench --bench conv` (2026-12-03,
/// Intel, two runs each, F(2x2) / F(4x4)): 128 channels at 64x64, batch
/// 2, 0.028 / 0.021 s; 64 channels at 128x128, batch 4, 0.096 / 0.085;
/// 256 at 32x32 even (0.019 / 0.019-0.025); 256 at 16x16 0.008 / 0.012;
/// 512 at 16x16 0.03 / 0.09.
const MIN_PLANE_F4: usize = 48 * 64;

/// Whether [`forward`] computes this convolution: 3x3, stride 1, padding at
/// most 2 (so its input gradient is one too), wide enough for its plane
/// ([`MIN_CHANNELS`], [`MIN_CHANNELS_WIDE_PLANE`]) and large enough.
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2;
    let min_channels = if g.out_plane() >= WIDE_PLANE { MIN_CHANNELS_WIDE_PLANE } else { MIN_CHANNELS };
    shape && g.c_in.min(g.c_out) >= min_channels && g.out_plane() >= MIN_PLANE
}

/// Whether a convolution that [`applies`] takes F(4x4, 3x3).
fn large_tiles(g: &Geometry) -> bool {
    g.out_plane() >= MIN_PLANE_F4
}

/// `out [n, co, out_h, out_w] = conv(x, w)` for a convolution that
/// [`applies`].
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    if large_tiles(g) {
        forward_with::<F4x4, 4, 6>(g, x, w, out)
    } else {
        forward_with::<F2x2, 2, 4>(g, x, w, out)
    }
}

/// `dx [n, c, h, w]` from `grad [n, co, out_h, out_w]` for a convolution
/// that [`applies`]: `grad` convolved with `w` flipped and transposed.
pub(super) fn input_grad(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    if large_tiles(g) {
        input_grad_with::<F4x4, 4, 6>(g, grad, w, dx)
    } else {
        input_grad_with::<F2x2, 2, 4>(g, grad, w, dx)
    }
}

/// `dw [co, c, 3, 3]` of a convolution that [`applies`], from its input
/// `x` and output gradient `grad`.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    if large_tiles(g) {
        weight_grad_with::<F4x4, 4, 6>(g, x, grad)
    } else {
        weight_grad_with::<F2x2, 2, 4>(g, x, grad)
    }
}

/// [`forward`] with variant `V`, F(O x O, 3x3) on tiles of side `S`.
fn forward_with<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
) {
    let kernel = |o: usize, i: usize| std::array::from_fn(|tap| w[(o * g.c_in + i) * 9 + tap]);
    let u = transform_weights::<V, O, S>(g.c_out, g.c_in, kernel);
    transformed_forward::<V, O, S>(g, x, &u, out);
}

/// [`forward_with`] with the weights already transformed.
fn transformed_forward<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    out: &mut [f32],
) {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    for_each_image(g, out, out_image, x, in_image, |dst, image| image_forward::<V, O, S>(g, image, u, dst));
}

/// [`input_grad`] with variant `V`.
fn input_grad_with<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    grad: &[f32],
    w: &[f32],
    dx: &mut [f32],
) {
    // Kernel (input channel i, output channel o) of the gradient's
    // convolution: w[o][i] flipped (tap 8 - tap).
    let kernel = |i: usize, o: usize| std::array::from_fn(|tap| w[(o * g.c_in + i) * 9 + 8 - tap]);
    let u = transform_weights::<V, O, S>(g.c_in, g.c_out, kernel);
    let transposed = Geometry::new((g.n, g.c_out, g.out_h, g.out_w), (g.c_in, g.c_out, 3, 3), 2 - g.padding, 1)
        .expect("the gradient's convolution has the input's size");
    transformed_forward::<V, O, S>(&transposed, grad, &u, dx);
}

/// [`weight_grad`] with variant `V`: `dU` summed over images and bands,
/// then `dw = G^T dU G`.
fn weight_grad_with<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    x: &[f32],
    grad: &[f32],
) -> Vec<f32> {
    let (in_image, out_image, taps) = (g.c_in * g.h * g.w, g.c_out * g.out_plane(), S * S);
    let run = |(images, grads): (&[f32], &[f32])| {
        let mut du = vec![0f32; taps * g.c_out * g.c_in];
        let mut first = true;
        for (image, grad) in images.chunks(in_image).zip(grads.chunks(out_image)) {
            image_weight_grad::<V, O, S>(g, image, grad, &mut du, &mut first);
        }
        du
    };
    let du = sum_over_image_runs(g, x, grad, taps * g.c_out * g.c_in, run);
    let mut dw = vec![0f32; 9 * g.c_out * g.c_in];
    let pairs = g.c_out * g.c_in;
    dw.par_chunks_mut(9).enumerate().for_each(|(pair, k)| {
        k.copy_from_slice(&transforms::kernel_grad::<V, O, S>(|tap| du[tap * pairs + pair]));
    });
    dw
}

/// Adds one image's `dU[xi] (co x c) += dM[xi] x V[xi]^T` into `du`
/// (`[tap, co, c]`), band by band; `first` says `du` holds nothing yet.
fn image_weight_grad<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    image: &[f32],
    grad: &[f32],
    du: &mut [f32],
    first: &mut bool,
) {
    let tiles = Tiles::new(g, O, S * S);
    for_each_band::<V, O, S>(g, image, tiles, |band, v, dm| {
        let len = S * S * band.tiles;
        per_channel(g, dm, len, |o, dm| {
            transforms::output_grad::<V, O, S>(g, &grad[o * g.out_plane()..], tiles, band.top, dm)
        });
        let dm = &*dm;
        for_each_tap(g, S * S, du, |xi, du, parallelism| {
            let lhs = (&dm[xi * band.tiles..], (len, 1));
            let v = (&v[xi * band.tiles..], len);
            let parallel = (parallelism, !matches!(parallelism, Parallelism::None));
            matmul_by_transposed((g.c_out, g.c_in, band.tiles), (du, g.c_in), !*first, lhs, v, parallel);
        });
        *first = false;
    });
}

/// `U = G k G^T` for the 3x3 kernel `k(o, i)` of every output channel `o`
/// and input channel `i`, as `[co, tap, c]` (tap `xi` is the `[co, c]`
/// matrix with rows `S^2 c` apart), output channels in parallel, `LANES`
/// input channels at a time so that each tap's values are written as one
/// run.
fn transform_weights<V: Matrices<O, S>, const O: usize, const S: usize>(
    c_out: usize,
    c_in: usize,
    kernel: impl Fn(usize, usize) -> [f32; 9] + Sync,
) -> Vec<f32> {
    let mut u = vec![0f32; S * S * c_out * c_in];
    u.par_chunks_mut(S * S * c_in).enumerate().for_each(|(o, u)| {
        for first in (0..c_in).step_by(LANES) {
            let count = LANES.min(c_in - first);
            let mut k = [[0f32; LANES]; 9];
            for lane in 0..count {
                for (tap, value) in k.iter_mut().zip(kernel(o, first + lane)) {
                    tap[lane] = value;
                }
            }
            let tile = transforms::kernels::<V, O, S>(&k);
            for (tap, values) in tile.as_flattened().iter().enumerate() {
                u[tap * c_in + first..][..count].copy_from_slice(&values[..count]);
            }
        }
    });
    u
}

/// Most transformed input values of one band of tile rows (8 MiB; as many
/// again for its products). Half of that cut a 128-channel 56x76 layer
/// (the `bccd` recipe's P3 at 448x608) into bands of 11 and 3 tile rows,
/// and its forward at batch 4 took 8.2-8.6 ms against 7.4-7.6 in one band;
/// ResNet-50-FPN's 256-channel 100x152 head layer (800x1333, batch 1)
/// 25.5 ms against 19.6 (2026-12-04, Intel).
const BAND_VALUES: usize = 1 << 21;

/// Tile rows and columns of one output plane, and the band height: bands
/// of equal height, each within [`BAND_VALUES`].
#[derive(Debug, Clone, Copy)]
struct Tiles {
    rows: usize,
    cols: usize,
    band_rows: usize,
}

impl Tiles {
    /// Tiles of `out` outputs a side, `taps` transformed values each.
    fn new(g: &Geometry, out: usize, taps: usize) -> Self {
        let (rows, cols) = (g.out_h.div_ceil(out), g.out_w.div_ceil(out));
        let most = (BAND_VALUES / (taps * g.c_in * cols).max(1)).clamp(1, rows.max(1));
        let bands = rows.max(1).div_ceil(most);
        let band_rows = rows.max(1).div_ceil(bands);
        Self { rows, cols, band_rows }
    }
}

/// One image, band by band: transform the input tiles, one GEMM per tap,
/// transform the products back into `dst [co, out_h, out_w]`.
fn image_forward<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    image: &[f32],
    u: &[f32],
    dst: &mut [f32],
) {
    let (tiles, taps) = (Tiles::new(g, O, S * S), S * S);
    for_each_band::<V, O, S>(g, image, tiles, |band, v, m| {
        let len = taps * band.tiles;
        // The products as `m [tap, co, tile]`: tap `xi`'s GEMM writes one run.
        let per_tap = g.c_out * band.tiles;
        for_each_tap(g, taps, &mut m[..taps * per_tap], |xi, m, parallelism| {
            let lhs = (&u[xi * g.c_in..], (taps * g.c_in, 1));
            let rhs = (&v[xi * band.tiles..], (len, 1));
            matmul((g.c_out, band.tiles, g.c_in), (m, band.tiles), false, lhs, rhs, parallelism);
        });
        let m = &*m;
        per_channel(g, dst, g.out_plane(), |o, out| {
            let products = |xi: usize| &m[xi * per_tap + o * band.tiles..][..band.tiles];
            transforms::output::<V, O, S>(g, products, tiles, band, out)
        });
    });
}

/// `f(tap, products, parallelism)` on each of the `taps` runs of
/// `products`. With a whole image per thread, one after another on this
/// thread. Otherwise (fewer images than threads, as in inference) the taps
/// are spread over the threads, each GEMM on one: one hand-over per band
/// instead of one per GEMM, which made a ResNet-18-FPN's 256-channel head
/// convolution at 64x64 20% faster at batch 1 (BENCHMARKS.md, 2026-12-03,
/// Intel). With more threads than taps the GEMMs share the threads instead.
fn for_each_tap(g: &Geometry, taps: usize, products: &mut [f32], f: impl Fn(usize, &mut [f32], Parallelism) + Sync) {
    let per_tap = products.len() / taps;
    if g.per_thread() || threads() > taps {
        products.chunks_mut(per_tap).enumerate().for_each(|(xi, run)| f(xi, run, g.gemm_parallelism()));
    } else {
        products.par_chunks_mut(per_tap).enumerate().for_each(|(xi, run)| f(xi, run, Parallelism::None));
    }
}

/// A band of tile rows of one image: the first row, and the tiles in it.
#[derive(Debug, Clone, Copy)]
struct TileBand {
    top: usize,
    tiles: usize,
}

/// Calls `f(band, v, scratch)` for each band of tile rows of `image`, with
/// `v` holding the band's transformed input and `scratch` room for as many
/// values per output channel. Both are `[channel, tap, tile]`: a channel's
/// values are contiguous for the transforms, and tap `xi` is a strided
/// `[channel, tile]` matrix for the GEMMs.
fn for_each_band<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    image: &[f32],
    tiles: Tiles,
    mut f: impl FnMut(TileBand, &[f32], &mut [f32]),
) {
    for top in (0..tiles.rows).step_by(tiles.band_rows) {
        let rows = tiles.band_rows.min(tiles.rows - top);
        let band = TileBand { top, tiles: rows * tiles.cols };
        let per_channel_values = S * S * band.tiles;
        with_columns(per_channel_values * (g.c_in + g.c_out), |scratch| {
            let (v, rest) = scratch.split_at_mut(per_channel_values * g.c_in);
            per_channel(g, v, per_channel_values, |c, v| {
                transforms::input::<V, O, S>(g, &image[c * g.h * g.w..], tiles, top, v)
            });
            f(band, v, rest);
        });
    }
}

/// `f(channel, values)` on each `len`-float run of `data`: on every thread,
/// unless each thread already has an image of its own.
fn per_channel(g: &Geometry, data: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if g.per_thread() {
        data.chunks_mut(len).enumerate().for_each(|(c, d)| f(c, d));
    } else {
        data.par_chunks_mut(len).enumerate().for_each(|(c, d)| f(c, d));
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ops::testing::relative_error;

    /// Forward, input gradient and weight gradient against sums in f64, on
    /// a 128-channel layer whose 18x21 output leaves a cropped tile at the
    /// edges, two images: the relative L2 error of each. Measured
    /// 2026-12-02 for F(2x2, 3x3): 3.5e-7, 3.5e-7 and 3.1e-7.
    #[test]
    fn f2_matches_f64_sums() {
        for g in test_geometries() {
            matches_f64_sums_with::<F2x2, 2, 4>(g, 1e-6);
        }
    }

    /// The same for F(4x4, 3x3), whose larger constants lose more digits:
    /// measured 2026-12-03 2.2e-6, 2.2e-6 and 1.2e-6 on the first layer,
    /// and 3.2e-6 on the weight gradient of the 64x65 one (its sum runs
    /// over the most tiles).
    #[test]
    fn f4_matches_f64_sums() {
        for g in test_geometries() {
            matches_f64_sums_with::<F4x4, 4, 6>(g, 1e-5);
        }
    }

    /// The transforms compiled for AVX-512, AVX2 and baseline x86-64
    /// (`pulp`'s dispatch picks the CPU's widest at run time) give the same
    /// bits, forward and both gradients, F(2x2) and F(4x4): the same
    /// operations in the same order on every lane. Each level this CPU has
    /// runs, so an AVX-512 machine checks the AVX2 version too.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transforms_give_the_same_bits_on_every_instruction_set() {
        let levels: Vec<pulp::Arch> = [
            Some(pulp::Arch::Scalar),
            pulp::x86::V3::try_new().map(pulp::Arch::V3),
            pulp::x86::V4::try_new().map(pulp::Arch::V4),
        ]
        .into_iter()
        .flatten()
        .collect();
        eprintln!("instruction sets: {:?}", levels.iter().map(|&arch| name(arch)).collect::<Vec<_>>());
        for g in test_geometries() {
            let f2 = levels.iter().map(|&arch| outputs_on::<F2x2, 2, 4>(&g, arch)).collect::<Vec<_>>();
            let f4 = levels.iter().map(|&arch| outputs_on::<F4x4, 4, 6>(&g, arch)).collect::<Vec<_>>();
            for (runs, variant) in [(f2, "F(2x2)"), (f4, "F(4x4)")] {
                for (run, arch) in runs.iter().zip(&levels).skip(1) {
                    assert!(run == &runs[0], "{variant} on {} differs from baseline x86-64 on {g:?}", name(*arch));
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn name(arch: pulp::Arch) -> &'static str {
        match arch {
            pulp::Arch::V4(_) => "AVX-512",
            pulp::Arch::V3(_) => "AVX2",
            _ => "baseline x86-64",
        }
    }

    /// The forward, input gradient and weight gradient's bits with the
    /// transforms on `arch`, from fixed random tensors.
    #[cfg(target_arch = "x86_64")]
    fn outputs_on<V: Matrices<O, S>, const O: usize, const S: usize>(g: &Geometry, arch: pulp::Arch) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w) = (random(g.n * g.c_in * g.h * g.w), random(g.c_out * g.c_in * 9));
        let dy = random(g.n * g.c_out * g.out_plane());
        let (mut y, mut dx) = (vec![0f32; dy.len()], vec![0f32; x.len()]);
        *transforms::FORCED_ARCH.write().expect("the forced instruction set") = Some(arch);
        forward_with::<V, O, S>(g, &x, &w, &mut y);
        input_grad_with::<V, O, S>(g, &dy, &w, &mut dx);
        let dw = weight_grad_with::<V, O, S>(g, &x, &dy);
        *transforms::FORCED_ARCH.write().expect("the forced instruction set") = None;
        [y, dx, dw].concat().iter().map(|v| v.to_bits()).collect()
    }

    /// Bands of tile rows hold at most [`BAND_VALUES`] transformed values
    /// (unless one row holds more) and are of equal height but for the
    /// last; the tall case is `conv.rs`'s several-band test.
    #[test]
    fn bands_are_even_and_within_the_budget() {
        for ((h, w), c, several) in [((120, 64), 128, true), ((56, 76), 128, false), ((28, 38), 256, false)] {
            let g = Geometry::new((1, c, h, w), (c, c, 3, 3), 1, 1).expect("geometry");
            let (out, taps) = if large_tiles(&g) { (4, 36) } else { (2, 16) };
            let tiles = Tiles::new(&g, out, taps);
            let bands = tiles.rows.div_ceil(tiles.band_rows);
            assert_eq!(bands > 1, several, "{h}x{w}: {tiles:?}");
            assert!(tiles.band_rows * tiles.cols * taps * c <= BAND_VALUES, "{h}x{w}: {tiles:?}");
            assert!(tiles.rows - (bands - 1) * tiles.band_rows + 1 >= tiles.band_rows, "{h}x{w}: {tiles:?}");
        }
    }

    /// Two images (a thread each on two threads) and one (the taps spread
    /// over the threads); a 64-channel layer on a plane of 64x65 (a
    /// ResNet's layer 1); and padding 0 and 2 (the input gradient of each
    /// other).
    fn test_geometries() -> Vec<Geometry> {
        [(2, 128, 130, 18, 21, 1), (1, 128, 130, 18, 21, 1), (1, 64, 66, 64, 65, 1), (1, 128, 128, 19, 22, 0)]
            .into_iter()
            .map(|(n, c_in, c_out, h, w, p)| {
                Geometry::new((n, c_in, h, w), (c_out, c_in, 3, 3), p, 1).expect("geometry")
            })
            .collect()
    }

    fn matches_f64_sums_with<V: Matrices<O, S>, const O: usize, const S: usize>(g: Geometry, bound: f64) {
        assert!(applies(&g));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w) = (random(g.n * g.c_in * g.h * g.w), random(g.c_out * g.c_in * 9));
        let dy = random(g.n * g.c_out * g.out_plane());
        let (mut y, mut dx) = (vec![0f32; dy.len()], vec![0f32; x.len()]);
        forward_with::<V, O, S>(&g, &x, &w, &mut y);
        input_grad_with::<V, O, S>(&g, &dy, &w, &mut dx);
        let dw = weight_grad_with::<V, O, S>(&g, &x, &dy);
        let (y64, dx64, dw64) = reference(&g, &x, &w, &dy);
        let errors = [("forward", &y, &y64), ("input gradient", &dx, &dx64), ("weight gradient", &dw, &dw64)]
            .map(|(what, ours, reference)| (what, relative_error(ours, reference)));
        assert!(errors.iter().all(|&(_, error)| error < bound), "relative errors {errors:?} on {g:?}");
    }

    /// The convolution's output, input gradient and weight gradient, each
    /// product summed in f64.
    fn reference(g: &Geometry, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; dy.len()];
        let (mut dx, mut dw) = (vec![0f64; x.len()], vec![0f64; w.len()]);
        let p = g.padding as isize;
        for n in 0..g.n {
            for (o, oy, ox) in
                (0..g.c_out).flat_map(|o| (0..g.out_h).flat_map(move |oy| (0..g.out_w).map(move |ox| (o, oy, ox))))
            {
                let out = ((n * g.c_out + o) * g.out_h + oy) * g.out_w + ox;
                for (c, ky, kx) in
                    (0..g.c_in).flat_map(|c| (0..3).flat_map(move |ky| (0..3).map(move |kx| (c, ky, kx))))
                {
                    let (iy, ix) = (oy as isize + ky as isize - p, ox as isize + kx as isize - p);
                    if (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix) {
                        let input = ((n * g.c_in + c) * g.h + iy as usize) * g.w + ix as usize;
                        let weight = ((o * g.c_in + c) * 3 + ky) * 3 + kx;
                        y[out] += x[input] as f64 * w[weight] as f64;
                        dx[input] += dy[out] as f64 * w[weight] as f64;
                        dw[weight] += dy[out] as f64 * x[input] as f64;
                    }
                }
            }
        }
        (y, dx, dw)
    }
}
