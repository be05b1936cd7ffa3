//! The Winograd transforms of a variant F(m x m, 3x3) from its 1-D
//! matrices ([`Matrices`]): kernels one at a time, and input tiles,
//! products and output gradients a band of tile rows at a time.
//!
//! Each 2-D transform is a 1-D one along the rows, then one down the
//! columns. With a row split into its `m` column phases (tiles step by
//! `m` columns), tap column `j` of every tile in a tile row is one
//! contiguous run (phase `j % m` from `j / m`); with the row results kept
//! by row phase too, tap row `i` of every tile in the band is one run.
//! Every step is then an element-wise map over runs of values
//! ([`map_runs`]), compiled for the CPU's widest vectors ([`vectorized`]).

use std::array;

use super::super::{with_scratch, Geometry};
use super::{TileBand, Tiles, ROWS};

/// The 1-D matrices of F(m, 3), `OUT = m`, on tiles of `SIDE = m + 2`
/// values: `y = A^T [(G k) * (B^T d)]` is the correlation of `SIDE` inputs
/// `d` with a 3-tap kernel `k`, `OUT` outputs. `A` and `G^T` are for the
/// gradients.
pub(super) trait Matrices<const OUT: usize, const SIDE: usize> {
    /// `G k`: a kernel column's three values into `SIDE`.
    fn g(k: [f32; 3]) -> [f32; SIDE];
    /// `G^T u`: a transformed kernel gradient's `SIDE` values back to three.
    fn g_t(u: [f32; SIDE]) -> [f32; 3];
    /// `B^T d`: an input tile's `SIDE` values.
    fn b_t(d: [f32; SIDE]) -> [f32; SIDE];
    /// `A^T m`: `SIDE` products into `OUT` outputs.
    fn a_t(m: [f32; SIDE]) -> [f32; OUT];
    /// `A d`: `OUT` output gradients into `SIDE`.
    fn a(d: [f32; OUT]) -> [f32; SIDE];
}

/// `U = G k G^T` for the 3x3 kernels of `LANES` channel pairs at once
/// (`k [tap][lane]`; the tap of a 3x3 kernel is row-major), as `[row]
/// [column][lane]` of the `S x S` transformed tile. A lane at a time,
/// which the compiler vectorises across the lanes.
pub(super) fn kernels<V: Matrices<O, S>, const O: usize, const S: usize>(
    k: &[[f32; LANES]; 9],
) -> [[[f32; LANES]; S]; S] {
    let mut u = [[[0f32; LANES]; S]; S];
    vectorized(
        #[inline(always)]
        || {
            for lane in 0..LANES {
                let tap = |t: usize| k[t][lane];
                let columns: [[f32; S]; 3] = array::from_fn(|j| V::g([tap(j), tap(3 + j), tap(6 + j)]));
                for (r, row) in u.iter_mut().enumerate() {
                    let values = V::g([columns[0][r], columns[1][r], columns[2][r]]);
                    for (out, value) in row.iter_mut().zip(values) {
                        out[lane] = value;
                    }
                }
            }
        },
    );
    u
}

/// `dk = G^T dU G` of one channel pair, from `du(tap)`.
pub(super) fn kernel_grad<V: Matrices<O, S>, const O: usize, const S: usize>(du: impl Fn(usize) -> f32) -> [f32; 9] {
    let columns: [[f32; 3]; S] = array::from_fn(|j| V::g_t(array::from_fn(|i| du(i * S + j))));
    let mut k = [0f32; 9];
    for (r, out) in k.chunks_exact_mut(3).enumerate() {
        out.copy_from_slice(&V::g_t(array::from_fn(|j| columns[j][r])));
    }
    k
}

/// `V = B^T d B` for the tiles of tile rows `first..` of one input channel
/// `plane [h, w]` (zero outside it), into `v [tap, tile]`. First `B^T`
/// along each input row the band reads, each once (consecutive tile rows
/// share two), into `rows [k][y % O][y / O][tx]`; then `B^T` down the
/// columns, over the whole band at once.
pub(super) fn input<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    plane: &[f32],
    tiles: Tiles,
    first: usize,
    v: &mut [f32],
) {
    let band = v.len() / (S * S);
    let cols = tiles.cols;
    let tile_rows = band / cols;
    // Tile column `tx` reads phase `j % O` at `tx + j / O`: a phase holds
    // `(S - 1) / O` more values than there are tiles, and likewise a row
    // phase more rows than there are tile rows.
    let extra = (S - 1) / O;
    let (phase_len, phase_rows) = (cols + extra, tile_rows + extra);
    let at = |k: usize, y: usize| ((k * O + y % O) * phase_rows + y / O) * cols;
    with_scratch(&ROWS, O * phase_len + S * O * phase_rows * cols, |scratch| {
        let (phases, rows) = scratch.split_at_mut(O * phase_len);
        vectorized(
            #[inline(always)]
            || {
                for y in 0..O * tile_rows + S - O {
                    let source = (O * first + y) as isize - g.padding as isize;
                    let row =
                        if (0..g.h as isize).contains(&source) { &plane[source as usize * g.w..][..g.w] } else { &[] };
                    split_padded_row::<O>(row, g.padding, phases);
                    let d = |j: usize| &phases[(j % O) * phase_len + j / O..][..cols];
                    map_runs(array::from_fn(d), runs_at(rows, array::from_fn(|k| at(k, y)), cols), V::b_t);
                }
                for k in 0..S {
                    let d = array::from_fn(|i| &rows[at(k, i)..][..band]);
                    let mut column = v.chunks_exact_mut(band).skip(k).step_by(S);
                    map_runs(d, array::from_fn(|_| column.next().expect("a tap per row")), V::b_t);
                }
            },
        )
    })
}

/// `y = A^T M A` for one output channel's products of `band` (`m(tap)`:
/// that tap's run over the band's tiles), written into its plane
/// `out [out_h, out_w]` (tiles past the edge cropped). First `A^T` down
/// the tap columns over the whole band, into `columns [j][i][tile]`; then
/// along each output row.
pub(super) fn output<'a, V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    m: impl Fn(usize) -> &'a [f32],
    tiles: Tiles,
    band: TileBand,
    out: &mut [f32],
) {
    let (cols, n) = (tiles.cols, band.tiles);
    with_scratch(&ROWS, O * S * n + O * cols, |scratch| {
        let (columns, phases) = scratch.split_at_mut(O * S * n);
        vectorized(
            #[inline(always)]
            || {
                for (j, column) in columns.chunks_exact_mut(O * n).enumerate() {
                    map_runs(array::from_fn(|i| m(i * S + j)), runs(column, n), V::a_t);
                }
                for tile_row in 0..n / cols {
                    for i in 0..O {
                        let y = O * (band.top + tile_row) + i;
                        if y >= g.out_h {
                            break;
                        }
                        let d = |j: usize| &columns[(O * j + i) * n + tile_row * cols..][..cols];
                        map_runs(array::from_fn(d), runs(phases, cols), V::a_t);
                        interleave::<O>(phases, &mut out[y * g.out_w..][..g.out_w]);
                    }
                }
            },
        )
    })
}

/// `dM = A dy A^T` for the tiles of tile rows `top..` of one output
/// channel's gradient `plane [out_h, out_w]` (zero past its edges), into
/// `dm [tap, tile]`. As [`input`]: `A` along each gradient row into
/// `rows [j][i][tile]`, then down the columns over the whole band.
pub(super) fn output_grad<V: Matrices<O, S>, const O: usize, const S: usize>(
    g: &Geometry,
    plane: &[f32],
    tiles: Tiles,
    top: usize,
    dm: &mut [f32],
) {
    let band = dm.len() / (S * S);
    let cols = tiles.cols;
    with_scratch(&ROWS, O * cols + S * O * band, |scratch| {
        let (phases, rows) = scratch.split_at_mut(O * cols);
        vectorized(
            #[inline(always)]
            || {
                for tile_row in 0..band / cols {
                    for i in 0..O {
                        let y = O * (top + tile_row) + i;
                        let row = if y < g.out_h { &plane[y * g.out_w..][..g.out_w] } else { &[] };
                        split_padded_row::<O>(row, 0, phases);
                        let starts = array::from_fn(|j| (O * j + i) * band + tile_row * cols);
                        map_runs(array::from_fn(|q| &phases[q * cols..][..cols]), runs_at(rows, starts, cols), V::a);
                    }
                }
                for j in 0..S {
                    let d = array::from_fn(|i| &rows[(O * j + i) * band..][..band]);
                    let mut column = dm.chunks_exact_mut(band).skip(j).step_by(S);
                    map_runs(d, array::from_fn(|_| column.next().expect("a tap per row")), V::a);
                }
            },
        )
    })
}

/// Runs `f` compiled for the widest vectors this CPU has (AVX-512, AVX2
/// or baseline x86-64), chosen at run time: the crate is built for
/// baseline x86-64, where the compiler vectorises with 4-float SSE at
/// most. What `f` calls is compiled so too where it is inlined, hence the
/// `#[inline(always)]` on the closures and helpers here.
#[inline(always)]
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    arch().dispatch(f)
}

#[cfg(not(test))]
#[inline(always)]
fn arch() -> pulp::Arch {
    pulp::Arch::new()
}

/// In tests, the instruction set a test forces ([`FORCED_ARCH`]), else
/// the CPU's widest.
#[cfg(test)]
fn arch() -> pulp::Arch {
    FORCED_ARCH.read().expect("the forced instruction set").unwrap_or_default()
}

/// The instruction set the transforms run on in tests, when not the CPU's
/// widest: so that one machine runs the AVX2 and baseline versions too.
#[cfg(test)]
pub(super) static FORCED_ARCH: std::sync::RwLock<Option<pulp::Arch>> = std::sync::RwLock::new(None);

/// Values per step of [`map_runs`] and the row splits: one AVX-512 vector.
pub(super) const LANES: usize = 16;

/// `outputs[j][x] = f(the inputs' values at x)[j]` for every `x` below
/// the outputs' length, `K` runs into `N`. `LANES` values at a time
/// through local arrays: with the runs handed over in an array, the
/// compiler cannot tell that they do not overlap, and checking every pair
/// at run time costs more than it allows, so such loops stayed scalar.
/// The copies in and out are of a constant size, so they need no calls.
#[inline(always)]
fn map_runs<const K: usize, const N: usize>(
    inputs: [&[f32]; K],
    mut outputs: [&mut [f32]; N],
    f: impl Fn([f32; K]) -> [f32; N],
) {
    let n = outputs[0].len();
    let whole = n - n % LANES;
    for start in (0..whole).step_by(LANES) {
        let mut chunk = [[0f32; LANES]; K];
        for (values, run) in chunk.iter_mut().zip(&inputs) {
            *values = run[start..start + LANES].try_into().expect("LANES values");
        }
        for (run, values) in outputs.iter_mut().zip(map_lanes(&chunk, &f)) {
            run[start..start + LANES].copy_from_slice(&values);
        }
    }
    if whole < n && n >= LANES {
        // The last, partial step as a whole one ending at `n`: it computes
        // some values again, and writes the same bits over them. Through
        // the copies below, the 3 leftover values of a 19-tile row cost
        // more than the row's 16 others (12 calls to `memcpy`).
        let start = n - LANES;
        let mut chunk = [[0f32; LANES]; K];
        for (values, run) in chunk.iter_mut().zip(&inputs) {
            *values = run[start..n].try_into().expect("LANES values");
        }
        for (run, values) in outputs.iter_mut().zip(map_lanes(&chunk, &f)) {
            run[start..n].copy_from_slice(&values);
        }
    } else if whole < n {
        // A run shorter than a step, through zero-padded copies.
        let count = n - whole;
        let mut chunk = [[0f32; LANES]; K];
        for (values, run) in chunk.iter_mut().zip(&inputs) {
            values[..count].copy_from_slice(&run[whole..n]);
        }
        for (run, values) in outputs.iter_mut().zip(map_lanes(&chunk, &f)) {
            run[whole..n].copy_from_slice(&values[..count]);
        }
    }
}

/// `f` on each lane of `chunk`'s `K` runs: `N` runs.
#[inline(always)]
fn map_lanes<const K: usize, const N: usize>(
    chunk: &[[f32; LANES]; K],
    f: impl Fn([f32; K]) -> [f32; N],
) -> [[f32; LANES]; N] {
    let mut out = [[0f32; LANES]; N];
    for lane in 0..LANES {
        let mut values = [0f32; K];
        for (value, run) in values.iter_mut().zip(chunk) {
            *value = run[lane];
        }
        for (run, value) in out.iter_mut().zip(f(values)) {
            run[lane] = value;
        }
    }
    out
}

/// `N` consecutive runs of `len` floats at the start of `data`.
#[inline(always)]
fn runs<const N: usize>(data: &mut [f32], len: usize) -> [&mut [f32]; N] {
    let mut runs = data.chunks_exact_mut(len);
    array::from_fn(|_| runs.next().expect("room for the runs"))
}

/// `N` runs of `len` floats of `data` starting at `starts` (increasing,
/// the runs not overlapping).
#[inline(always)]
fn runs_at<const N: usize>(data: &mut [f32], starts: [usize; N], len: usize) -> [&mut [f32]; N] {
    let (mut rest, mut offset) = (data, 0);
    array::from_fn(|k| {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(starts[k] - offset);
        let (run, tail) = tail.split_at_mut(len);
        (rest, offset) = (tail, starts[k] + len);
        run
    })
}

/// `row` with `padding` zeros before it and zeros after it, cut at
/// `dst.len()`, split into its `P` column phases: phase `q` (the `q`-th
/// `P`-th of `dst`) holds columns `q, q + P, ...` of the bordered row.
/// `LANES` groups of `P` at a time through local arrays, which the
/// compiler turns into vector shuffles; the last, partial block through a
/// zero-padded copy (the bordered row is zero past its end). `conv.rs`'s
/// `split_padded_row`, which the direct kernels use, splits a row of any
/// length into two unequal halves; the tiles here need `P` equal phases.
#[inline(always)]
fn split_padded_row<const P: usize>(row: &[f32], padding: usize, dst: &mut [f32]) {
    dst.fill(0.0);
    let len = dst.len() / P;
    let row = &row[..row.len().min((P * len).saturating_sub(padding))];
    // Values before the first bordered column that is a multiple of P.
    let lead = ((P - padding % P) % P).min(row.len());
    let (head, body) = row.split_at(lead);
    for (x, &value) in head.iter().enumerate() {
        let column = padding + x;
        dst[(column % P) * len + column / P] = value;
    }
    let mut phases: [&mut [f32]; P] = runs(dst, len);
    let mut at = (padding + lead) / P;
    let mut blocks = body.chunks_exact(P * LANES);
    // Whole blocks while each phase has room for LANES more values.
    for block in (&mut blocks).take((len - at) / LANES) {
        let mut grouped = [[0f32; P]; LANES];
        grouped.as_flattened_mut().copy_from_slice(block);
        for (phase, values) in phases.iter_mut().zip(ungroup(&grouped)) {
            phase[at..at + LANES].copy_from_slice(&values);
        }
        at += LANES;
    }
    // The rest (a block at most: the row is cut to fit). After whole
    // blocks, as one more ending at the last whole group, over values
    // already written (the same bits), then the last values one by one;
    // the bordered row is zero past its end. With variable-length copies
    // instead, a 76-column row's 12 leftover values cost `memcpy` calls
    // (5% of a 128-channel 56x76 forward).
    let first = (padding + lead) / P;
    let rest = &body[(at - first) * P..];
    let whole = body.len() - body.len() % P;
    if !rest.is_empty() && whole >= P * LANES {
        let start = whole - P * LANES;
        let mut grouped = [[0f32; P]; LANES];
        grouped.as_flattened_mut().copy_from_slice(&body[start..whole]);
        let at = first + start / P;
        for (phase, values) in phases.iter_mut().zip(ungroup(&grouped)) {
            phase[at..at + LANES].copy_from_slice(&values);
        }
        for (x, &value) in body.iter().enumerate().skip(whole) {
            let column = padding + lead + x;
            phases[column % P][column / P] = value;
        }
    } else if !rest.is_empty() {
        let mut grouped = [[0f32; P]; LANES];
        grouped.as_flattened_mut()[..rest.len()].copy_from_slice(rest);
        let count = LANES.min(len - at);
        for (phase, values) in phases.iter_mut().zip(ungroup(&grouped)) {
            phase[at..at + count].copy_from_slice(&values[..count]);
        }
    }
}

/// `LANES` groups of `P` values as `P` runs of `LANES`.
#[inline(always)]
fn ungroup<const P: usize>(grouped: &[[f32; P]; LANES]) -> [[f32; LANES]; P] {
    let mut split = [[0f32; LANES]; P];
    for (lane, group) in grouped.iter().enumerate() {
        for (phase, &value) in split.iter_mut().zip(group) {
            phase[lane] = value;
        }
    }
    split
}

/// `P` runs of `LANES` values as `LANES` groups of `P`.
#[inline(always)]
fn group<const P: usize>(split: &[[f32; LANES]; P]) -> [[f32; P]; LANES] {
    let mut grouped = [[0f32; P]; LANES];
    for (lane, group) in grouped.iter_mut().enumerate() {
        for (value, phase) in group.iter_mut().zip(split) {
            *value = phase[lane];
        }
    }
    grouped
}

/// One output row `out` from its `P` column phases (`phases [q][tx]`;
/// tiles past the row's end cropped), `LANES` groups at a time as
/// [`split_padded_row`].
#[inline(always)]
fn interleave<const P: usize>(phases: &[f32], out: &mut [f32]) {
    let cols = phases.len() / P;
    let width = out.len();
    let mut blocks = out.chunks_exact_mut(P * LANES);
    let mut at = 0;
    for block in &mut blocks {
        let mut split = [[0f32; LANES]; P];
        for (q, values) in split.iter_mut().enumerate() {
            *values = phases[q * cols + at..][..LANES].try_into().expect("LANES values");
        }
        block.copy_from_slice(group(&split).as_flattened());
        at += LANES;
    }
    let rest = blocks.into_remainder();
    let start = width.saturating_sub(P * LANES);
    if !rest.is_empty() && width >= P * LANES && start.is_multiple_of(P) {
        // As one more whole block ending at the row's end, over values
        // already written (the same bits), as in `split_padded_row`.
        let at = start / P;
        let mut split = [[0f32; LANES]; P];
        for (q, values) in split.iter_mut().enumerate() {
            *values = phases[q * cols + at..][..LANES].try_into().expect("LANES values");
        }
        out[start..].copy_from_slice(group(&split).as_flattened());
    } else if !rest.is_empty() {
        let count = cols - at;
        let mut split = [[0f32; LANES]; P];
        for (q, values) in split.iter_mut().enumerate() {
            values[..count].copy_from_slice(&phases[q * cols + at..][..count]);
        }
        rest.copy_from_slice(&group(&split).as_flattened()[..rest.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same values as scattering each column of the bordered row to
    /// its phase: 2 and 4 phases, every padding, widths around the blocks
    /// of `LANES` groups, and cuts.
    #[test]
    fn split_padded_row_matches_the_bordered_row() {
        check_split::<2>();
        check_split::<4>();
    }

    fn check_split<const P: usize>() {
        for padding in 0..4 {
            for w in (0..13).chain(28..36).chain(60..80).chain(125..135) {
                for len in [1, 2, 5, 16, 17, 33, 40] {
                    let row: Vec<f32> = (1..=w).map(|x| x as f32).collect();
                    let mut expected = vec![0f32; P * len];
                    for (x, &value) in row.iter().enumerate() {
                        let column = x + padding;
                        if column < P * len {
                            expected[(column % P) * len + column / P] = value;
                        }
                    }
                    let mut split = vec![-1f32; P * len];
                    split_padded_row::<P>(&row, padding, &mut split);
                    assert_eq!(split, expected, "{P} phases, padding {padding}, width {w}, phase length {len}");
                }
            }
        }
    }

    /// Every width of output row, whole groups and a cropped one.
    #[test]
    fn interleave_undoes_the_split() {
        check_interleave::<2>();
        check_interleave::<4>();
    }

    fn check_interleave<const P: usize>() {
        for w in (1usize..13).chain(28..36).chain(60..80).chain(125..135) {
            let cols = w.div_ceil(P);
            let row: Vec<f32> = (1..=w).map(|x| x as f32).collect();
            let mut phases = vec![0f32; P * cols];
            split_padded_row::<P>(&row, 0, &mut phases);
            let mut out = vec![0f32; w];
            interleave::<P>(&phases, &mut out);
            assert_eq!(out, row, "{P} phases, width {w}");
        }
    }
}
