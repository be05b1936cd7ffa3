//! F(2x2, 3x3): each 2x2 block of outputs from a 4x4 input tile, 16
//! products per channel pair instead of 36. Its matrices only add and
//! halve, so it keeps f32's accuracy; it takes the planes too small for
//! [`super::f4`]'s larger tiles.

use super::transforms::Matrices;

/// Winograd's F(2x2, 3x3).
pub(super) struct F2x2;

impl Matrices<2, 4> for F2x2 {
    /// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`
    #[inline(always)]
    fn g([a, b, c]: [f32; 3]) -> [f32; 4] {
        [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
    }

    #[inline(always)]
    fn g_t(u: [f32; 4]) -> [f32; 3] {
        [u[0] + 0.5 * (u[1] + u[2]), 0.5 * (u[1] - u[2]), 0.5 * (u[1] + u[2]) + u[3]]
    }

    /// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`
    #[inline(always)]
    fn b_t([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }

    /// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`
    #[inline(always)]
    fn a_t([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }

    #[inline(always)]
    fn a([d0, d1]: [f32; 2]) -> [f32; 4] {
        [d0, d0 + d1, d0 - d1, -d1]
    }
}
