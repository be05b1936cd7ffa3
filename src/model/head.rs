//! RetinaNet's classification and box regression heads (torchvision's
//! `RetinaNetClassificationHead` / `RetinaNetRegressionHead`): a tower of
//! `num_convs` 3x3 convs + ReLU (GroupNorm(32) between them in the v2 head),
//! then a 3x3 conv to A*K logits or A*4 deltas, shared across levels.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::{HeadConfig, HeadNorm, HEAD_GN_GROUPS};
use crate::ops::conv::Conv2d;
use crate::ops::conv_norm::conv_group_norm;
use crate::ops::group_norm::{group_norm, GroupNorm};

/// Weight init of every head conv: normal(std = 0.01).
const HEAD_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.01 };
/// PyTorch's GroupNorm epsilon.
const HEAD_GN_EPS: f64 = 1e-5;

fn conv3x3(c_in: usize, c_out: usize, bias: Option<Init>, vb: &VarBuilder) -> Result<Conv2d> {
    let weight = vb.get_with_hints((c_out, c_in, 3, 3), "weight", HEAD_INIT)?;
    let bias = bias.map(|init| vb.get_with_hints(c_out, "bias", init)).transpose()?;
    Ok(Conv2d::new(weight, bias, 1, 1))
}

/// `conv.N.0` (+ `conv.N.1` GroupNorm) + ReLU, `num_convs` times.
#[derive(Debug, Clone)]
struct Tower {
    layers: Vec<(Conv2d, Option<GroupNorm>)>,
}

impl Tower {
    fn new(cfg: &HeadConfig, channels: usize, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_convs)
            .map(|i| {
                let vb = vb.pp(i);
                match cfg.norm {
                    HeadNorm::None => Ok((conv3x3(channels, channels, Some(Init::Const(0.0)), &vb.pp("0"))?, None)),
                    HeadNorm::Gn => {
                        let conv = conv3x3(channels, channels, None, &vb.pp("0"))?;
                        let gn = group_norm(HEAD_GN_GROUPS, channels, HEAD_GN_EPS, vb.pp("1"))?;
                        Ok((conv, Some(gn)))
                    }
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for Tower {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.layers.iter().try_fold(x.clone(), |x, (conv, gn)| match gn {
            Some(gn) => conv_group_norm(conv, gn, &x, true),
            None => conv.forward_relu(&x),
        })
    }
}

/// A tower and its output conv, producing `outputs_per_anchor` values per
/// anchor.
#[derive(Debug, Clone)]
pub(super) struct HeadBranch {
    tower: Tower,
    out: Conv2d,
    outputs_per_anchor: usize,
}

impl HeadBranch {
    /// `out_name`: `cls_logits` or `bbox_reg`; `out_bias`: its bias init.
    fn new(
        cfg: &HeadConfig,
        channels: usize,
        num_anchors: usize,
        outputs_per_anchor: usize,
        out_name: &str,
        out_bias: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let tower = Tower::new(cfg, channels, vb.pp("conv"))?;
        let out = conv3x3(channels, num_anchors * outputs_per_anchor, Some(Init::Const(out_bias)), &vb.pp(out_name))?;
        Ok(Self { tower, out, outputs_per_anchor })
    }

    /// Per level [n, c, h, w] -> [n, h*w*A, outputs_per_anchor], levels
    /// concatenated: view (n, A, k, h, w), permute to (n, h, w, A, k).
    pub(super) fn forward(&self, features: &[Tensor]) -> Result<Tensor> {
        let per_level = features
            .iter()
            .map(|f| {
                let y = self.out.forward(&self.tower.forward(f)?)?;
                let (n, _, h, w) = y.dims4()?;
                let k = self.outputs_per_anchor;
                y.reshape((n, (), k, h, w))?.permute((0, 3, 4, 1, 2))?.reshape((n, (), k))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&per_level, 1)
    }
}

/// `head.classification_head` and `head.regression_head`.
#[derive(Debug, Clone)]
pub(super) struct RetinaNetHead {
    pub classification: HeadBranch,
    pub regression: HeadBranch,
}

impl RetinaNetHead {
    /// `vb` at `head`.
    pub(super) fn new(
        cfg: &HeadConfig,
        channels: usize,
        num_anchors: usize,
        num_classes: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let prior_bias = -((1.0 - cfg.prior_prob) / cfg.prior_prob).ln();
        let cls_vb = vb.pp("classification_head");
        let classification =
            HeadBranch::new(cfg, channels, num_anchors, num_classes, "cls_logits", prior_bias, cls_vb)?;
        let regression = HeadBranch::new(cfg, channels, num_anchors, 4, "bbox_reg", 0.0, vb.pp("regression_head"))?;
        Ok(Self { classification, regression })
    }

    /// P3-P7 -> (cls_logits [n, sum h*w*A, K], bbox_regression [n, sum h*w*A, 4]).
    pub(super) fn forward(&self, features: &[Tensor]) -> Result<(Tensor, Tensor)> {
        Ok((self.classification.forward(features)?, self.regression.forward(features)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, IndexOp};
    use candle_nn::VarMap;

    fn head(norm: HeadNorm, vm: &VarMap) -> Result<RetinaNetHead> {
        let cfg = HeadConfig { num_convs: 2, norm, prior_prob: 0.01 };
        RetinaNetHead::new(&cfg, 32, 9, 3, VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu))
    }

    #[test]
    fn names_and_init() -> Result<()> {
        let vm = VarMap::new();
        head(HeadNorm::None, &vm)?;
        let data = vm.data().lock().expect("varmap lock");
        let bias = data["classification_head.cls_logits.bias"].as_tensor().to_vec1::<f32>()?;
        assert_eq!(bias.len(), 27);
        assert!(bias.iter().all(|b| (b + 4.59512).abs() < 1e-4));
        assert_eq!(data["regression_head.bbox_reg.weight"].dims(), [36, 32, 3, 3]);
        assert!(data.contains_key("regression_head.conv.1.0.bias"));
        drop(data);
        let vm = VarMap::new();
        head(HeadNorm::Gn, &vm)?;
        let data = vm.data().lock().expect("varmap lock");
        assert!(!data.contains_key("classification_head.conv.0.0.bias"));
        assert_eq!(data["classification_head.conv.1.1.weight"].dims(), [32]);
        Ok(())
    }

    /// Row (y, x, a) of a level holds channel block a of pixel (y, x).
    #[test]
    fn output_layout_follows_torchvision() -> Result<()> {
        let vm = VarMap::new();
        let h = head(HeadNorm::None, &vm)?;
        let dev = Device::Cpu;
        let levels = [Tensor::rand(0f32, 1., (2, 32, 3, 4), &dev)?, Tensor::rand(0f32, 1., (2, 32, 2, 2), &dev)?];
        let (cls, reg) = h.forward(&levels)?;
        assert_eq!(cls.dims(), [2, (12 + 4) * 9, 3]);
        assert_eq!(reg.dims(), [2, (12 + 4) * 9, 4]);
        let raw = h.regression.out.forward(&h.regression.tower.forward(&levels[1])?)?; // [2, 36, 2, 2]
        let (y, x, a) = (1, 0, 5);
        let row = 12 * 9 + (y * 2 + x) * 9 + a;
        let expected = raw.i((1, a * 4..a * 4 + 4, y, x))?.to_vec1::<f32>()?;
        assert_eq!(reg.i((1, row))?.to_vec1::<f32>()?, expected);
        Ok(())
    }
}
