//! Helpers shared by the fixture tests: the hashed weights of
//! `tests/fixtures/torchvision/make_parity.py` and checksums.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};

/// The device the fixture tests run the model on: `RETINANET_TEST_DEVICE`
/// (`cuda`, `cuda:N`, ... as `--device` takes them), the CPU when unset.
/// scripts/gpu-check.sh runs the parity tests on CUDA this way.
pub(crate) fn test_device() -> Result<Device> {
    match std::env::var("RETINANET_TEST_DEVICE") {
        Ok(spec) => candle_retinanet::config::parse_device(&spec),
        Err(_) => Ok(Device::Cpu),
    }
}

/// A folder of `tests/fixtures`, under `CARGO_MANIFEST_DIR` as set when the
/// test runs (cargo sets it; so does scripts/gpu-check.sh, which runs the
/// test binaries in a copy of the repository elsewhere), else as built.
pub(crate) fn fixture_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map_or(PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    root.join("tests/fixtures").join(name)
}

/// make_parity.py's `uniform`: a 32-bit integer hash of (t, k) in [-1, 1).
pub(crate) fn uniform(t: usize, k: usize) -> f64 {
    let mut x = (k as u32).wrapping_add((t as u32).wrapping_mul(0x9E37_79B9));
    for _ in 0..2 {
        x = (x ^ (x >> 16)).wrapping_mul(0x045D_9F3B);
    }
    x ^= x >> 16;
    f64::from(x) / 2f64.powi(32) * 2.0 - 1.0
}

/// Every tensor of a fixture's state_dict (`keys`: name and shape, in
/// order, `num_batches_tracked` left out) with its hashed values, on the CPU.
pub(crate) fn hashed_weights(keys: &[(String, Vec<usize>)]) -> Result<HashMap<String, Tensor>> {
    keys.iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            Ok((name.clone(), Tensor::from_vec(weight_values(t, name, shape), shape.as_slice(), &Device::Cpu)?))
        })
        .collect()
}

/// make_parity.py's `weight_values`.
pub(crate) fn weight_values(t: usize, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let gain = if name.contains("cls_logits") {
        2.0
    } else if name.contains("bbox_reg") || name.contains("fpn") {
        1.0
    } else {
        2f64.sqrt()
    };
    (0..n)
        .map(|k| {
            let v = uniform(t, k);
            let x = if name.ends_with("running_var") {
                1.0 + 0.25 * (v + 1.0)
            } else if name.ends_with("running_mean") {
                0.1 * v
            } else if shape.len() == 4 {
                let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
                v * 3f64.sqrt() * gain / fan_in.sqrt()
            } else if name.ends_with("cls_logits.bias") {
                -3.0 + 0.5 * v
            } else if name.ends_with("weight") {
                0.6 + 0.2 * v
            } else {
                0.1 * v
            };
            x as f32
        })
        .collect()
}

/// (sum, sum of |x|) in f64, as make_parity.py's `checksum`.
pub(crate) fn checksum(values: &[f32]) -> [f64; 2] {
    values.iter().fold([0.0, 0.0], |[s, a], &v| [s + f64::from(v), a + f64::from(v).abs()])
}

/// Sum and sum of |x| agree to `tol` relative to the sum of |x|.
pub(crate) fn check_checksum(what: &str, ours: [f64; 2], theirs: [f64; 2], tol: f64) -> Result<()> {
    let scale = theirs[1].max(1e-12);
    ensure!(
        (ours[0] - theirs[0]).abs() / scale < tol && (ours[1] - theirs[1]).abs() / scale < tol,
        "{what}: checksum {ours:?}, torchvision {theirs:?}"
    );
    Ok(())
}
