//! RetinaNet: ResNet-FPN features, the two heads, anchors per padded batch
//! size and torchvision's postprocess. The model reads no files; see
//! `weights` for checkpoints.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{BackboneNorm, HeadNorm, ModelConfig, HEAD_GN_GROUPS};
use crate::model::anchors::{AnchorGenerator, Anchors};
use crate::model::box_coder::BoxCoder;
use crate::model::fpn::Fpn;
use crate::model::head::RetinaNetHead;
use crate::model::postprocess::{Detections, PostProcessor};
use crate::model::resnet::ResNet;

/// What one forward pass produces.
#[derive(Debug, Clone)]
pub struct HeadOutputs {
    /// [n, num_anchors, num_classes], levels P3..P7 concatenated.
    pub cls_logits: Tensor,
    /// [n, num_anchors, 4] encoded (dx, dy, dw, dh).
    pub bbox_regression: Tensor,
    /// The anchors of this padded batch size, one per output row.
    pub anchors: Arc<Anchors>,
}

#[derive(Debug)]
pub struct RetinaNet {
    body: ResNet,
    fpn: Fpn,
    head: RetinaNetHead,
    anchor_generator: AnchorGenerator,
    box_coder: BoxCoder,
    postprocessor: PostProcessor,
    num_classes: usize,
}

impl RetinaNet {
    /// Builds the model with torchvision's parameter names under `vb`
    /// (`backbone.body.*`, `backbone.fpn.*`, `head.*`). With a `VarMap`
    /// backend, absent tensors are created with torchvision's init.
    pub fn new(cfg: &ModelConfig, num_classes: usize, vb: VarBuilder) -> Result<Self> {
        check_config(cfg, num_classes)?;
        let anchor_generator = AnchorGenerator::new(&cfg.anchors);
        let body = ResNet::new(&cfg.backbone, vb.pp("backbone").pp("body"))?;
        let fpn = Fpn::new(&cfg.fpn, body.out_channels(), vb.pp("backbone").pp("fpn"))?;
        let num_anchors = anchor_generator.num_anchors_per_location();
        let head = RetinaNetHead::new(&cfg.head, cfg.fpn.channels, num_anchors, num_classes, vb.pp("head"))?;
        let box_coder = BoxCoder::new(&cfg.box_coder);
        let postprocessor = PostProcessor::new(&cfg.postprocess, box_coder);
        Ok(Self { body, fpn, head, anchor_generator, box_coder, postprocessor, num_classes })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn box_coder(&self) -> &BoxCoder {
        &self.box_coder
    }

    /// Normalised, padded images [n, 3, h, w] -> P3..P7, each
    /// [n, fpn.channels, h / 2^l, w / 2^l] (rounded up).
    pub fn features(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let c = self.body.forward_t(images, train)?;
        self.fpn.forward(&c)
    }

    /// Normalised, padded images [n, 3, h, w] -> head outputs and anchors.
    /// `train` selects batch statistics in trainable BatchNorm layers (and
    /// updates their running statistics) and the differentiable stem pool.
    ///
    /// The layers compute in the images' dtype: f32, or bf16 for mixed
    /// precision, where convolutions cast the f32 parameters to bf16 and
    /// norms compute in f32 (torch.autocast's split). The outputs are f32
    /// either way, so losses and decoding stay in f32.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<HeadOutputs> {
        let (_, _, h, w) = images.dims4()?;
        let features = self.features(images, train)?;
        let grid_sizes = features.iter().map(|f| Ok((f.dim(2)?, f.dim(3)?))).collect::<Result<Vec<_>>>()?;
        let anchors = self.anchor_generator.anchors((h, w), &grid_sizes);
        let (cls_logits, bbox_regression) = self.head.forward(&features)?;
        Ok(HeadOutputs {
            cls_logits: cls_logits.to_dtype(DType::F32)?,
            bbox_regression: bbox_regression.to_dtype(DType::F32)?,
            anchors,
        })
    }

    /// Detections per image, in resized-image pixels; `image_sizes` are the
    /// (height, width) of each image after resizing, before padding.
    pub fn postprocess(&self, outputs: &HeadOutputs, image_sizes: &[(usize, usize)]) -> Result<Vec<Detections>> {
        self.postprocessor.run(&outputs.cls_logits, &outputs.bbox_regression, &outputs.anchors, image_sizes)
    }
}

/// Rejects settings the layers cannot be built from, naming the config
/// key: each key's range (`ModelConfig::validate`), then what depends on
/// several keys.
fn check_config(cfg: &ModelConfig, num_classes: usize) -> Result<()> {
    cfg.validate().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let fail = |key: &str, what: String| candle_core::bail!("config key model.{key}: {what}");
    if num_classes == 0 {
        return fail("num_classes", "a RetinaNet needs at least one class".into());
    }
    let b = &cfg.backbone;
    if b.norm == BackboneNorm::Gn && (b.gn_groups == 0 || !b.width.is_multiple_of(b.gn_groups)) {
        return fail(
            "backbone.gn_groups",
            format!("{} groups do not divide the {} stem channels", b.gn_groups, b.width),
        );
    }
    if cfg.head.norm == HeadNorm::Gn && !cfg.fpn.channels.is_multiple_of(HEAD_GN_GROUPS) {
        return fail(
            "fpn.channels",
            format!("the GroupNorm head needs a multiple of {HEAD_GN_GROUPS}, got {}", cfg.fpn.channels),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The shapes preset's model.
    fn small_config() -> ModelConfig {
        let mut cfg = ModelConfig::default();
        cfg.backbone.depth = 18;
        cfg.backbone.width = 16;
        cfg.backbone.norm = BackboneNorm::Bn;
        cfg.backbone.freeze_at = 0;
        cfg.fpn.channels = 64;
        cfg.head.num_convs = 2;
        cfg.head.norm = HeadNorm::Gn;
        cfg.anchors.sizes = vec![16.0, 32.0, 64.0, 128.0, 256.0];
        cfg
    }

    #[test]
    fn forward_shapes_anchors_and_postprocess() -> Result<()> {
        let vm = VarMap::new();
        let model = RetinaNet::new(&small_config(), 3, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
        let images = Tensor::rand(-1f32, 1., (2, 3, 128, 192), &Device::Cpu)?;
        let out = model.forward(&images, true)?;
        // Grids 16x24, 8x12, 4x6, 2x3, 1x2 with 9 anchors each.
        let total = (384 + 96 + 24 + 6 + 2) * 9;
        assert_eq!(out.cls_logits.dims(), [2, total, 3]);
        assert_eq!(out.bbox_regression.dims(), [2, total, 4]);
        assert_eq!(out.anchors.boxes.len(), total);
        // Prior bias: every score starts near 0.01.
        let max_logit = out.cls_logits.max_all()?.to_scalar::<f32>()?;
        assert!(max_logit < -3.0, "max logit {max_logit}");
        let dets = model.postprocess(&out, &[(128, 192), (100, 192)])?;
        assert_eq!(dets.len(), 2);
        assert!(dets.iter().all(|d| d.boxes.is_empty()));
        let grads = out.cls_logits.sum_all()?.backward()?;
        assert!(grads.get(vm.data().lock().expect("varmap lock")["backbone.body.conv1.weight"].as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn bad_settings_are_errors_naming_the_key() {
        let vm = VarMap::new();
        let build =
            |cfg: &ModelConfig, k| RetinaNet::new(cfg, k, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu));
        let message = |cfg: &ModelConfig, k| build(cfg, k).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message(&small_config(), 0).contains("model.num_classes"));
        let mut cfg = small_config();
        cfg.anchors.sizes.pop();
        assert!(message(&cfg, 3).contains("model.anchors.sizes"));
        let mut cfg = small_config();
        cfg.anchors.ratios.clear();
        assert!(message(&cfg, 3).contains("model.anchors.ratios"));
        let mut cfg = small_config();
        cfg.fpn.channels = 48;
        assert!(message(&cfg, 3).contains("model.fpn.channels"));
        let mut cfg = small_config();
        cfg.backbone.norm = BackboneNorm::Gn;
        cfg.backbone.gn_groups = 0;
        assert!(message(&cfg, 3).contains("model.backbone.gn_groups"));
    }
}
