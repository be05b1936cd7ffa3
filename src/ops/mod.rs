//! Tensor and box operations the model needs beyond Candle's: box geometry
//! and NMS (torchvision.ops.boxes), a GEMM convolution with a fast backward,
//! a max-pool with a backward pass, fused norms, parallel element-wise ops,
//! the focal loss (torchvision.ops.focal_loss) and SGD's update in place.
//! The bottom layer: it imports nothing else of this crate.

pub(crate) mod batch_norm;
pub(crate) mod boxes;
pub(crate) mod conv;
pub(crate) mod conv_norm;
pub(crate) mod cuda_kernels;
pub(crate) mod elementwise;
pub(crate) mod focal;
pub(crate) mod group_norm;
mod lane_sum;
pub(crate) mod maxpool;
pub(crate) mod sgd;
pub(crate) mod upsample;

pub use boxes::BoxXyxy;
pub use conv::conv2d;
pub use cuda_kernels::set_cuda_kernels;
pub use focal::{sigmoid_focal_loss, weighted_focal_loss_sum};
pub use group_norm::group_norm_2d;
pub use maxpool::max_pool_3x3_s2_p1;

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// The contiguous f32 data of a custom op's argument (`what` names it in
/// the error).
fn f32_data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what} must be f32, got {:?}", storage.dtype());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous");
    };
    Ok(&data[start..end])
}

/// [`f32_data`] of an in-place op's first argument, to write.
fn f32_data_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let dtype = storage.dtype();
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what} must be f32, got {dtype:?}");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous");
    };
    Ok(&mut data[start..end])
}

/// Values below which [`zeroed`] zeroes on this thread alone.
const PARALLEL_ZEROING: usize = 1 << 18;

/// `vec![0f32; len]`, zeroed on every thread when large, for outputs that
/// are summed into. With `vec!` an op's output was zeroed on the calling
/// thread while the others waited (glibc's calloc clears a reused heap
/// block with one `memset`, and activations stay in the heap,
/// `runtime.rs`); this way the `bccd` step took 1.72-1.85 s against
/// 1.91-1.97 in four alternating rounds (BENCHMARKS.md, 2026-12-03, Intel).
fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_ZEROING {
        return vec![0f32; len];
    }
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(PARALLEL_ZEROING)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the loop above wrote all `len` values.
    unsafe { out.set_len(len) };
    out
}

/// `len` values written chunk by chunk, with no pass that zeroes them
/// first: chunk `i` (`chunk` values, the last one shorter) takes them from
/// `values(i)`, on every thread when `len` exceeds [`elementwise::CHUNK`].
/// For outputs computed value by value (a norm's, a ReLU's), where
/// [`zeroed`]'s pass was one more write of an activation-sized buffer:
/// without those passes (and without them under the convolutions'
/// outputs, [`uninit`]) the `bccd` step took 1.00 s against 1.03 (medians
/// of 8 and 15 alternating runs) and the `shapes` step ran at 177 against
/// 170 images/s (BENCHMARKS.md, 2026-12-04, Intel).
///
/// Panics if `values(i)` yields fewer values than its chunk holds.
fn written<I: Iterator<Item = f32>>(len: usize, chunk: usize, values: impl Fn(usize) -> I + Sync) -> Vec<f32> {
    let fill = |(i, out): (usize, &mut [MaybeUninit<f32>])| {
        let mut count = 0;
        for (slot, value) in out.iter_mut().zip(values(i)) {
            slot.write(value);
            count += 1;
        }
        assert_eq!(count, out.len(), "chunk {i}: {count} values for {} places", out.len());
    };
    let mut out = Vec::with_capacity(len);
    let places = &mut out.spare_capacity_mut()[..len];
    if len <= elementwise::CHUNK {
        places.chunks_mut(chunk.max(1)).enumerate().for_each(fill);
    } else {
        places.par_chunks_mut(chunk.max(1)).enumerate().for_each(fill);
    }
    // SAFETY: every chunk of the first `len` places was written in full
    // (the assert above), or the call panicked before this line.
    unsafe { out.set_len(len) };
    out
}

/// `len` values as the allocator hands them over, for a kernel that
/// writes every one of them without reading any: the convolution's
/// forward, whose output is the largest buffer of most layers. Candle
/// allocates its own ops' outputs the same way (`alloc_uninit`).
///
/// # Safety
/// The caller writes all `len` values before any is read, and names the
/// test that checks its kernel does.
#[allow(clippy::uninit_vec, reason = "the caller writes every value before reading one")]
unsafe fn uninit(len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    // SAFETY: f32 has no drop and every bit pattern is a value; the
    // caller writes every value before reading one.
    unsafe { out.set_len(len) };
    out
}

/// What the op tests share: each op is checked against Candle's own ops
/// or against sums in f64.
#[cfg(test)]
mod testing {
    use candle_core::backprop::GradStore;
    use candle_core::{Result, Tensor};

    /// The largest absolute difference of two tensors of one shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// The gradients of `sum(ours * probe)` and `sum(theirs * probe)` for
    /// one random `probe`: a weighting that makes every output position's
    /// gradient distinct.
    pub(crate) fn probed_gradients(ours: &Tensor, theirs: &Tensor) -> Result<(GradStore, GradStore)> {
        let probe = Tensor::randn(0f32, 1., ours.dims(), ours.device())?;
        Ok(((ours * &probe)?.sum_all()?.backward()?, (theirs * &probe)?.sum_all()?.backward()?))
    }

    /// Relative L2 distance of `a` from the reference `b`.
    pub(crate) fn relative_error(a: &[f32], b: &[f64]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| y * y).sum();
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn written_takes_every_chunk_from_its_values() {
        let chunk = 1000;
        for len in [0, 7, chunk, 3 * super::elementwise::CHUNK + 5] {
            let out = super::written(len, chunk, |i| (i * chunk..len).map(|v| v as f32));
            assert_eq!(out.len(), len);
            assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32), "length {len}");
        }
    }

    #[test]
    #[should_panic(expected = "values for")]
    fn written_refuses_a_chunk_left_short() {
        super::written(10, 4, |i| (0..if i == 1 { 3 } else { 4 }).map(|v| v as f32));
    }

    #[test]
    fn zeroed_is_zero_on_every_length() {
        for len in [0, 5, super::PARALLEL_ZEROING, 3 * super::PARALLEL_ZEROING + 7] {
            let zeros = super::zeroed(len);
            assert_eq!(zeros.len(), len);
            assert!(zeros.iter().all(|&v| v.to_bits() == 0), "length {len}");
        }
    }
}
