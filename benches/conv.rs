//! Convolution forward and forward+backward time, our GEMM op against
//! Candle's own, on the shapes RetinaNet uses. Compare with
//! `python3 benchmarks/conv_torch.py` (same shapes, torch, same threads).
//!
//! `cargo bench --bench conv [-- FILTER]` (only the cases whose name
//! contains FILTER)

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_retinanet::ops::conv2d;

/// (name, n, c_in, c_out, size, kernel, stride)
const CASES: [(&str, usize, usize, usize, usize, usize, usize); 27] = [
    ("3x3 256->256 64x64 n2", 2, 256, 256, 64, 3, 1),
    ("3x3 64->64 24x24 n16", 16, 64, 64, 24, 3, 1),
    ("3x3 16->16 48x48 n16", 16, 16, 16, 48, 3, 1),
    ("7x7/2 3->64 512x512 n2", 2, 3, 64, 512, 7, 2),
    ("3x3 256->256 64x64 n4", 4, 256, 256, 64, 3, 1),
    ("3x3 64->64 128x128 n4", 4, 64, 64, 128, 3, 1),
    ("7x7/2 3->64 512x512 n4", 4, 3, 64, 512, 7, 2),
    ("3x3 64->64 128x128 n2", 2, 64, 64, 128, 3, 1),
    ("3x3 128->128 64x64 n2", 2, 128, 128, 64, 3, 1),
    ("3x3 512->512 16x16 n2", 2, 512, 512, 16, 3, 1),
    ("3x3 256->720 64x64 n2", 2, 256, 720, 64, 3, 1),
    ("3x3 256->256 32x32 n2", 2, 256, 256, 32, 3, 1),
    ("3x3 256->256 16x16 n2", 2, 256, 256, 16, 3, 1),
    ("3x3 64->64 16x16 n8", 8, 64, 64, 16, 3, 1),
    ("3x3 64->64 8x8 n8", 8, 64, 64, 8, 3, 1),
    ("7x7/2 3->16 128x128 n8", 8, 3, 16, 128, 7, 2),
    ("3x3 16->16 32x32 n8", 8, 16, 16, 32, 3, 1),
    ("3x3 64->64 32x32 n8", 8, 64, 64, 32, 3, 1),
    ("3x3 64->64 64x64 n8", 8, 64, 64, 64, 3, 1),
    ("3x3 64->64 48x48 n4", 4, 64, 64, 48, 3, 1),
    ("3x3 128->128 8x8 n8", 8, 128, 128, 8, 3, 1),
    ("3x3 32->32 32x32 n8", 8, 32, 32, 32, 3, 1),
    ("3x3 128->128 56x56 n4", 4, 128, 128, 56, 3, 1),
    ("3x3 128->128 28x28 n4", 4, 128, 128, 28, 3, 1),
    ("3x3 64->64 112x112 n4", 4, 64, 64, 112, 3, 1),
    ("3x3 256->256 28x28 n4", 4, 256, 256, 28, 3, 1),
    ("3x3 512->512 14x14 n4", 4, 512, 512, 14, 3, 1),
];

/// The binary's allocator settings (`runtime.rs`): freed blocks stay in
/// the heap. Without them every output page-faulted in afresh, and a
/// 64-channel 96x128 layer's backward at batch 4 took 0.05 s here against
/// 0.015 in a training step (2026-12-04, Intel).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn median_seconds(mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<candle_core::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

fn main() -> candle_core::Result<()> {
    keep_freed_memory();
    let dev = Device::Cpu;
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_default();
    println!("{:<26} {:>12} {:>12} {:>12} {:>12}", "case", "ours fwd", "ours f+b", "candle fwd", "candle f+b");
    for (name, n, c, co, size, k, s) in CASES.into_iter().filter(|case| case.0.contains(&filter)) {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, c, size, size), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, c, k, k), &dev)?)?;
        let p = k / 2;
        let ours_f = median_seconds(|| conv2d(x.as_tensor(), w.as_tensor(), p, s).map(|_| ()))?;
        let ours_fb = median_seconds(|| conv2d(x.as_tensor(), w.as_tensor(), p, s)?.sum_all()?.backward().map(|_| ()))?;
        let candle_f = median_seconds(|| x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).map(|_| ()))?;
        // Candle's backward needs sizes the strides divide (see ops::conv).
        let candle_fb =
            median_seconds(|| x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1)?.sum_all()?.backward().map(|_| ()))
                .unwrap_or(f64::NAN);
        println!("{name:<26} {ours_f:>12.4} {ours_fb:>12.4} {candle_f:>12.4} {candle_fb:>12.4}");
    }
    Ok(())
}
