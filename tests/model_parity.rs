//! Parity with torchvision's `retinanet_resnet50_fpn` on identical weights.
//!
//! The fixture comes from `tests/fixtures/torchvision/make_parity.py`
//! (torch 2.15 / torchvision 0.29, run by hand). In short:
//!
//! ```python
//! model = retinanet_resnet50_fpn(weights=None, weights_backbone=None,
//!                                score_thresh=0.3, detections_per_img=300)
//! keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
//! model.load_state_dict({k: weight_values(t, k, shape) for t, k in enumerate(keys)}, strict=False)
//! model.eval()
//! images, _ = model.transform([img])              # 480x640 -> 800x1066, padded to 800x1088
//! features = list(model.backbone(images.tensors).values())
//! head = model.head(features); anchors = model.anchor_generator(images, features)
//! detections = model([img])                        # boxes in original pixels
//! with torch.autocast("cpu", dtype=torch.bfloat16):  # the bar for bf16
//!     head_bf16 = model.head(list(model.backbone(images.tensors).values()))
//! ```
//!
//! `weight_values` hashes (tensor position, element index) to a uniform in
//! [-1, 1) and scales it per kind of tensor; `weight_values` below is the
//! same formula. The test checks the transformed input (checksums and
//! samples), every anchor exactly, the head outputs (per-level checksums and
//! 20,000 sampled entries each), and all detections (labels and order
//! exactly, boxes within 1e-2 px, scores within 1e-4).

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_retinanet::config::{BackboneNorm, ModelConfig};
use candle_retinanet::data::resize_bilinear;
use candle_retinanet::model::HeadOutputs;
use candle_retinanet::model::{build, LoadMode};
use serde::Deserialize;

mod common;
use common::{check_checksum, checksum, fixture_dir, hashed_weights, test_device};

const FIXTURE: &str = "torchvision";
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

#[derive(Deserialize)]
struct Meta {
    keys: Vec<(String, Vec<usize>)>,
    image_size: (usize, usize),
    resized_size: (usize, usize),
    padded_size: (usize, usize),
    score_thresh: f64,
    detections_per_img: usize,
    input_stride: usize,
    input_checksum: [f64; 2],
    cls_logits_checksums: Vec<[f64; 2]>,
    bbox_regression_checksums: Vec<[f64; 2]>,
    anchors_per_level: Vec<usize>,
    num_detections: usize,
    /// torch.autocast(bfloat16)'s largest relative errors on the sampled
    /// cls_logits and bbox_regression, against its own f32 outputs.
    bf16_autocast_rel_errors: [f32; 2],
}

/// make_parity.py's `image`: [3, h, w] in [0, 1].
fn image(h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        let c = c as f64;
        for y in 0..h {
            for x in 0..w {
                let (x, y) = (x as f64, y as f64);
                let a = 0.021 * x * (c + 1.0) + 0.017 * y * (3.0 - c) + c;
                let b = 0.003 * x * y / (c + 1.0);
                out.push((0.5 + 0.5 * a.sin() * b.cos()) as f32);
            }
        }
    }
    out
}

/// torchvision's GeneralizedRCNNTransform for one image: normalise, resize
/// bilinearly to `resized` (the crate's torch-exact resize), zero-pad to
/// `padded`; returns [1, 3, ph, pw].
fn transform(img: &[f32], (h, w): (usize, usize), resized: (usize, usize), padded: (usize, usize)) -> Vec<f32> {
    let normalised: Vec<f32> = img
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = i / (h * w);
            (v - MEAN[c]) / STD[c]
        })
        .collect();
    let small = resize_bilinear(&normalised, 3, h, w, resized.0, resized.1);
    let mut out = vec![0f32; 3 * padded.0 * padded.1];
    for (row, src) in small.chunks(resized.1).enumerate() {
        let (c, y) = (row / resized.0, row % resized.0);
        let start = (c * padded.0 + y) * padded.1;
        out[start..start + resized.1].copy_from_slice(src);
    }
    out
}

/// Largest absolute and relative (to 1 + |torchvision|) errors at `index`.
fn sampled_errors(ours: &[f32], index: &[i64], theirs: &[f32]) -> (f32, f32) {
    index.iter().zip(theirs).fold((0.0, 0.0), |(abs, rel), (&i, &t)| {
        let d = (ours[i as usize] - t).abs();
        (abs.max(d), rel.max(d / (1.0 + t.abs())))
    })
}

fn config(meta: &Meta) -> ModelConfig {
    let mut cfg = ModelConfig { num_classes: 91, ..ModelConfig::default() };
    cfg.backbone.norm = BackboneNorm::FrozenBn;
    cfg.backbone.norm_eps = 1e-5; // BatchNorm2d's eps: weights=None keeps plain BN
    cfg.postprocess.score_thresh = meta.score_thresh;
    cfg.postprocess.detections_per_img = meta.detections_per_img;
    cfg
}

#[test]
fn retinanet_resnet50_fpn_matches_torchvision() -> Result<()> {
    let dir = fixture_dir(FIXTURE);
    let meta: Meta = serde_json::from_str(&std::fs::read_to_string(dir.join("parity.json"))?)?;
    let fixture = candle_core::safetensors::load(dir.join("parity.safetensors"), &Device::Cpu)?;
    let get = |name: &str| fixture.get(name).with_context(|| format!("fixture tensor {name}"));
    let dev = test_device()?;

    // Input: normalise, resize, pad.
    let (h, w) = meta.image_size;
    let input = transform(&image(h, w), (h, w), meta.resized_size, meta.padded_size);
    check_checksum("transformed input", checksum(&input), meta.input_checksum, 1e-5)?;
    let samples = get("input_samples")?.to_vec1::<f32>()?;
    for (k, s) in samples.iter().enumerate() {
        let ours = input[k * meta.input_stride];
        ensure!((ours - s).abs() < 1e-5, "input element {}: {ours} vs torchvision {s}", k * meta.input_stride);
    }

    // Weights by torchvision's state_dict names.
    let tensors = hashed_weights(&meta.keys)?;
    let cfg = config(&meta);
    let model = build(&cfg, 91, &dev, 0, Some((&tensors, LoadMode::Exact)))?.model;

    let (ph, pw) = meta.padded_size;
    let images = Tensor::from_vec(input, (1, 3, ph, pw), &dev)?;
    let out = model.forward(&images, false)?;

    // Anchors: exact.
    let anchors = get("anchors")?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    ensure!(out.anchors.boxes.len() == anchors.len(), "{} anchors vs {}", out.anchors.boxes.len(), anchors.len());
    ensure!(out.anchors.level_sizes == meta.anchors_per_level, "anchors per level {:?}", out.anchors.level_sizes);
    for (i, (ours, theirs)) in out.anchors.boxes.iter().zip(&anchors).enumerate() {
        ensure!(ours.as_slice() == theirs.as_slice(), "anchor {i}: {ours:?} vs torchvision {theirs:?}");
    }

    // Head outputs: per-level checksums and sampled entries.
    let cls = out.cls_logits.squeeze(0)?;
    let reg = out.bbox_regression.squeeze(0)?;
    let mut start = 0;
    for (level, &len) in meta.anchors_per_level.iter().enumerate() {
        let c = cls.narrow(0, start, len)?.flatten_all()?.to_vec1::<f32>()?;
        let r = reg.narrow(0, start, len)?.flatten_all()?.to_vec1::<f32>()?;
        check_checksum(&format!("cls_logits P{}", level + 3), checksum(&c), meta.cls_logits_checksums[level], 1e-4)?;
        check_checksum(
            &format!("bbox_regression P{}", level + 3),
            checksum(&r),
            meta.bbox_regression_checksums[level],
            1e-4,
        )?;
        start += len;
    }
    // Largest (absolute, relative) errors of the sampled head outputs.
    let head_errors = |out: &HeadOutputs| -> Result<[(f32, f32); 2]> {
        let mut errors = [(0.0, 0.0); 2];
        for (e, (t, name)) in
            errors.iter_mut().zip([(&out.cls_logits, "cls_logits"), (&out.bbox_regression, "bbox_regression")])
        {
            let ours = t.flatten_all()?.to_vec1::<f32>()?;
            let index = get(&format!("{name}_index"))?.to_vec1::<i64>()?;
            *e = sampled_errors(&ours, &index, &get(&format!("{name}_samples"))?.to_vec1::<f32>()?);
        }
        Ok(errors)
    };
    let [(cls_abs, cls_rel), (reg_abs, reg_rel)] = head_errors(&out)?;
    println!("cls_logits: max abs error {cls_abs:.2e}, rel {cls_rel:.2e}; bbox_regression: abs {reg_abs:.2e}, rel {reg_rel:.2e}");
    ensure!(cls_rel < 1e-4 && reg_rel < 1e-4, "head outputs differ: cls {cls_rel:.2e}, reg {reg_rel:.2e}");

    // Mixed precision (`train.precision = "bf16"`): the same weights with
    // layers computing in bf16 stay as close to torchvision's f32 outputs as
    // torch.autocast's bf16 does (about 2.6e-2 and 1.4e-2 on this deep,
    // unnormalised ResNet-50).
    let out16 = model.forward(&images.to_dtype(DType::BF16)?, false)?;
    let [(_, cls16_rel), (_, reg16_rel)] = head_errors(&out16)?;
    let [torch_cls, torch_reg] = meta.bf16_autocast_rel_errors;
    println!("bf16: cls_logits rel {cls16_rel:.2e} (torch.autocast {torch_cls:.2e}), bbox_regression rel {reg16_rel:.2e} (torch.autocast {torch_reg:.2e})");
    ensure!(
        cls16_rel < 1.25 * torch_cls && reg16_rel < 1.25 * torch_reg,
        "bf16 head outputs differ more than torch.autocast's: cls {cls16_rel:.2e}, reg {reg16_rel:.2e}"
    );

    // Detections in resized pixels, then mapped back to the original image
    // as torchvision's transform.postprocess does.
    let dets = &model.postprocess(&out, &[meta.resized_size])?[0];
    let labels = get("labels")?.to_vec1::<i64>()?;
    let scores = get("scores")?.to_vec1::<f32>()?;
    let boxes_resized = get("boxes_resized")?.to_vec2::<f32>()?;
    let boxes = get("boxes")?.to_vec2::<f32>()?;
    ensure!(dets.labels.len() == meta.num_detections, "{} detections vs {}", dets.labels.len(), meta.num_detections);
    ensure!(meta.num_detections >= 100, "the fixture should hold 100+ detections");
    let ratio_h = h as f32 / meta.resized_size.0 as f32;
    let ratio_w = w as f32 / meta.resized_size.1 as f32;
    let (mut box_err, mut score_err) = (0f32, 0f32);
    for i in 0..dets.labels.len() {
        ensure!(dets.labels[i] as i64 == labels[i], "detection {i}: label {} vs {}", dets.labels[i], labels[i]);
        score_err = score_err.max((dets.scores[i] - scores[i]).abs());
        let b = dets.boxes[i];
        let original = [b[0] * ratio_w, b[1] * ratio_h, b[2] * ratio_w, b[3] * ratio_h];
        for k in 0..4 {
            box_err = box_err.max((b[k] - boxes_resized[i][k]).abs()).max((original[k] - boxes[i][k]).abs());
        }
    }
    println!("{} detections: max box error {box_err:.2e} px, max score error {score_err:.2e}", dets.labels.len());
    ensure!(box_err < 1e-2 && score_err < 1e-4, "detections differ: boxes {box_err}, scores {score_err}");
    Ok(())
}
