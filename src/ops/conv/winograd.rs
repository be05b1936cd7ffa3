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

use rayon::prelude::*;

use super::{for_each_image, matmul, sum_over_image_runs, with_columns, Geometry, BAND_COLUMNS};

/// Values per tile: the 4x4 transformed tile.
const TAPS: usize = 16;

/// Narrowest layers that take this path. Each of the 16 products sums only
/// `c` terms, so for narrow layers writing and re-reading them costs more
/// than the multiplications saved: at 64 channels a 128x128 convolution
/// ran at half its im2col speed, at 128 and more every case of
/// `cargo bench --bench conv` ran faster.
///
/// On small planes narrow layers do gain (2026-12-02, AVX2, forward +
/// backward: 64 channels 16x16 n8 8.6 ms against 9.9, 32x32 n8 26 against
/// 37), and taking them made the `shapes` training step about 15% faster.
/// But the quickstart then ended at AP 0.632 / AP50 0.890 against 0.654 /
/// 0.914, and with `train.seed = 1` at 0.627 / 0.891 against 0.641 / 0.900
/// (BENCHMARKS.md): lower with both seeds, so narrow layers stay on im2col.
const MIN_CHANNELS: usize = 128;

/// Smallest output planes that take this path: a few tiles per image make
/// 16 thin GEMMs, and transforming the weights costs more than the
/// products save (the `shapes` model's 4x4 last stage ran slower).
const MIN_PLANE: usize = 16 * 16;

/// Whether [`forward`] computes this convolution: 3x3, stride 1, padding at
/// most 2 (so its input gradient is one too), wide and large enough.
pub(super) fn applies(g: &Geometry) -> bool {
    let shape = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.padding <= 2;
    shape && g.c_in.min(g.c_out) >= MIN_CHANNELS && g.out_plane() >= MIN_PLANE
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
    let parallelism = g.gemm_parallelism();
    let tiles = Tiles::new(g);
    for_each_band(g, image, tiles, |band, v, dm| {
        let len = TAPS * band.tiles;
        per_channel(g, dm, len, |o, dm| transform_grad(g, &grad[o * g.out_plane()..], tiles, band.top, dm));
        for xi in 0..TAPS {
            let lhs = (&dm[xi * band.tiles..], (len, 1));
            let rhs_t = (&v[xi * band.tiles..], (1, len));
            let dst = (&mut du[xi * g.c_out * g.c_in..], g.c_in);
            matmul((g.c_out, g.c_in, band.tiles), dst, !*first, lhs, rhs_t, parallelism);
        }
        *first = false;
    });
}

/// `dM = A dy A^T` for the tiles of tile rows `top..` of one output
/// channel's gradient `plane [out_h, out_w]` (zero past its edges), into
/// `dm [tap, tile]`; `A = [[1, 0], [1, 1], [1, -1], [0, -1]]`.
fn transform_grad(g: &Geometry, plane: &[f32], tiles: Tiles, top: usize, dm: &mut [f32]) {
    let band = dm.len() / TAPS;
    let a = |d: [f32; 2]| [d[0], d[0] + d[1], d[0] - d[1], -d[1]];
    for tile in 0..band {
        let (ty, tx) = (top + tile / tiles.cols, tile % tiles.cols);
        let value = |y: usize, x: usize| if y < g.out_h && x < g.out_w { plane[y * g.out_w + x] } else { 0.0 };
        let rows = [0, 1].map(|i| a([value(2 * ty + i, 2 * tx), value(2 * ty + i, 2 * tx + 1)]));
        for j in 0..4 {
            for (i, &v) in a([rows[0][j], rows[1][j]]).iter().enumerate() {
                dm[(i * 4 + j) * band + tile] = v;
            }
        }
    }
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
    let parallelism = g.gemm_parallelism();
    let tiles = Tiles::new(g);
    for_each_band(g, image, tiles, |band, v, m| {
        let len = TAPS * band.tiles;
        for xi in 0..TAPS {
            let lhs = (&u[xi * g.c_in..], (TAPS * g.c_in, 1));
            let rhs = (&v[xi * band.tiles..], (len, 1));
            matmul((g.c_out, band.tiles, g.c_in), (&mut m[xi * band.tiles..], len), false, lhs, rhs, parallelism);
        }
        let m = &*m;
        per_channel(g, dst, g.out_plane(), |o, out| transform_output(g, &m[o * len..][..len], tiles, band, out));
    });
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
fn transform_input(g: &Geometry, plane: &[f32], tiles: Tiles, first: usize, v: &mut [f32]) {
    let band = v.len() / TAPS;
    let b_t = |d: [f32; 4]| [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
    for tile in 0..band {
        let (ty, tx) = (first + tile / tiles.cols, tile % tiles.cols);
        // Input rows and columns of the tile, offset by the padding.
        let (y0, x0) = ((2 * ty) as isize - g.padding as isize, (2 * tx) as isize - g.padding as isize);
        let mut d = [[0f32; 4]; 4];
        for (i, row) in d.iter_mut().enumerate() {
            let y = y0 + i as isize;
            if y < 0 || y >= g.h as isize {
                continue;
            }
            let src = &plane[y as usize * g.w..][..g.w];
            for (j, value) in row.iter_mut().enumerate() {
                let x = x0 + j as isize;
                if x >= 0 && x < g.w as isize {
                    *value = src[x as usize];
                }
            }
        }
        // B^T d, then (B^T d) B = (B^T (B^T d)^T)^T.
        let rows = [b_t(d[0]), b_t(d[1]), b_t(d[2]), b_t(d[3])];
        for j in 0..4 {
            let column = b_t([rows[0][j], rows[1][j], rows[2][j], rows[3][j]]);
            for (i, &value) in column.iter().enumerate() {
                v[(i * 4 + j) * band + tile] = value;
            }
        }
    }
}

/// `y = A^T M A` for one output channel's products `m [tap, tile]` of
/// `band`, written into its plane `out [out_h, out_w]`
/// (tiles past the edge are cropped); `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
fn transform_output(g: &Geometry, m: &[f32], tiles: Tiles, band: TileBand, out: &mut [f32]) {
    let (first, band) = (band.top, band.tiles);
    let a_t = |s: [f32; 4]| [s[0] + s[1] + s[2], s[1] - s[2] - s[3]];
    for tile in 0..band {
        let (ty, tx) = (first + tile / tiles.cols, tile % tiles.cols);
        let tap = |i: usize, j: usize| m[(i * 4 + j) * band + tile];
        let columns: [[f32; 2]; 4] = std::array::from_fn(|j| a_t([tap(0, j), tap(1, j), tap(2, j), tap(3, j)]));
        let rows: [[f32; 2]; 2] =
            std::array::from_fn(|i| a_t([columns[0][i], columns[1][i], columns[2][i], columns[3][i]]));
        for (i, values) in rows.iter().enumerate() {
            let y = 2 * ty + i;
            if y >= g.out_h {
                break;
            }
            for (j, &value) in values.iter().enumerate() {
                let x = 2 * tx + j;
                if x < g.out_w {
                    out[y * g.out_w + x] = value;
                }
            }
        }
    }
}
