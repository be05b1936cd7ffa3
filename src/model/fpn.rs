//! Feature pyramid on C3-C5 plus P6/P7 (torchvision.ops.FeaturePyramidNetwork
//! with `LastLevelP6P7`): `inner_blocks.N.0` 1x1 laterals, `layer_blocks.N.0`
//! 3x3 outputs, `extra_blocks.p6`/`p7` stride-2 3x3 convs.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::config::{FpnConfig, P6Source};
use crate::ops::conv::Conv2d;
use crate::ops::elementwise::relu;
use crate::ops::upsample::add_upsampled;

/// torchvision's FPN init: kaiming_uniform_(a=1), zero bias.
const FPN_INIT: Init = Init::Kaiming {
    dist: candle_nn::init::NormalOrUniform::Uniform,
    fan: candle_nn::init::FanInOut::FanIn,
    non_linearity: candle_nn::init::NonLinearity::Linear,
};

/// A convolution with bias, initialised like torchvision's FPN.
fn conv(c_in: usize, c_out: usize, kernel: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", FPN_INIT)?;
    let bias = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
    Ok(Conv2d::new(weight, Some(bias), kernel / 2, stride))
}

#[derive(Debug, Clone)]
pub(super) struct Fpn {
    inner: Vec<Conv2d>,
    layer: Vec<Conv2d>,
    p6: Conv2d,
    p7: Conv2d,
    p6_from: P6Source,
}

impl Fpn {
    /// `in_channels`: channels of C3, C4, C5; `vb` at `backbone.fpn`.
    pub(super) fn new(cfg: &FpnConfig, in_channels: [usize; 3], vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let mut inner = Vec::with_capacity(3);
        let mut layer = Vec::with_capacity(3);
        for (i, &c_in) in in_channels.iter().enumerate() {
            inner.push(conv(c_in, c, 1, 1, vb.pp("inner_blocks").pp(i).pp("0"))?);
            layer.push(conv(c, c, 3, 1, vb.pp("layer_blocks").pp(i).pp("0"))?);
        }
        let p6_in = match cfg.p6_from {
            P6Source::P5 => c,
            P6Source::C5 => in_channels[2],
        };
        let extra = vb.pp("extra_blocks");
        let p6 = conv(p6_in, c, 3, 2, extra.pp("p6"))?;
        let p7 = conv(c, c, 3, 2, extra.pp("p7"))?;
        Ok(Self { inner, layer, p6, p7, p6_from: cfg.p6_from })
    }

    /// C3-C5 -> P3-P7, each [n, channels, h/stride, w/stride] (strides 8-128).
    pub(super) fn forward(&self, [c3, c4, c5]: &[Tensor; 3]) -> Result<Vec<Tensor>> {
        let lateral5 = self.inner[2].forward(c5)?;
        let lateral4 = self.inner[1].forward(c4)?;
        let top4 = add_upsampled(&lateral4, &lateral5)?;
        let lateral3 = self.inner[0].forward(c3)?;
        let top3 = add_upsampled(&lateral3, &top4)?;
        let p3 = self.layer[0].forward(&top3)?;
        let p4 = self.layer[1].forward(&top4)?;
        let p5 = self.layer[2].forward(&lateral5)?;
        let p6 = match self.p6_from {
            P6Source::P5 => self.p6.forward(&p5)?,
            P6Source::C5 => self.p6.forward(c5)?,
        };
        let p7 = self.p7.forward(&relu(&p6)?)?;
        Ok(vec![p3, p4, p5, p6, p7])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn level_shapes_and_names() -> Result<()> {
        for p6_from in [P6Source::P5, P6Source::C5] {
            let vm = VarMap::new();
            let cfg = FpnConfig { channels: 8, p6_from };
            let fpn = Fpn::new(&cfg, [4, 6, 10], VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
            let dev = Device::Cpu;
            let c =
                [(4, 13, 17), (6, 7, 9), (10, 4, 5)].map(|(ch, h, w)| Tensor::ones((2, ch, h, w), DType::F32, &dev));
            let [c3, c4, c5] = c;
            let p = fpn.forward(&[c3?, c4?, c5?])?;
            let dims: Vec<_> = p.iter().map(|t| t.dims().to_vec()).collect();
            assert_eq!(dims, [[2, 8, 13, 17], [2, 8, 7, 9], [2, 8, 4, 5], [2, 8, 2, 3], [2, 8, 1, 2]]);
            let data = vm.data().lock().expect("varmap lock");
            let p6_in = if p6_from == P6Source::P5 { 8 } else { 10 };
            assert_eq!(data["extra_blocks.p6.weight"].dims(), [8, p6_in, 3, 3]);
            assert_eq!(data["inner_blocks.2.0.weight"].dims(), [8, 10, 1, 1]);
            assert_eq!(data["layer_blocks.0.0.bias"].dims(), [8]);
        }
        Ok(())
    }
}
