//! F(4x4, 3x3): each 4x4 block of outputs from a 6x6 input tile, 36
//! products per channel pair instead of 144 (4x fewer multiplications than
//! im2col, against F(2x2, 3x3)'s 2.25x), and fewer transformed values per
//! output to write and read (36 per 16 outputs against 16 per 4). Lavin
//! and Gray's matrices, from the points 0, 1, -1, 2, -2 and infinity.
//!
//! Their larger constants cost digits: against sums in f64 the relative
//! error is a few times F(2x2, 3x3)'s (2e-6 against 3.5e-7 forward;
//! `winograd.rs`'s tests), far below what training notices (TF32, which
//! PyTorch allows for GPU convolutions, keeps 10 bits).

use super::transforms::Matrices;

/// Winograd's F(4x4, 3x3).
pub(super) struct F4x4;

impl Matrices<4, 6> for F4x4 {
    /// `G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6],
    /// [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]]`
    #[inline(always)]
    fn g([a, b, c]: [f32; 3]) -> [f32; 6] {
        // Multiplied by the reciprocals: a division would cost more than
        // the rest of the transform.
        let (ac, a4c) = (a + c, a + 4.0 * c);
        let (sixth, twenty_fourth) = (1.0 / 6.0, 1.0 / 24.0);
        [
            0.25 * a,
            -(ac + b) * sixth,
            (b - ac) * sixth,
            (a4c + 2.0 * b) * twenty_fourth,
            (a4c - 2.0 * b) * twenty_fourth,
            c,
        ]
    }

    #[inline(always)]
    fn g_t(u: [f32; 6]) -> [f32; 3] {
        let (s12, d12, s34, d34) = (u[1] + u[2], u[2] - u[1], u[3] + u[4], u[3] - u[4]);
        let (sixth, twelfth, twenty_fourth) = (1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0);
        [0.25 * u[0] - s12 * sixth + s34 * twenty_fourth, d12 * sixth + d34 * twelfth, (s34 - s12) * sixth + u[5]]
    }

    /// `B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
    /// [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]`
    #[inline(always)]
    fn b_t([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        let (s12, s34, t12, t34) = (d1 + d2, d3 + d4, d1 - d2, d4 - d3);
        let (t13, t24) = (d3 - d1, d4 - d2);
        [
            4.0 * d0 - 5.0 * d2 + d4,
            s34 - 4.0 * s12,
            t34 + 4.0 * t12,
            t24 + 2.0 * t13,
            t24 - 2.0 * t13,
            4.0 * d1 - 5.0 * d3 + d5,
        ]
    }

    /// `A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
    /// [0, 1, -1, 8, -8, 1]]`
    #[inline(always)]
    fn a_t([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5]
    }

    #[inline(always)]
    fn a([d0, d1, d2, d3]: [f32; 4]) -> [f32; 6] {
        let (s02, s13, w02, w13) = (d0 + d2, d1 + d3, d0 + 4.0 * d2, 2.0 * d1 + 8.0 * d3);
        [d0, s02 + s13, s02 - s13, w02 + w13, w02 - w13, d3]
    }
}
