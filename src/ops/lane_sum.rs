//! Long sums of f32 terms, fast and close to f64 accuracy, for the norms'
//! statistics and gradients.
//!
//! Why by hand: the compiler may not reorder floating-point additions, so a
//! running f64 sum is one dependent addition per value (about 4 cycles
//! each, and the norms add millions of values a step), and a running f32
//! sum loses digits over a plane of 10^5 values. Here [`LANES`] independent
//! f32 lanes each add [`BLOCK`] / [`LANES`] terms of a block (a loop the
//! compiler turns into vector additions), then each block's lanes are added
//! into as many f64 lanes, and those at the end. The order is fixed, so a
//! sum is the same on every run and thread count.

/// Independent f32 accumulators: one AVX-512 vector, two AVX2 ones.
const LANES: usize = 16;

/// Terms per block: each f32 lane adds 16 before its total moves to f64.
const BLOCK: usize = LANES * 16;

/// `[Σ term(a[i], b[i], c[i])[k] for k in 0..K]` over slices of one length.
pub(crate) fn lane_sums<const K: usize>(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    term: impl Fn(f32, f32, f32) -> [f32; K],
) -> [f64; K] {
    assert!(a.len() == b.len() && b.len() == c.len(), "lane_sums: slices of different lengths");
    let mut wide = [[0f64; LANES]; K];
    for ((a, b), c) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(c.chunks(BLOCK)) {
        let mut lanes = [[0f32; LANES]; K];
        let ((a_full, a_rest), (b_full, b_rest)) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
        let (c_full, c_rest) = c.as_chunks::<LANES>();
        for ((a, b), c) in a_full.iter().zip(b_full).zip(c_full) {
            for i in 0..LANES {
                let terms = term(a[i], b[i], c[i]);
                for (lane, value) in lanes.iter_mut().zip(terms) {
                    lane[i] += value;
                }
            }
        }
        for (i, ((&a, &b), &c)) in a_rest.iter().zip(b_rest).zip(c_rest).enumerate() {
            for (lane, value) in lanes.iter_mut().zip(term(a, b, c)) {
                lane[i] += value;
            }
        }
        for (wide, lanes) in wide.iter_mut().zip(&lanes) {
            for (w, &l) in wide.iter_mut().zip(lanes) {
                *w += f64::from(l);
            }
        }
    }
    wide.map(|lanes| lanes.iter().sum())
}

/// `Σ term(v)` over `values`, as [`lane_sums`].
pub(crate) fn lane_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f64 {
    let [sum] = lane_sums(values, values, values, |v, _, _| [term(v)]);
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Against an f64 sum, on lengths around the lane and block sizes and on
    /// a long plane of values far from zero (where one f32 sum drifts).
    #[test]
    fn matches_f64_sums() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for len in [0, 1, 15, 16, 17, 255, 256, 257, 1000, 3 * 64 * 64 + 5, 200_000] {
            let a: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0) + 100.0).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let [sum, product] = lane_sums(&a, &b, &b, |a, b, _| [a, a * b]);
            let exact_sum: f64 = a.iter().map(|&v| f64::from(v)).sum();
            let exact_product: f64 = a.iter().zip(&b).map(|(&a, &b)| f64::from(a * b)).sum();
            let scale = a.iter().map(|&v| f64::from(v).abs()).sum::<f64>().max(1.0);
            assert!((sum - exact_sum).abs() / scale < 1e-7, "{len}: {sum} against {exact_sum}");
            let product_scale = a.iter().zip(&b).map(|(&a, &b)| f64::from(a * b).abs()).sum::<f64>().max(1.0);
            assert!((product - exact_product).abs() / product_scale < 1e-7, "{len}: {product} against {exact_product}");
            assert_eq!(lane_sum(&a, |v| v), sum, "{len}: one-term form");
        }
    }

    /// One running f32 sum is far off on the long plane: the test above
    /// would catch a version that summed that way.
    #[test]
    fn a_running_f32_sum_would_fail_the_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let a: Vec<f32> = (0..200_000).map(|_| rng.random_range(-1.0..1.0) + 100.0).collect();
        let running: f32 = a.iter().sum();
        let exact: f64 = a.iter().map(|&v| f64::from(v)).sum();
        assert!((f64::from(running) - exact).abs() / exact > 1e-7);
    }
}
