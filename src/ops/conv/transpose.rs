//! A matrix transposed, for the GEMMs whose two operands both hold their
//! sum axis contiguous (the weight gradients: `grad x columns^T`). Given
//! such a right-hand operand, the `gemm` crate gathers every value from
//! another row while packing it; transposed first, it packs whole rows.
//! Written here because the `transpose` crate takes contiguous rows only
//! (these are a tap's rows, strided) and has no SIMD kernel.

use rayon::prelude::*;

/// `dst [cols, rows]` from the matrix `src [rows, cols]` whose rows are
/// `row_stride` apart, in 8x8 blocks (AVX shuffles where the CPU has them:
/// one value at a time this took 4% of a training step); blocks of
/// destination rows in parallel when `parallel`.
pub(super) fn transpose(
    (src, row_stride): (&[f32], usize),
    (rows, cols): (usize, usize),
    dst: &mut [f32],
    parallel: bool,
) {
    const BLOCK: usize = 8;
    let simd = x86::has_avx();
    let block_rows = |(block, dst): (usize, &mut [f32])| {
        let (first, count) = (block * BLOCK, dst.len() / rows);
        for r0 in (0..rows).step_by(BLOCK) {
            let height = BLOCK.min(rows - r0);
            if simd && count == BLOCK && height == BLOCK {
                x86::transpose_8x8(&src[r0 * row_stride + first..], row_stride, &mut dst[r0..], rows);
                continue;
            }
            for (c, dst_row) in (first..).zip(dst.chunks_exact_mut(rows)) {
                for r in r0..r0 + height {
                    dst_row[r] = src[r * row_stride + c];
                }
            }
        }
    };
    let dst = &mut dst[..rows * cols];
    if parallel {
        dst.par_chunks_mut(BLOCK * rows).enumerate().for_each(block_rows);
    } else {
        dst.chunks_mut(BLOCK * rows).enumerate().for_each(block_rows);
    }
}

/// The 8x8 transpose with AVX, chosen at run time.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub(super) fn has_avx() -> bool {
        static AVX: OnceLock<bool> = OnceLock::new();
        *AVX.get_or_init(|| is_x86_feature_detected!("avx"))
    }

    /// Rows 0..8 of `dst` (`dst_stride` apart) = columns 0..8 of the
    /// 8 rows of `src` (`src_stride` apart). Callers check [`has_avx`].
    pub(super) fn transpose_8x8(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
        assert!(has_avx() && src.len() >= 7 * src_stride + 8 && dst.len() >= 7 * dst_stride + 8);
        // SAFETY: AVX is present and the assert keeps every load and store in bounds.
        unsafe { transpose_8x8_avx(src.as_ptr(), src_stride, dst.as_mut_ptr(), dst_stride) }
    }

    /// Pairs of rows interleaved, then pairs of pairs, then the 128-bit
    /// halves swapped across: row `i` of the result is column `i`.
    #[target_feature(enable = "avx")]
    unsafe fn transpose_8x8_avx(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * src_stride)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (t[i / 4 * 4 + i / 2 % 2], t[i / 4 * 4 + i / 2 % 2 + 2]);
            if i % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for i in 0..4 {
            _mm256_storeu_ps(dst.add(i * dst_stride), _mm256_permute2f128_ps::<0x20>(s[i], s[4 + i]));
            _mm256_storeu_ps(dst.add((4 + i) * dst_stride), _mm256_permute2f128_ps::<0x31>(s[i], s[4 + i]));
        }
    }
}

/// Scalar stand-ins where there is no AVX.
#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) fn has_avx() -> bool {
        false
    }

    pub(super) fn transpose_8x8(_: &[f32], _: usize, _: &mut [f32], _: usize) {
        unreachable!("transpose_8x8 without AVX")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked transpose against the definition: sizes with and
    /// without partial 8x8 blocks, a row stride wider than the rows, one
    /// thread and every thread.
    #[test]
    fn transpose_matches_definition() {
        for (rows, cols, row_stride) in [(16, 24, 24), (13, 21, 40), (8, 8, 8), (3, 5, 7), (129, 64, 300)] {
            let src: Vec<f32> = (0..rows * row_stride).map(|i| i as f32).collect();
            for parallel in [false, true] {
                let mut dst = vec![f32::NAN; rows * cols];
                transpose((&src, row_stride), (rows, cols), &mut dst, parallel);
                for (r, c) in (0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))) {
                    assert_eq!(dst[c * rows + r], src[r * row_stride + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
