//! Winograd's F(2x2, 3x3) for 3x3 stride-1 convolutions (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2
//! block of outputs comes from a 4x4 input tile with 16 multiplications per
//! channel pair instead of im2col's 36, so the GEMMs, which are most of a
//! training step, do 2.25x less work. With `c` input channels, `co` output
//! channels and `t` tiles:
//!
//! - weights:  `U[xi] = G w G^T`, 16 matrices `[co, c]`
//! - input:    `V[xi] = B^T d B` for every 4x4 tile `d`, 16 matrices `[c, t]`
//! - products: `M[xi] = U[xi] x V[xi]`, 16 GEMMs giving `[co, t]`
//! - output:   `y = A^T M A`, the tile's 2x2 outputs
//!
//! The weight gradient follows from the same identity: `dU[xi]` sums
//! `dM[xi] x V[xi]^T` over the tiles, where `dM = A dy A^T` spreads each
//! tile's 2x2 output gradient over 4x4, and `dw = G^T dU G`, again 2.25x
//! fewer multiplications than `grad x cols^T`.
//!
//! F(2x2, 3x3) is the variant whose transforms only add and halve, so it
//! keeps f32's accuracy (larger tiles save more and lose digits). The
//! input gradient of such a convolution is one as well: the output gradient
//! convolved with the kernel flipped and its two channel axes swapped, with
//! padding `2 - p`. Tiles are taken a band of tile rows at a time so the
//! transformed values stay in cache, like the im2col columns.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use super::{
    for_each_image, matmul, matmul_by_transposed, split_padded_row, sum_over_image_runs, threads, with_columns,
    with_scratch, Geometry, BAND_COLUMNS,
};

thread_local! {
    /// One tile row's rows in the transforms, kept between calls: a
    /// transform runs once per channel and band, and fresh buffers each
    /// time made every thread take the allocator's lock (shared by all
    /// threads for inference, see `runtime.rs`).
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Values per tile: the 4x4 transformed tile.
const TAPS: usize = 16;

/// Narrowest layers that take this path on planes under [`WIDE_PLANE`].
/// Each of the 16 products sums only `c` terms, so for narrow layers
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
/// 16 thin GEMMs, and transforming the weights costs more than the
/// products save (the `shapes` model's 4x4 last stage ran slower).
const MIN_PLANE: usize = 16 * 16;

/// Whether [`forward`] computes this convolution: 3x3, stride 1, padding at
/// most 2 (so its input gradient is one too), wide enough for its plane
/// ([`MIN_CHANNELS`], [`MIN_CHANNELS_WIDE_PLANE`]) and large enough.
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2;
    let min_channels = if g.out_plane() >= WIDE_PLANE { MIN_CHANNELS_WIDE_PLANE } else { MIN_CHANNELS };
    shape && g.c_in.min(g.c_out) >= min_channels && g.out_plane() >= MIN_PLANE
}

/// `out [n, co, out_h, out_w] = conv(x, w)` for a convolution that
/// [`applies`].
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], out: &mut [f32]) {
    let u = transform_weights(g.c_out, g.c_in, |o, i| std::array::from_fn(|tap| w[(o * g.c_in + i) * 9 + tap]));
    transformed_forward(g, x, &u, out);
}

/// [`forward`] with the weights already transformed.
fn transformed_forward(g: &Geometry, x: &[f32], u: &[f32], out: &mut [f32]) {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    for_each_image(g, out, out_image, x, in_image, |dst, image| image_forward(g, image, u, dst));
}

/// `dx [n, c, h, w]` from `grad [n, co, out_h, out_w]` for a convolution
/// that [`applies`]: `grad` convolved with `w` flipped and transposed.
pub(super) fn input_grad(g: &Geometry, grad: &[f32], w: &[f32], dx: &mut [f32]) {
    // Kernel (input channel i, output channel o) of the gradient's
    // convolution: w[o][i] flipped (tap 8 - tap).
    let u = transform_weights(g.c_in, g.c_out, |i, o| std::array::from_fn(|tap| w[(o * g.c_in + i) * 9 + 8 - tap]));
    let transposed = Geometry::new((g.n, g.c_out, g.out_h, g.out_w), (g.c_in, g.c_out, 3, 3), 2 - g.padding, 1)
        .expect("the gradient's convolution has the input's size");
    transformed_forward(&transposed, grad, &u, dx);
}

/// `dw [co, c, 3, 3]` of a convolution that [`applies`], from its input
/// `x` and output gradient `grad`: `dU` summed over images and bands, then
/// `dw = G^T dU G`.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (in_image, out_image) = (g.c_in * g.h * g.w, g.c_out * g.out_plane());
    let run = |(images, grads): (&[f32], &[f32])| {
        let mut du = vec![0f32; TAPS * g.c_out * g.c_in];
        let mut first = true;
        for (image, grad) in images.chunks(in_image).zip(grads.chunks(out_image)) {
            image_weight_grad(g, image, grad, &mut du, &mut first);
        }
        du
    };
    let du = sum_over_image_runs(g, x, grad, TAPS * g.c_out * g.c_in, run);
    untransform_weight_grad(&du, g.c_out, g.c_in)
}

/// Adds one image's `dU[xi] (co x c) += dM[xi] x V[xi]^T` into `du`
/// (`[tap, co, c]`), band by band; `first` says `du` holds nothing yet.
fn image_weight_grad(g: &Geometry, image: &[f32], grad: &[f32], du: &mut [f32], first: &mut bool) {
    let tiles = Tiles::new(g);
    for_each_band(g, image, tiles, |band, v, dm| {
        let len = TAPS * band.tiles;
        per_channel(g, dm, len, |o, dm| transform_grad(g, &grad[o * g.out_plane()..], tiles, band.top, dm));
        let dm = &*dm;
        for_each_tap(g, du, |xi, du, parallelism| {
            let lhs = (&dm[xi * band.tiles..], (len, 1));
            let v = (&v[xi * band.tiles..], len);
            let parallel = (parallelism, !matches!(parallelism, Parallelism::None));
            matmul_by_transposed((g.c_out, g.c_in, band.tiles), (du, g.c_in), !*first, lhs, v, parallel);
        });
        *first = false;
    });
}

/// `dM = A dy A^T` for the tiles of tile rows `top..` of one output
/// channel's gradient `plane [out_h, out_w]` (zero past its edges), into
/// `dm [tap, tile]`; `A = [[1, 0], [1, 1], [1, -1], [0, -1]]`. A tile row
/// at a time, as [`transform_input`].
fn transform_grad(g: &Geometry, plane: &[f32], tiles: Tiles, top: usize, dm: &mut [f32]) {
    let band = dm.len() / TAPS;
    let cols = tiles.cols;
    // One gradient row, zero past its edge, and `A d` along each of the
    // tile row's two rows: `rows [i][j][tx]`.
    with_scratch(&ROWS, 10 * cols, |scratch| {
        let (row, rows) = scratch.split_at_mut(2 * cols);
        for tile_row in 0..band / cols {
            for (i, r) in rows.chunks_exact_mut(4 * cols).enumerate() {
                let y = 2 * (top + tile_row) + i;
                row.fill(0.0);
                if y < g.out_h {
                    row[..g.out_w].copy_from_slice(&plane[y * g.out_w..][..g.out_w]);
                }
                let (r0, rest) = r.split_at_mut(cols);
                let (r1, rest) = rest.split_at_mut(cols);
                let (r2, r3) = rest.split_at_mut(cols);
                for (x, pair) in row.chunks_exact(2).enumerate() {
                    let (d0, d1) = (pair[0], pair[1]);
                    (r0[x], r1[x], r2[x], r3[x]) = (d0, d0 + d1, d0 - d1, -d1);
                }
            }
            let base = tile_row * cols;
            for j in 0..4 {
                let (r0, r1) = (&rows[j * cols..][..cols], &rows[(4 + j) * cols..][..cols]);
                dm[j * band + base..][..cols].copy_from_slice(r0);
                add(&mut dm[(4 + j) * band + base..][..cols], r0, r1);
                subtract(&mut dm[(8 + j) * band + base..][..cols], r0, r1);
                for (out, &value) in dm[(12 + j) * band + base..][..cols].iter_mut().zip(r1) {
                    *out = -value;
                }
            }
        }
    })
}

/// `dw = G^T dU G` for every channel pair of `du [tap, co, c]`, as
/// `[co, c, 3, 3]`; `G^T = [[1, 1/2, 1/2, 0], [0, 1/2, -1/2, 0], [0, 1/2, 1/2, 1]]`.
fn untransform_weight_grad(du: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let g_t = |u: [f32; 4]| [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]];
    let mut dw = vec![0f32; 9 * c_out * c_in];
    dw.par_chunks_mut(9).enumerate().for_each(|(pair, k)| {
        let tap = |i: usize, j: usize| du[(i * 4 + j) * c_out * c_in + pair];
        let columns: [[f32; 3]; 4] = std::array::from_fn(|j| g_t([tap(0, j), tap(1, j), tap(2, j), tap(3, j)]));
        for r in 0..3 {
            let row = g_t([columns[0][r], columns[1][r], columns[2][r], columns[3][r]]);
            k[3 * r..3 * r + 3].copy_from_slice(&row);
        }
    });
    dw
}

/// `U = G k G^T` for the 3x3 kernel `k(o, i)` of every output channel `o`
/// and input channel `i`, as `[co, tap, c]` (tap `xi` is the `[co, c]`
/// matrix with rows `16 c` apart), output channels in parallel;
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`.
fn transform_weights(c_out: usize, c_in: usize, kernel: impl Fn(usize, usize) -> [f32; 9] + Sync) -> Vec<f32> {
    let mut u = vec![0f32; TAPS * c_out * c_in];
    let g_rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    u.par_chunks_mut(TAPS * c_in).enumerate().for_each(|(o, u)| {
        for i in 0..c_in {
            let k = kernel(o, i);
            let columns: [[f32; 4]; 3] = std::array::from_fn(|j| g_rows(k[j], k[3 + j], k[6 + j]));
            for r in 0..4 {
                let row = g_rows(columns[0][r], columns[1][r], columns[2][r]);
                for (j, &value) in row.iter().enumerate() {
                    u[(r * 4 + j) * c_in + i] = value;
                }
            }
        }
    });
    u
}

/// Tile rows and columns of one output plane, and the band height.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    rows: usize,
    cols: usize,
    band_rows: usize,
}

impl Tiles {
    fn new(g: &Geometry) -> Self {
        let (rows, cols) = (g.out_h.div_ceil(2), g.out_w.div_ceil(2));
        let band_rows = (BAND_COLUMNS / (TAPS * g.c_in * cols).max(1)).clamp(1, rows.max(1));
        Self { rows, cols, band_rows }
    }
}

/// One image, band by band: transform the input tiles, 16 GEMMs, transform
/// the products back into `dst [co, out_h, out_w]`.
fn image_forward(g: &Geometry, image: &[f32], u: &[f32], dst: &mut [f32]) {
    let tiles = Tiles::new(g);
    for_each_band(g, image, tiles, |band, v, m| {
        let len = TAPS * band.tiles;
        // The products as `m [tap, co, tile]`: tap `xi`'s GEMM writes one run.
        let per_tap = g.c_out * band.tiles;
        for_each_tap(g, &mut m[..TAPS * per_tap], |xi, m, parallelism| {
            let lhs = (&u[xi * g.c_in..], (TAPS * g.c_in, 1));
            let rhs = (&v[xi * band.tiles..], (len, 1));
            matmul((g.c_out, band.tiles, g.c_in), (m, band.tiles), false, lhs, rhs, parallelism);
        });
        let m = &*m;
        per_channel(g, dst, g.out_plane(), |o, out| {
            transform_output(g, |xi| &m[xi * per_tap + o * band.tiles..][..band.tiles], tiles, band, out)
        });
    });
}

/// `f(tap, products, parallelism)` on each of the 16 taps' runs of
/// `products`. With a whole image per thread, one after another on this
/// thread. Otherwise (fewer images than threads, as in inference) the taps
/// are spread over the threads, each GEMM on one: one hand-over per band
/// instead of one per GEMM, which made a ResNet-18-FPN's 256-channel head
/// convolution at 64x64 20% faster at batch 1 (BENCHMARKS.md, 2026-12-03,
/// Intel). With more threads than taps the GEMMs share the threads instead.
fn for_each_tap(g: &Geometry, products: &mut [f32], f: impl Fn(usize, &mut [f32], Parallelism) + Sync) {
    let per_tap = products.len() / TAPS;
    if g.per_thread() || threads() > TAPS {
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
fn for_each_band(g: &Geometry, image: &[f32], tiles: Tiles, mut f: impl FnMut(TileBand, &[f32], &mut [f32])) {
    for top in (0..tiles.rows).step_by(tiles.band_rows) {
        let rows = tiles.band_rows.min(tiles.rows - top);
        let band = TileBand { top, tiles: rows * tiles.cols };
        with_columns(TAPS * band.tiles * (g.c_in + g.c_out), |scratch| {
            let (v, rest) = scratch.split_at_mut(TAPS * band.tiles * g.c_in);
            per_channel(g, v, TAPS * band.tiles, |c, v| transform_input(g, &image[c * g.h * g.w..], tiles, top, v));
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

/// `V = B^T d B` for the tiles of tile rows `first..` of one input channel
/// `plane [h, w]` (zero outside it), into `v [tap, tile]`;
/// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
///
/// A tile row at a time, all its tiles at once: tile column `tx` reads
/// columns `2tx..2tx + 4` of each zero-bordered input row, so with the row
/// split into even and odd columns, tap column `j` of every tile is one
/// contiguous run (phase `j % 2` from `j / 2`), and each step below is an
/// add over whole runs that the compiler vectorises. The sums are the ones
/// a tile at a time would make, in the same order.
fn transform_input(g: &Geometry, plane: &[f32], tiles: Tiles, first: usize, v: &mut [f32]) {
    let band = v.len() / TAPS;
    let cols = tiles.cols;
    let half = cols + 1;
    // The even and odd columns of one zero-bordered input row, and B^T d
    // along each of the tile row's four input rows: `rows [i][j][tx]`.
    with_scratch(&ROWS, 2 * half + TAPS * cols, |scratch| {
        let (phases, rows) = scratch.split_at_mut(2 * half);
        for tile_row in 0..band / cols {
            for (i, r) in rows.chunks_exact_mut(4 * cols).enumerate() {
                let y = (2 * (first + tile_row) + i) as isize - g.padding as isize;
                let row = if (0..g.h as isize).contains(&y) { &plane[y as usize * g.w..][..g.w] } else { &[] };
                split_padded_row(row, g.padding, phases);
                let (even, odd) = phases.split_at(half);
                let d = [&even[..cols], &odd[..cols], &even[1..], &odd[1..]];
                let (r0, rest) = r.split_at_mut(cols);
                let (r1, rest) = rest.split_at_mut(cols);
                let (r2, r3) = rest.split_at_mut(cols);
                subtract(r0, d[0], d[2]);
                add(r1, d[1], d[2]);
                subtract(r2, d[2], d[1]);
                subtract(r3, d[1], d[3]);
            }
            let base = tile_row * cols;
            for j in 0..4 {
                let r = |i: usize| &rows[(i * 4 + j) * cols..][..cols];
                subtract(&mut v[j * band + base..][..cols], r(0), r(2));
                add(&mut v[(4 + j) * band + base..][..cols], r(1), r(2));
                subtract(&mut v[(8 + j) * band + base..][..cols], r(2), r(1));
                subtract(&mut v[(12 + j) * band + base..][..cols], r(1), r(3));
            }
        }
    })
}

/// `out = a + b`, element by element.
fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((out, a), b) in out.iter_mut().zip(a).zip(b) {
        *out = a + b;
    }
}

/// `out = a - b`, element by element.
fn subtract(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((out, a), b) in out.iter_mut().zip(a).zip(b) {
        *out = a - b;
    }
}

/// `y = A^T M A` for one output channel's products of `band` (`m(tap)`:
/// that tap's run over the band's tiles), written into its plane `out [out_h, out_w]`
/// (tiles past the edge are cropped); `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
/// A tile row at a time, as [`transform_input`]: each tap is a contiguous
/// run over the row's tiles, and the sums are a tile's, in its order.
fn transform_output<'a>(g: &Geometry, m: impl Fn(usize) -> &'a [f32], tiles: Tiles, band: TileBand, out: &mut [f32]) {
    let cols = tiles.cols;
    // A^T M along each tap column j: `columns [j][i][tx]`; then one output
    // row's even and odd columns.
    with_scratch(&ROWS, 10 * cols, |scratch| {
        let (columns, rest) = scratch.split_at_mut(8 * cols);
        let (even, odd) = rest.split_at_mut(cols);
        for tile_row in 0..band.tiles / cols {
            let tap = |i: usize, j: usize| &m(i * 4 + j)[tile_row * cols..][..cols];
            for (j, column) in columns.chunks_exact_mut(2 * cols).enumerate() {
                let (first, second) = column.split_at_mut(cols);
                a_t(first, second, [tap(0, j), tap(1, j), tap(2, j), tap(3, j)]);
            }
            for i in 0..2 {
                let y = 2 * (band.top + tile_row) + i;
                if y >= g.out_h {
                    break;
                }
                let column = |j: usize| &columns[(2 * j + i) * cols..][..cols];
                a_t(even, odd, [column(0), column(1), column(2), column(3)]);
                for (pair, (&e, &o)) in out[y * g.out_w..][..g.out_w].chunks_mut(2).zip(even.iter().zip(odd.iter())) {
                    pair[0] = e;
                    if let Some(second) = pair.get_mut(1) {
                        *second = o;
                    }
                }
            }
        }
    })
}

/// `A^T s` for runs `s[0..4]`: `first = s0 + s1 + s2`, `second = s1 - s2 - s3`.
fn a_t(first: &mut [f32], second: &mut [f32], s: [&[f32]; 4]) {
    for x in 0..first.len() {
        first[x] = s[0][x] + s[1][x] + s[2][x];
        second[x] = s[1][x] - s[2][x] - s[3][x];
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::ops::testing::relative_error;

    /// Forward, input gradient and weight gradient against sums in f64, on
    /// a 128-channel layer whose 18x21 output leaves a cropped tile at one
    /// edge, two images: the relative L2 error of each. Measured 2026-12-02:
    /// 3.5e-7, 3.5e-7 and 3.1e-7; F(4x4, 3x3) with Lavin and Gray's
    /// matrices, tried then, gave 2.2e-6, 2.2e-6 and 1.2e-6 (BENCHMARKS.md).
    #[test]
    fn matches_f64_sums() {
        // Two images (a thread each on two threads) and one (the taps
        // spread over the threads); and a 64-channel layer on a plane of
        // 64x65 (a ResNet's layer 1).
        for (n, c_in, c_out, h, w) in [(2, 128, 130, 18, 21), (1, 128, 130, 18, 21), (1, 64, 66, 64, 65)] {
            matches_f64_sums_with(Geometry::new((n, c_in, h, w), (c_out, c_in, 3, 3), 1, 1).expect("geometry"));
        }
    }

    fn matches_f64_sums_with(g: Geometry) {
        assert!(applies(&g));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (x, w) = (random(g.n * g.c_in * g.h * g.w), random(g.c_out * g.c_in * 9));
        let dy = random(g.n * g.c_out * g.out_plane());
        let (mut y, mut dx) = (vec![0f32; dy.len()], vec![0f32; x.len()]);
        forward(&g, &x, &w, &mut y);
        input_grad(&g, &dy, &w, &mut dx);
        let dw = weight_grad(&g, &x, &dy);
        let (y64, dx64, dw64) = reference(&g, &x, &w, &dy);
        let errors = [("forward", &y, &y64), ("input gradient", &dx, &dx64), ("weight gradient", &dw, &dw64)]
            .map(|(what, ours, reference)| (what, relative_error(ours, reference)));
        assert!(errors.iter().all(|&(_, error)| error < 1e-6), "relative errors {errors:?}");
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
