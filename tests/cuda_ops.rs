//! On a GPU, in a `cudnn` build (scripts/gpu-check.sh runs it): this
//! project's CUDA ops (`runtime.cuda_kernels = "fused"`) and Candle's stock
//! ones against the CPU's (themselves checked against Candle's in src/ops),
//! forward and every gradient: the convolution in f32 with and without TF32
//! and in bf16, GroupNorm, the stem's max-pool and the weighted focal loss
//! in f32. Without the `cudnn` feature this file
//! holds no test.
#![cfg(feature = "cudnn")]

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_retinanet::ops::{conv2d, group_norm_2d, max_pool_3x3_s2_p1, set_cuda_kernels, weighted_focal_loss_sum};

/// The kernel choice is process-wide: one test at a time switches it.
static SWITCH: Mutex<()> = Mutex::new(());

/// (n, c_in, h, w, c_out, k, padding, stride): the CPU test's shapes, then
/// ResNet-50-FPN's own (stem, a strided 3x3, a strided 1x1 shortcut, an FPN
/// output and a head layer).
const CASES: [(usize, usize, usize, usize, usize, usize, usize, usize); 10] = [
    (2, 3, 9, 12, 4, 3, 1, 1),
    (2, 3, 9, 12, 4, 3, 1, 2),
    (3, 5, 6, 7, 2, 1, 0, 1),
    (1, 3, 17, 13, 5, 7, 3, 2),
    (2, 2, 2, 3, 3, 3, 1, 2),
    (2, 3, 200, 336, 64, 7, 3, 2),
    (2, 128, 50, 84, 128, 3, 1, 2),
    (2, 256, 50, 84, 512, 1, 0, 2),
    (2, 256, 25, 42, 256, 3, 1, 1),
    (2, 256, 7, 11, 256, 3, 1, 1),
];

/// The convolution's output and its gradients for `x`, `w`, weighted by
/// `probe`, all returned as f32 on the CPU.
fn run(
    x: &Tensor,
    w: &Tensor,
    probe: &Tensor,
    case: (usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<[Tensor; 3]> {
    let (padding, stride) = case;
    let xv = Var::from_tensor(&x.to_device(device)?.to_dtype(dtype)?)?;
    let wv = Var::from_tensor(&w.to_device(device)?.to_dtype(dtype)?)?;
    let y = conv2d(xv.as_tensor(), wv.as_tensor(), padding, stride)?.to_dtype(DType::F32)?;
    let grads = (&y * probe.to_device(device)?)?.sum_all()?.backward()?;
    let back = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
    let dx = grads.get(xv.as_tensor()).expect("an input gradient");
    let dw = grads.get(wv.as_tensor()).expect("a weight gradient");
    Ok([back(&y)?, back(dx)?, back(dw)?])
}

/// Prints each tensor's error against the reference as `label: name error
/// E`, and keeps the lines over `tolerance` in `failures`.
fn compare(
    label: &str,
    names: &[&str],
    ours: &[Tensor],
    reference: &[Tensor],
    tolerance: f32,
    failures: &mut Vec<String>,
) -> Result<()> {
    for ((name, a), b) in names.iter().zip(ours).zip(reference) {
        let error = relative_error(a, b)?;
        let line = format!("{label}: {name} error {error:.2e}");
        println!("{line}");
        if error > tolerance {
            failures.push(line);
        }
    }
    Ok(())
}

/// Restores the default kernels and fails on any line over tolerance.
fn finish(failures: &[String]) -> Result<()> {
    set_cuda_kernels(false, true);
    assert!(failures.is_empty(), "over tolerance:\n{}", failures.join("\n"));
    Ok(())
}

/// The largest difference relative to the reference's largest magnitude.
fn relative_error(ours: &Tensor, reference: &Tensor) -> Result<f32> {
    let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-12))
}

#[test]
fn cuda_convolutions_match_the_cpu() -> Result<()> {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::new_cuda(0)?;
    // (kernels, dtype, TF32, tolerance relative to the largest value)
    let settings = [
        ("fused", DType::F32, false, 1e-4),
        ("fused", DType::F32, true, 1e-2),
        ("fused", DType::BF16, false, 3e-2),
        ("stock", DType::F32, false, 1e-2),
        ("stock", DType::BF16, false, 3e-2),
    ];
    let mut failures = Vec::new();
    for (n, c, h, w, co, k, padding, stride) in CASES {
        let x = Tensor::randn(0f32, 1., (n, c, h, w), &Device::Cpu)?;
        let weight = (Tensor::randn(0f32, 1., (co, c, k, k), &Device::Cpu)? / ((c * k * k) as f64).sqrt())?;
        let out_h = (h + 2 * padding - k) / stride + 1;
        let out_w = (w + 2 * padding - k) / stride + 1;
        let probe = Tensor::randn(0f32, 1., (n, co, out_h, out_w), &Device::Cpu)?;
        let reference = run(&x, &weight, &probe, (padding, stride), DType::F32, &Device::Cpu)?;
        for (kernels, dtype, tf32, tolerance) in settings {
            set_cuda_kernels(kernels == "stock", tf32);
            let ours = run(&x, &weight, &probe, (padding, stride), dtype, &device)?;
            let label =
                format!("conv {kernels} {dtype:?} tf32={tf32} n{n} c{c} {h}x{w} -> c{co} k{k} p{padding} s{stride}");
            let names = ["output", "input gradient", "weight gradient"];
            compare(&label, &names, &ours, &reference, tolerance, &mut failures)?;
        }
    }
    finish(&failures)
}

/// GroupNorm's output and its three gradients for `probe`, as f32 on the CPU.
fn group_norm_run(inputs: [&Tensor; 3], groups: usize, probe: &Tensor, device: &Device) -> Result<[Tensor; 4]> {
    let x = Var::from_tensor(&inputs[0].to_device(device)?)?;
    let gamma = Var::from_tensor(&inputs[1].to_device(device)?)?;
    let beta = Var::from_tensor(&inputs[2].to_device(device)?)?;
    let y = group_norm_2d(x.as_tensor(), gamma.as_tensor(), beta.as_tensor(), groups, 1e-5)?;
    let grads = (&y * probe.to_device(device)?)?.sum_all()?.backward()?;
    let grad = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").to_device(&Device::Cpu);
    Ok([y.to_device(&Device::Cpu)?, grad(&x)?, grad(&gamma)?, grad(&beta)?])
}

#[test]
fn cuda_group_norm_matches_the_cpu() -> Result<()> {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::new_cuda(0)?;
    let mut failures = Vec::new();
    // The CPU test's shapes, then the head's (32 groups of 256 channels) at
    // P3 and P7 of an 800x1333 batch of 2.
    for (n, c, h, w, groups) in
        [(2, 8, 5, 7, 4), (3, 6, 4, 4, 6), (1, 4, 3, 2, 1), (2, 256, 100, 168, 32), (2, 256, 7, 11, 32)]
    {
        let x = (Tensor::randn(0f32, 2., (n, c, h, w), &Device::Cpu)? + 3.0)?;
        let gamma = Tensor::randn(1f32, 0.5, c, &Device::Cpu)?;
        let beta = Tensor::randn(0f32, 0.5, c, &Device::Cpu)?;
        let probe = Tensor::randn(0f32, 1., (n, c, h, w), &Device::Cpu)?;
        let reference = group_norm_run([&x, &gamma, &beta], groups, &probe, &Device::Cpu)?;
        for kernels in ["fused", "stock"] {
            set_cuda_kernels(kernels == "stock", true);
            let ours = group_norm_run([&x, &gamma, &beta], groups, &probe, &device)?;
            let label = format!("group norm {kernels} n{n} c{c} {h}x{w} g{groups}");
            let names = ["output", "input gradient", "weight gradient", "bias gradient"];
            compare(&label, &names, &ours, &reference, 1e-4, &mut failures)?;
        }
    }
    finish(&failures)
}

/// The pool's output and input gradient for `probe`, as f32 on the CPU.
fn max_pool_run(x: &Tensor, probe: &Tensor, device: &Device) -> Result<[Tensor; 2]> {
    let x = Var::from_tensor(&x.to_device(device)?)?;
    let y = max_pool_3x3_s2_p1(x.as_tensor())?;
    let grads = (&y * probe.to_device(device)?)?.sum_all()?.backward()?;
    let dx = grads.get(x.as_tensor()).expect("a gradient").to_device(&Device::Cpu)?;
    Ok([y.to_device(&Device::Cpu)?, dx])
}

#[test]
fn cuda_max_pool_matches_the_cpu() -> Result<()> {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::new_cuda(0)?;
    let mut failures = Vec::new();
    // Odd and even sides, a 1x1 plane, and the stem's output at 800x1333.
    for (n, c, h, w) in [(2, 3, 7, 8), (1, 2, 1, 1), (2, 4, 6, 5), (2, 64, 400, 667)] {
        // Few distinct values, so windows hold ties: the first maximum must win.
        let x = (Tensor::randn(0f32, 2., (n, c, h, w), &Device::Cpu)?.round()? * 0.5)?;
        let probe = Tensor::randn(0f32, 1., (n, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1), &Device::Cpu)?;
        let reference = max_pool_run(&x, &probe, &Device::Cpu)?;
        // Same argmax, same order of addition: the fused kernels match exactly.
        for (kernels, tolerance) in [("fused", 0.0), ("stock", 1e-6)] {
            set_cuda_kernels(kernels == "stock", true);
            let ours = max_pool_run(&x, &probe, &device)?;
            let label = format!("max pool {kernels} n{n} c{c} {h}x{w}");
            compare(&label, &["output", "input gradient"], &ours, &reference, tolerance, &mut failures)?;
        }
    }
    finish(&failures)
}

/// The weighted focal loss sum and the logits' gradient, as f32 on the CPU.
fn focal_run(inputs: [&Tensor; 3], alpha: f64, gamma: f64, device: &Device) -> Result<[Tensor; 2]> {
    let logits = Var::from_tensor(&inputs[0].to_device(device)?)?;
    let (targets, weights) = (inputs[1].to_device(device)?, inputs[2].to_device(device)?);
    let loss = weighted_focal_loss_sum(logits.as_tensor(), &targets, &weights, alpha, gamma)?;
    let grads = (&loss * 0.5)?.backward()?;
    let grad = grads.get(logits.as_tensor()).expect("a gradient").to_device(&Device::Cpu)?;
    Ok([loss.to_device(&Device::Cpu)?.reshape(1)?, grad])
}

#[test]
fn cuda_focal_loss_matches_the_cpu() -> Result<()> {
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::new_cuda(0)?;
    let mut failures = Vec::new();
    // A small case, and a large one: 2 images of 179,523 anchors, 80 classes.
    for (n, anchors, classes) in [(2, 37, 3), (2, 179_523, 80)] {
        let logits = (Tensor::randn(0f32, 3., (n, anchors, classes), &Device::Cpu)? - 2.0)?;
        let targets = Tensor::rand(0f32, 1., (n, anchors, classes), &Device::Cpu)?.ge(0.97)?.to_dtype(DType::F32)?;
        // Weights 0 (ignored), 1 and 2, as the trainer's normaliser gives.
        let weights = Tensor::rand(0f32, 3., (n, anchors, 1), &Device::Cpu)?.floor()?;
        for (alpha, gamma) in [(0.25, 2.0), (-1.0, 0.0), (0.5, 1.5)] {
            let reference = focal_run([&logits, &targets, &weights], alpha, gamma, &Device::Cpu)?;
            for (kernels, tolerance) in [("fused", 1e-5), ("stock", 1e-4)] {
                set_cuda_kernels(kernels == "stock", true);
                let ours = focal_run([&logits, &targets, &weights], alpha, gamma, &device)?;
                let label = format!("focal {kernels} {n}x{anchors}x{classes} alpha {alpha} gamma {gamma}");
                compare(&label, &["loss", "gradient"], &ours, &reference, tolerance, &mut failures)?;
            }
        }
    }
    finish(&failures)
}
