//! ResNet 18/34/50/101 (torchvision's resnet.py, v1.5: the Bottleneck's
//! stride sits on its 3x3) returning C3, C4, C5, with torchvision's
//! parameter names (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ...).
//!
//! Normalisation follows `backbone.norm`; parts frozen by `freeze_at`
//! (detectron2: 1 = stem, 2 = stem + layer1, ...) hold no trainable
//! tensors and use their BatchNorm statistics folded into the convolution,
//! as detectron2's `FrozenBatchNorm2d` conversion does.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::{BackboneConfig, BackboneNorm, ConvInit};
use crate::ops::batch_norm::{batch_norm, BatchNorm};
use crate::ops::conv::Conv2d;
use crate::ops::conv_norm::conv_batch_norm;
use crate::ops::elementwise::{add_relu_to_fresh, relu};
use crate::ops::group_norm::{group_norm, GroupNorm};
use crate::ops::maxpool::{max_pool_3x3_s2_p1, max_pool_3x3_s2_p1_inference};

/// The initialisation `init` names (see [`ConvInit`]).
fn conv_init(init: ConvInit) -> Init {
    use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
    match init {
        ConvInit::KaimingFanOut => {
            Init::Kaiming { dist: NormalOrUniform::Normal, fan: FanInOut::FanOut, non_linearity: NonLinearity::ReLU }
        }
        // kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)).
        ConvInit::TorchDefault => Init::Kaiming {
            dist: NormalOrUniform::Uniform,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::ExplicitGain(1.0 / 3f64.sqrt()),
        },
    }
}

/// BatchNorm momentum, PyTorch's default.
const BN_MOMENTUM: f64 = 0.1;

/// Blocks per stage for each depth, and whether the blocks are Bottlenecks.
fn layout(depth: usize) -> Result<([usize; 4], bool)> {
    Ok(match depth {
        18 => ([2, 2, 2, 2], false),
        34 => ([3, 4, 6, 3], false),
        50 => ([3, 4, 6, 3], true),
        101 => ([3, 4, 23, 3], true),
        other => {
            candle_core::bail!("model.backbone.depth: expected 18, 34, 50 or 101, got {other}")
        }
    })
}

/// Whether stage `stage` (0 = stem, 1..=4 = layer1..layer4) is frozen.
fn stage_frozen(cfg: &BackboneConfig, stage: usize) -> bool {
    stage < cfg.freeze_at
}

/// Whether the backbone parameter `key` (relative to `backbone.body.`, e.g.
/// `layer2.0.bn1.weight`) is trained: not in a frozen stage, not a running
/// statistic and not a frozen BatchNorm's affine.
pub(super) fn is_trainable(cfg: &BackboneConfig, key: &str) -> bool {
    let stage = key.strip_prefix("layer").and_then(|rest| rest.chars().next()?.to_digit(10)).unwrap_or(0) as usize;
    let is_norm_param = key.contains(".bn") || key.starts_with("bn") || key.contains("downsample.1.");
    let is_stat = key.ends_with("running_mean") || key.ends_with("running_var");
    let frozen_norm = is_norm_param && cfg.norm == BackboneNorm::FrozenBn;
    !(stage_frozen(cfg, stage) || is_stat || frozen_norm)
}

/// The normalisation after a convolution.
#[derive(Debug, Clone)]
enum Norm {
    /// Frozen BatchNorm, already folded into the convolution.
    Folded,
    Bn(BatchNorm),
    Gn(GroupNorm),
}

/// A bias-free convolution followed by its normalisation (`convN` + `bnN`).
#[derive(Debug, Clone)]
struct ConvNorm {
    conv: Conv2d,
    norm: Norm,
}

/// One convolution's geometry.
#[derive(Debug, Clone, Copy)]
struct ConvSpec {
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvNorm {
    /// Reads `conv_vb.weight` and the norm under `norm_vb`.
    fn new(
        spec: ConvSpec,
        cfg: &BackboneConfig,
        frozen: bool,
        conv_vb: VarBuilder,
        norm_vb: VarBuilder,
    ) -> Result<Self> {
        let weight =
            conv_vb.get_with_hints((spec.c_out, spec.c_in, spec.kernel, spec.kernel), "weight", conv_init(cfg.init))?;
        let c = spec.c_out;
        if frozen || cfg.norm == BackboneNorm::FrozenBn {
            return fold_frozen_bn(weight, frozen, spec, cfg.norm_eps, norm_vb);
        }
        let conv = Conv2d::new(weight, None, spec.padding, spec.stride);
        let norm = match cfg.norm {
            BackboneNorm::Gn => Norm::Gn(group_norm(cfg.gn_groups, c, cfg.norm_eps, norm_vb)?),
            _ => Norm::Bn(batch_norm(c, cfg.norm_eps, BN_MOMENTUM, norm_vb)?),
        };
        Ok(Self { conv, norm })
    }

    /// [n, c_in, h, w] -> [n, c_out, h / stride, w / stride], normalised.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.norm {
            Norm::Folded => self.conv.forward(x),
            Norm::Bn(bn) => conv_batch_norm(&self.conv, bn, x, train, false),
            Norm::Gn(gn) => gn.forward(&self.conv.forward(x)?),
        }
    }

    /// `relu(forward_t(x, train))`, the ReLU fused into the op before it
    /// (the folded norm's bias, or the BatchNorm) where there is one.
    fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.norm {
            Norm::Folded => self.conv.forward_relu(x),
            Norm::Bn(bn) => conv_batch_norm(&self.conv, bn, x, train, true),
            Norm::Gn(gn) => relu(&gn.forward(&self.conv.forward(x)?)?),
        }
    }
}

/// FrozenBatchNorm2d folded into the preceding convolution:
/// `w * gamma / sqrt(var + eps)` and bias `beta - mean * gamma / sqrt(var + eps)`.
/// Norm tensors are read as plain values (never trained). A frozen stage's
/// weight is folded once; a trainable one at every forward, so that the
/// forward sees each optimiser step.
fn fold_frozen_bn(weight: Tensor, frozen: bool, spec: ConvSpec, eps: f64, vb: VarBuilder) -> Result<ConvNorm> {
    let c = spec.c_out;
    let gamma = vb.get_with_hints(c, "weight", Init::Const(1.0))?.detach();
    let beta = vb.get_with_hints(c, "bias", Init::Const(0.0))?.detach();
    let mean = vb.get_with_hints(c, "running_mean", Init::Const(0.0))?.detach();
    let var = vb.get_with_hints(c, "running_var", Init::Const(1.0))?.detach();
    let scale = (gamma / (var + eps)?.sqrt()?)?;
    let bias = (beta - (mean * &scale)?)?;
    let scale = scale.reshape((c, 1, 1, 1))?;
    let conv = if frozen {
        Conv2d::new(weight.detach().broadcast_mul(&scale)?, Some(bias), spec.padding, spec.stride)
    } else {
        Conv2d::new(weight, Some(bias), spec.padding, spec.stride).with_channel_scale(scale)
    };
    Ok(ConvNorm { conv, norm: Norm::Folded })
}

/// BasicBlock (expansion 1) or Bottleneck (expansion 4).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvNorm>,
    downsample: Option<ConvNorm>,
}

impl Block {
    fn new(
        c_in: usize,
        planes: usize,
        stride: usize,
        bottleneck: bool,
        cfg: &BackboneConfig,
        frozen: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let spec = |c_in, c_out, kernel, stride| ConvSpec { c_in, c_out, kernel, stride, padding: kernel / 2 };
        let (specs, c_out) = if bottleneck {
            (
                vec![spec(c_in, planes, 1, 1), spec(planes, planes, 3, stride), spec(planes, planes * 4, 1, 1)],
                planes * 4,
            )
        } else {
            (vec![spec(c_in, planes, 3, stride), spec(planes, planes, 3, 1)], planes)
        };
        if cfg.zero_init_residual {
            // Created here with a zero scale, the norm below finds it and
            // keeps it; a loaded tensor is already there and wins.
            let last_norm = vb.pp(format!("bn{}", specs.len()));
            last_norm.get_with_hints(c_out, "weight", Init::Const(0.0))?;
        }
        let convs = specs
            .into_iter()
            .enumerate()
            .map(|(i, s)| ConvNorm::new(s, cfg, frozen, vb.pp(format!("conv{}", i + 1)), vb.pp(format!("bn{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || c_in != c_out {
            let ds = vb.pp("downsample");
            Some(ConvNorm::new(spec(c_in, c_out, 1, stride), cfg, frozen, ds.pp("0"), ds.pp("1"))?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, conv) in self.convs.iter().enumerate() {
            y = if i < last { conv.forward_relu(&y, train)? } else { conv.forward_t(&y, train)? };
        }
        let identity = match &self.downsample {
            Some(ds) => ds.forward_t(x, train)?,
            None => x.clone(),
        };
        add_relu_to_fresh(y, &identity)
    }
}

/// The backbone body (`backbone.body.*`).
#[derive(Debug, Clone)]
pub(super) struct ResNet {
    stem: ConvNorm,
    stem_trains: bool,
    layers: [Vec<Block>; 4],
    out_channels: [usize; 3],
}

impl ResNet {
    pub(super) fn new(cfg: &BackboneConfig, vb: VarBuilder) -> Result<Self> {
        let (blocks, bottleneck) = layout(cfg.depth)?;
        let width = cfg.width;
        let stem_spec = ConvSpec { c_in: 3, c_out: width, kernel: 7, stride: 2, padding: 3 };
        let stem = ConvNorm::new(stem_spec, cfg, stage_frozen(cfg, 0), vb.pp("conv1"), vb.pp("bn1"))?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut c_in = width;
        let mut layers: [Vec<Block>; 4] = Default::default();
        for (i, layer) in layers.iter_mut().enumerate() {
            let planes = width << i;
            let frozen = stage_frozen(cfg, i + 1);
            let lvb = vb.pp(format!("layer{}", i + 1));
            for b in 0..blocks[i] {
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                layer.push(Block::new(c_in, planes, stride, bottleneck, cfg, frozen, lvb.pp(b))?);
                c_in = planes * expansion;
            }
        }
        let out_channels = [2, 4, 8].map(|m| width * m * expansion);
        Ok(Self { stem, stem_trains: !stage_frozen(cfg, 0), layers, out_channels })
    }

    /// Channels of C3, C4, C5.
    pub(super) fn out_channels(&self) -> [usize; 3] {
        self.out_channels
    }

    /// [n, 3, h, w] -> C3 [n, 2w*e, h/8, w/8], C4 [.., h/16, w/16], C5 [.., h/32, w/32]
    /// (w = width, e = block expansion).
    ///
    /// Each activation is dropped once the next is made (the stem's output
    /// and C2 are not returned): without a graph (inference) they are freed
    /// then, 138 MB at 800x1333 for ResNet-50.
    pub(super) fn forward_t(&self, x: &Tensor, train: bool) -> Result<[Tensor; 3]> {
        let pooled = {
            let stem = self.stem.forward_relu(x, train)?;
            if self.stem_trains && train {
                max_pool_3x3_s2_p1(&stem)?
            } else {
                max_pool_3x3_s2_p1_inference(&stem)?
            }
        };
        let stage = |x: Tensor, blocks: &[Block]| blocks.iter().try_fold(x, |x, b| b.forward_t(&x, train));
        let c2 = stage(pooled, &self.layers[0])?;
        let c3 = stage(c2, &self.layers[1])?;
        let c4 = stage(c3.clone(), &self.layers[2])?;
        let c5 = stage(c4.clone(), &self.layers[3])?;
        Ok([c3, c4, c5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn cfg(depth: usize, norm: BackboneNorm, freeze_at: usize) -> BackboneConfig {
        BackboneConfig { depth, width: 16, norm, freeze_at, ..BackboneConfig::default() }
    }

    #[test]
    fn torchvision_names_and_shapes() -> Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        ResNet::new(&BackboneConfig { width: 64, ..cfg(50, BackboneNorm::FrozenBn, 2) }, vb)?;
        let data = vm.data().lock().expect("varmap lock");
        assert_eq!(data["conv1.weight"].dims(), [64, 3, 7, 7]);
        assert_eq!(data["layer1.0.conv3.weight"].dims(), [256, 64, 1, 1]);
        assert_eq!(data["layer2.0.conv2.weight"].dims(), [128, 128, 3, 3]);
        assert_eq!(data["layer4.0.downsample.0.weight"].dims(), [2048, 1024, 1, 1]);
        assert_eq!(data["layer4.2.bn3.running_var"].dims(), [2048]);
        // 53 convs + 53 norms x 4 tensors.
        assert_eq!(data.len(), 53 * 5);
        Ok(())
    }

    #[test]
    fn feature_shapes_for_every_depth_and_norm() -> Result<()> {
        let x = Tensor::rand(0f32, 1f32, (2, 3, 64, 96), &Device::Cpu)?;
        for (depth, norm) in [(18, BackboneNorm::Bn), (34, BackboneNorm::FrozenBn), (50, BackboneNorm::Gn)] {
            let vm = VarMap::new();
            let c = BackboneConfig { gn_groups: 8, ..cfg(depth, norm, 0) };
            let net = ResNet::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
            let [c3, c4, c5] = net.forward_t(&x, true)?;
            let e = if depth >= 50 { 4 } else { 1 };
            assert_eq!(c3.dims(), [2, 32 * e, 8, 12]);
            assert_eq!(c4.dims(), [2, 64 * e, 4, 6]);
            assert_eq!(c5.dims(), [2, 128 * e, 2, 3]);
            assert_eq!(net.out_channels(), [32 * e, 64 * e, 128 * e]);
        }
        Ok(())
    }

    /// Frozen stages get no gradient; trained ones do, down to the stem.
    #[test]
    fn freeze_at_stops_gradients() -> Result<()> {
        let x = Tensor::rand(0f32, 1f32, (1, 3, 64, 64), &Device::Cpu)?;
        for freeze_at in [0, 2] {
            let vm = VarMap::new();
            let c = cfg(18, BackboneNorm::Bn, freeze_at);
            let net = ResNet::new(&c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
            let [_, _, c5] = net.forward_t(&x, true)?;
            let grads = c5.sqr()?.sum_all()?.backward()?;
            let data = vm.data().lock().expect("varmap lock");
            for (name, var) in data.iter() {
                let has_grad = grads.get(var.as_tensor()).is_some();
                assert_eq!(has_grad, is_trainable(&c, name), "{name} (freeze_at {freeze_at})");
            }
        }
        Ok(())
    }

    #[test]
    fn trainable_names() {
        let c = cfg(50, BackboneNorm::FrozenBn, 2);
        assert!(!is_trainable(&c, "conv1.weight"));
        assert!(!is_trainable(&c, "layer1.0.conv1.weight"));
        assert!(is_trainable(&c, "layer2.0.conv1.weight"));
        assert!(!is_trainable(&c, "layer2.0.bn1.weight"));
        assert!(!is_trainable(&c, "layer3.0.downsample.1.bias"));
        let bn = cfg(50, BackboneNorm::Bn, 0);
        assert!(is_trainable(&bn, "bn1.weight") && is_trainable(&bn, "layer4.0.downsample.1.weight"));
        assert!(!is_trainable(&bn, "layer4.0.bn2.running_var"));
    }
}
