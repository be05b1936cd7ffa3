//! torchvision's `BoxCoder` (models/detection/_utils.py): boxes relative to
//! anchors as weighted (dx, dy, dw, dh), no +1 in widths, and dw/dh clamped
//! to log(1000/16) before `exp` when decoding.

use candle_core::{Result, Tensor, D};

use crate::config::BoxCoderConfig;
use crate::ops::boxes::BoxXyxy;

/// `bbox_xform_clip`: the largest dw/dh decoded, log(1000 / 16).
pub(crate) fn bbox_xform_clip() -> f32 {
    (1000.0f32 / 16.0).ln()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// (wx, wy, ww, wh).
    weights: [f32; 4],
    clip: f32,
}

/// Widths, heights and centres of `[n, 4]` boxes, each `[n]`.
fn centre_size(boxes: &Tensor) -> Result<[Tensor; 4]> {
    let col = |i| boxes.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1);
    let (x1, y1, x2, y2) = (col(0)?, col(1)?, col(2)?, col(3)?);
    let w = (x2 - &x1)?;
    let h = (y2 - &y1)?;
    let cx = (x1 + (&w * 0.5)?)?;
    let cy = (y1 + (&h * 0.5)?)?;
    Ok([w, h, cx, cy])
}

impl BoxCoder {
    pub fn new(cfg: &BoxCoderConfig) -> Self {
        Self { weights: cfg.weights.map(|w| w as f32), clip: bbox_xform_clip() }
    }

    /// Regression targets of `boxes` [n, 4] against `anchors` [n, 4] -> [n, 4]
    /// (`encode_single`).
    pub fn encode(&self, boxes: &Tensor, anchors: &Tensor) -> Result<Tensor> {
        let [aw, ah, ax, ay] = centre_size(anchors)?;
        let [gw, gh, gx, gy] = centre_size(boxes)?;
        let [wx, wy, ww, wh] = self.weights.map(f64::from);
        let dx = (((gx - ax)? / &aw)? * wx)?;
        let dy = (((gy - ay)? / &ah)? * wy)?;
        let dw = ((gw / aw)?.log()? * ww)?;
        let dh = ((gh / ah)?.log()? * wh)?;
        Tensor::stack(&[dx, dy, dw, dh], 1)
    }

    /// Boxes from `deltas` [n, 4] applied to `anchors` [n, 4] -> [n, 4]
    /// (`decode_single`); differentiable, for IoU-based losses.
    pub fn decode(&self, deltas: &Tensor, anchors: &Tensor) -> Result<Tensor> {
        let [aw, ah, ax, ay] = centre_size(anchors)?;
        let col = |i: usize| -> Result<Tensor> {
            deltas.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1)? / f64::from(self.weights[i])
        };
        let clip = f64::from(self.clip);
        let cx = ((col(0)? * &aw)? + ax)?;
        let cy = ((col(1)? * &ah)? + ay)?;
        let half_w = ((col(2)?.minimum(clip)?.exp()? * aw)? * 0.5)?;
        let half_h = ((col(3)?.minimum(clip)?.exp()? * ah)? * 0.5)?;
        Tensor::stack(&[(&cx - &half_w)?, (&cy - &half_h)?, (cx + half_w)?, (cy + half_h)?], 1)
    }

    /// One box from one delta, in f32 with torchvision's operation order.
    pub fn decode_one(&self, delta: &[f32], anchor: &BoxXyxy) -> BoxXyxy {
        let w = anchor[2] - anchor[0];
        let h = anchor[3] - anchor[1];
        let cx = anchor[0] + 0.5 * w;
        let cy = anchor[1] + 0.5 * h;
        let [wx, wy, ww, wh] = self.weights;
        let dw = (delta[2] / ww).min(self.clip);
        let dh = (delta[3] / wh).min(self.clip);
        let pcx = delta[0] / wx * w + cx;
        let pcy = delta[1] / wy * h + cy;
        let half_w = 0.5 * (dw.exp() * w);
        let half_h = 0.5 * (dh.exp() * h);
        [pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn coder(weights: [f64; 4]) -> BoxCoder {
        BoxCoder::new(&BoxCoderConfig { weights })
    }

    #[test]
    fn encode_decode_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let anchors = Tensor::new(&[[0f32, 0., 32., 16.], [10., 20., 74., 148.], [-5., -5., 5., 5.]], &dev)?;
        let boxes = Tensor::new(&[[2f32, 1., 30., 20.], [0., 0., 100., 100.], [-4., -6., 7., 3.]], &dev)?;
        for weights in [[1.0; 4], [10.0, 10.0, 5.0, 5.0]] {
            let c = coder(weights);
            let deltas = c.encode(&boxes, &anchors)?;
            let back = c.decode(&deltas, &anchors)?.to_vec2::<f32>()?;
            let expected = boxes.to_vec2::<f32>()?;
            for (b, e) in back.iter().flatten().zip(expected.iter().flatten()) {
                assert!((b - e).abs() < 1e-4, "{back:?} vs {expected:?}");
            }
            for (i, row) in deltas.to_vec2::<f32>()?.iter().enumerate() {
                let one = c.decode_one(row, &anchors.get(i)?.to_vec1::<f32>()?.try_into().expect("4 values"));
                for (b, e) in one.iter().zip(&expected[i]) {
                    assert!((b - e).abs() < 1e-4);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn known_targets() -> Result<()> {
        let dev = Device::Cpu;
        let anchors = Tensor::new(&[[0f32, 0., 10., 20.]], &dev)?;
        let boxes = Tensor::new(&[[5f32, 10., 25., 30.]], &dev)?;
        let d = coder([1.0; 4]).encode(&boxes, &anchors)?.to_vec2::<f32>()?;
        let expected = [1.0, 0.5, 2f32.ln(), 0.0];
        for (a, e) in d[0].iter().zip(expected) {
            assert!((a - e).abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn decoding_clamps_large_log_sizes() {
        let c = coder([1.0; 4]);
        let b = c.decode_one(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 16.0, 16.0]);
        // exp(log(1000/16)) * 16 = 1000 wide, centred on 8.
        assert!((b[2] - b[0] - 1000.0).abs() < 1e-2 && (b[0] + 492.0).abs() < 1e-2);
    }
}
