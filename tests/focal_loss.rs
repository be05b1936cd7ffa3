//! The focal loss against torchvision's `sigmoid_focal_loss`, values and
//! gradients, from `tests/fixtures/focal/make_focal.py`:
//!
//! ```python
//! x = torch.tensor([12.0 * math.sin(0.7 * k + 0.3) for k in range(64)], requires_grad=True)
//! t = torch.tensor([1.0 if k % 3 == 0 else 0.0 for k in range(64)])
//! loss = sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
//! loss.sum().backward()
//! ```
//!
//! The training loss uses the fused `weighted_focal_loss_sum`; it is checked
//! here too, as one image of 64 anchors with one class and unit weights, so
//! its sum is the sum of torch's losses and its gradient torch's.

use candle_core::{Device, Tensor, Var};
use candle_retinanet::ops::sigmoid_focal_loss;
use candle_retinanet::ops::weighted_focal_loss_sum;

#[test]
fn focal_loss_and_gradient_equal_torchvision() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/focal/focal.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let x: Vec<f32> = (0..64).map(|k| (12.0 * (0.7 * k as f64 + 0.3).sin()) as f32).collect();
    let t: Vec<f32> = (0..64).map(|k| if k % 3 == 0 { 1.0 } else { 0.0 }).collect();
    let targets = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let (alpha, gamma) = (case["alpha"].as_f64().unwrap(), case["gamma"].as_f64().unwrap());
        let logits = Var::new(x.as_slice(), &Device::Cpu).unwrap();
        let loss = sigmoid_focal_loss(logits.as_tensor(), &targets, alpha, gamma).unwrap();
        let grad =
            loss.sum_all().unwrap().backward().unwrap().get(logits.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let loss = loss.to_vec1::<f32>().unwrap();
        check_fused(&x, &targets, alpha, gamma, case);
        for (what, got, expected) in [("loss", &loss, &case["loss"]), ("grad", &grad, &case["grad"])] {
            for (k, (g, e)) in got.iter().zip(expected.as_array().unwrap()).enumerate() {
                let e = e.as_f64().unwrap() as f32;
                assert!(
                    (g - e).abs() <= 1e-5 + 1e-4 * e.abs(),
                    "alpha {alpha} gamma {gamma} {what}[{k}]: {g} vs torch {e}"
                );
            }
        }
    }
}

/// `weighted_focal_loss_sum` on the same values as `[1, 64, 1]`.
fn check_fused(x: &[f32], targets: &Tensor, alpha: f64, gamma: f64, case: &serde_json::Value) {
    let dev = Device::Cpu;
    let logits = Var::from_vec(x.to_vec(), (1, 64, 1), &dev).unwrap();
    let weights = Tensor::ones((1, 64, 1), candle_core::DType::F32, &dev).unwrap();
    let sum =
        weighted_focal_loss_sum(logits.as_tensor(), &targets.reshape((1, 64, 1)).unwrap(), &weights, alpha, gamma)
            .unwrap();
    let expected: f64 = case["loss"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
    let got = sum.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - expected).abs() <= 1e-5 * expected.abs(),
        "alpha {alpha} gamma {gamma} fused sum: {got} vs {expected}"
    );
    let grad =
        sum.backward().unwrap().get(logits.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, (g, e)) in grad.iter().zip(case["grad"].as_array().unwrap()).enumerate() {
        let e = e.as_f64().unwrap() as f32;
        assert!(
            (g - e).abs() <= 1e-5 + 1e-4 * e.abs(),
            "alpha {alpha} gamma {gamma} fused grad[{k}]: {g} vs torch {e}"
        );
    }
}
