//! RetinaNet's losses: sigmoid focal loss for classification and an L1,
//! smooth-L1 or GIoU loss for box regression, normalised by the number of
//! foreground anchors (torchvision per image, or detectron2's EMA).

use candle_core::{Result, Tensor, D};

use crate::config::{BoxLoss, LossConfig, LossNormalizer};
use crate::model::box_coder::BoxCoder;
use crate::ops::boxes::elementwise_generalized_iou;
use crate::ops::focal::weighted_focal_loss_sum;

/// What the loss needs from matching, for a batch of `n` images with `a`
/// anchors each and `k` classes; `f` is the number of foreground anchors.
#[derive(Debug, Clone)]
pub(super) struct LossTargets {
    /// One-hot class targets, `[n, a, k]` (all zero for background).
    pub cls_targets: Tensor,
    /// Per-anchor weight of the classification loss, `[n, a, 1]`: 0 for
    /// ignored anchors, else the image's normaliser weight.
    pub cls_weights: Tensor,
    /// Flat indices `image * a + anchor` of foreground anchors, `[f]` (u32).
    pub fg_indices: Tensor,
    /// The ground-truth box each foreground anchor matched, `[f, 4]`.
    pub matched_boxes: Tensor,
    /// The foreground anchors themselves, `[f, 4]`.
    pub fg_anchors: Tensor,
    /// Per-foreground-anchor weight, `[f, 1]`.
    pub box_weights: Tensor,
}

/// The two loss terms, each a scalar.
#[derive(Debug, Clone)]
pub struct LossTerms {
    pub classification: Tensor,
    pub box_regression: Tensor,
}

impl LossTerms {
    pub fn total(&self) -> Result<Tensor> {
        &self.classification + &self.box_regression
    }
}

/// Per-image normaliser weights for a batch, from the foreground counts.
///
/// torchvision: image `i` weighs `1 / (n * max(1, fg_i))`, i.e. each image's
/// sum divided by its foreground count, averaged over images. detectron2:
/// every image weighs `1 / max(1, ema)`, where the EMA of the batch's
/// foreground count (momentum 0.9, from 100) is updated here.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalizer {
    pub kind: LossNormalizer,
    /// detectron2's running foreground count.
    pub ema: f64,
}

impl Normalizer {
    pub const EMA_MOMENTUM: f64 = 0.9;
    pub const EMA_INITIAL: f64 = 100.0;

    pub fn new(kind: LossNormalizer) -> Self {
        Self { kind, ema: Self::EMA_INITIAL }
    }

    /// Weights per image; updates the EMA.
    pub fn image_weights(&mut self, fg_per_image: &[usize]) -> Vec<f32> {
        let n = fg_per_image.len() as f64;
        match self.kind {
            LossNormalizer::PerImage => {
                fg_per_image.iter().map(|&fg| (1.0 / (n * (fg.max(1) as f64))) as f32).collect()
            }
            LossNormalizer::Ema => {
                let total: usize = fg_per_image.iter().sum();
                self.ema = Self::EMA_MOMENTUM * self.ema + (1.0 - Self::EMA_MOMENTUM) * total as f64;
                vec![(1.0 / self.ema.max(1.0)) as f32; fg_per_image.len()]
            }
        }
    }
}

/// Computes both terms from head outputs `cls_logits [n, a, k]` and
/// `bbox_regression [n, a, 4]`. Box losses compare encoded deltas (L1,
/// smooth L1) or decoded boxes (GIoU), on foreground anchors only.
pub(super) fn retinanet_loss(
    cls_logits: &Tensor,
    bbox_regression: &Tensor,
    targets: &LossTargets,
    cfg: &LossConfig,
    box_coder: &BoxCoder,
) -> Result<LossTerms> {
    let classification = weighted_focal_loss_sum(
        cls_logits,
        &targets.cls_targets,
        &targets.cls_weights,
        cfg.focal_alpha,
        cfg.focal_gamma,
    )?;
    let box_regression = if targets.fg_indices.dim(0)? == 0 {
        // No foreground: zero, but still attached to the graph.
        (bbox_regression.sum_all()? * 0.0)?
    } else {
        let flat = bbox_regression.flatten_to(1)?; // [n * a, 4]
        let predicted = flat.index_select(&targets.fg_indices, 0)?; // [f, 4]
        let per_anchor = match cfg.box_loss {
            BoxLoss::L1 => (predicted - encoded_targets(targets, box_coder)?)?.abs()?.sum_keepdim(D::Minus1)?,
            BoxLoss::SmoothL1 => smooth_l1(&(predicted - encoded_targets(targets, box_coder)?)?, cfg.smooth_l1_beta)?,
            BoxLoss::Giou => {
                let boxes = box_coder.decode(&predicted, &targets.fg_anchors)?;
                elementwise_generalized_iou(&boxes, &targets.matched_boxes)?.affine(-1.0, 1.0)?.unsqueeze(1)?
            }
        };
        (per_anchor.broadcast_mul(&targets.box_weights)?.sum_all()? * cfg.box_weight)?
    };
    Ok(LossTerms { classification, box_regression })
}

/// Regression targets: matched boxes encoded against their anchors.
fn encoded_targets(targets: &LossTargets, box_coder: &BoxCoder) -> Result<Tensor> {
    box_coder.encode(&targets.matched_boxes, &targets.fg_anchors)
}

/// Smooth L1 summed over the last axis: `0.5 d^2 / beta` where `|d| < beta`,
/// else `|d| - 0.5 beta`; plain L1 when `beta == 0`.
fn smooth_l1(diff: &Tensor, beta: f64) -> Result<Tensor> {
    let abs = diff.abs()?;
    if beta <= 0.0 {
        return abs.sum_keepdim(D::Minus1);
    }
    let quadratic = (abs.sqr()? * (0.5 / beta))?;
    let linear = (&abs - 0.5 * beta)?;
    abs.lt(beta)?.where_cond(&quadratic, &linear)?.sum_keepdim(D::Minus1)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn normalizers() {
        let mut per_image = Normalizer::new(LossNormalizer::PerImage);
        assert_eq!(per_image.image_weights(&[4, 0]), vec![0.125, 0.5]);
        let mut ema = Normalizer::new(LossNormalizer::Ema);
        let w = ema.image_weights(&[10, 20]);
        assert!((ema.ema - 93.0).abs() < 1e-9 && (w[0] - 1.0 / 93.0).abs() < 1e-9);
    }

    #[test]
    fn smooth_l1_matches_both_branches() {
        let d = Device::Cpu;
        let diff = Tensor::new(&[[0.05f32, -0.3, 0.0, 1.0]], &d).unwrap();
        let got = smooth_l1(&diff, 0.1).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let expected = 0.5 * 0.05 * 0.05 / 0.1 + (0.3 - 0.05) + 0.0 + (1.0 - 0.05);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }

    #[test]
    fn box_losses_vanish_on_a_perfect_prediction() {
        let d = Device::Cpu;
        let coder = BoxCoder::new(&crate::config::BoxCoderConfig::default());
        let anchor = Tensor::new(&[[0f32, 0.0, 10.0, 10.0]], &d).unwrap();
        let gt = Tensor::new(&[[1f32, 0.0, 12.0, 9.0]], &d).unwrap();
        let perfect = coder.encode(&gt, &anchor).unwrap().unsqueeze(0).unwrap(); // [1, 1, 4]
        let targets = LossTargets {
            cls_targets: Tensor::new(&[[[1f32]]], &d).unwrap(),
            cls_weights: Tensor::new(&[[[1f32]]], &d).unwrap(),
            fg_indices: Tensor::new(&[0u32], &d).unwrap(),
            matched_boxes: gt,
            fg_anchors: anchor,
            box_weights: Tensor::new(&[[1f32]], &d).unwrap(),
        };
        let logits = Tensor::new(&[[[0f32]]], &d).unwrap();
        for box_loss in [BoxLoss::L1, BoxLoss::SmoothL1, BoxLoss::Giou] {
            let cfg = LossConfig { box_loss, ..LossConfig::default() };
            let terms = retinanet_loss(&logits, &perfect, &targets, &cfg, &coder).unwrap();
            let value = terms.box_regression.to_scalar::<f32>().unwrap();
            assert!(value.abs() < 1e-5, "{box_loss:?}: {value}");
            let off = (&perfect + 0.5).unwrap();
            let worse = retinanet_loss(&logits, &off, &targets, &cfg, &coder).unwrap();
            let worse = worse.box_regression.to_scalar::<f32>().unwrap();
            assert!(worse > 0.05, "{box_loss:?}");
            // `loss.box_weight` scales the box term and leaves the class term.
            let weighted_cfg = LossConfig { box_weight: 2.0, ..cfg };
            let weighted = retinanet_loss(&logits, &off, &targets, &weighted_cfg, &coder).unwrap();
            let twice = weighted.box_regression.to_scalar::<f32>().unwrap();
            assert!((twice - 2.0 * worse).abs() < 1e-5, "{box_loss:?}: {twice} vs 2 x {worse}");
            let cls = |t: &LossTerms| t.classification.to_scalar::<f32>().unwrap();
            assert_eq!(cls(&weighted), cls(&terms));
        }
    }
}
