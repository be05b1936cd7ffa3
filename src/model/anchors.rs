//! Anchor boxes for P3-P7, in torchvision's convention (anchor_utils.py
//! `AnchorGenerator` with RetinaNet's sizes) or detectron2's.
//!
//! Anchors are ordered level by level (P3 first), then by grid location
//! (row-major), then by the A cell anchors, matching the head's output rows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};

use crate::config::{AnchorConfig, AnchorConvention};
use crate::ops::boxes::BoxXyxy;

/// Feature stride of P3; each next level doubles it (detectron2 strides).
const P3_STRIDE: usize = 8;

/// Anchors of one padded batch size.
#[derive(Debug, Clone)]
pub struct Anchors {
    /// All anchors, [sum over levels of h * w * A] boxes.
    pub boxes: Vec<BoxXyxy>,
    /// Anchors per level (h * w * A).
    pub level_sizes: Vec<usize>,
    /// Feature map (height, width) per level.
    pub grid_sizes: Vec<(usize, usize)>,
    /// (stride_y, stride_x) per level.
    pub strides: Vec<(usize, usize)>,
}

impl Anchors {
    /// The anchors as an f32 tensor [num_anchors, 4].
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.boxes.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (self.boxes.len(), 4), device)
    }
}

/// Cell anchors per level plus a cache of the anchors per padded size.
#[derive(Debug)]
pub(crate) struct AnchorGenerator {
    convention: AnchorConvention,
    /// Anchors centred on (0, 0), A per level.
    cell_anchors: Vec<Vec<BoxXyxy>>,
    cache: Mutex<HashMap<AnchorKey, Arc<Anchors>>>,
}

/// Padded image (height, width) and the grid sizes.
type AnchorKey = ((usize, usize), Vec<(usize, usize)>);

impl AnchorGenerator {
    pub(crate) fn new(cfg: &AnchorConfig) -> Self {
        let cell_anchors = cfg
            .sizes
            .iter()
            .map(|&size| match cfg.convention {
                AnchorConvention::Torchvision => torchvision_cell_anchors(size, &cfg.scales, &cfg.ratios),
                AnchorConvention::Detectron2 => detectron2_cell_anchors(size, &cfg.scales, &cfg.ratios),
            })
            .collect();
        Self { convention: cfg.convention, cell_anchors, cache: Mutex::new(HashMap::new()) }
    }

    /// Anchors per location (A).
    pub(crate) fn num_anchors_per_location(&self) -> usize {
        self.cell_anchors[0].len()
    }

    /// Anchors for a padded batch of `image_size` (height, width) whose
    /// feature maps have `grid_sizes`; computed once per distinct size.
    pub(crate) fn anchors(&self, image_size: (usize, usize), grid_sizes: &[(usize, usize)]) -> Arc<Anchors> {
        let key = (image_size, grid_sizes.to_vec());
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cache.entry(key).or_insert_with(|| Arc::new(self.generate(image_size, grid_sizes))).clone()
    }

    fn generate(&self, (height, width): (usize, usize), grid_sizes: &[(usize, usize)]) -> Anchors {
        let mut boxes = Vec::new();
        let mut level_sizes = Vec::new();
        let mut strides = Vec::new();
        for (level, (&(gh, gw), cells)) in grid_sizes.iter().zip(&self.cell_anchors).enumerate() {
            let stride = match self.convention {
                // torchvision: padded size // grid size (P6/P7 can be irregular).
                AnchorConvention::Torchvision => (height / gh, width / gw),
                AnchorConvention::Detectron2 => (P3_STRIDE << level, P3_STRIDE << level),
            };
            for y in 0..gh {
                for x in 0..gw {
                    let (sx, sy) = ((x * stride.1) as f32, (y * stride.0) as f32);
                    boxes.extend(cells.iter().map(|c| [c[0] + sx, c[1] + sy, c[2] + sx, c[3] + sy]));
                }
            }
            level_sizes.push(gh * gw * cells.len());
            strides.push(stride);
        }
        Anchors { boxes, level_sizes, grid_sizes: grid_sizes.to_vec(), strides }
    }
}

/// torchvision: sizes `int(size * scale)`, computed in f32 with ratio-major
/// order (`ws = (w_ratios[:, None] * scales[None, :]).view(-1)`), rounded
/// half to even like `torch.round`.
fn torchvision_cell_anchors(size: f64, scales: &[f64], ratios: &[f64]) -> Vec<BoxXyxy> {
    let sizes: Vec<f32> = scales.iter().map(|s| (size * s).trunc() as f32).collect();
    let mut cells = Vec::with_capacity(ratios.len() * sizes.len());
    for &ratio in ratios {
        let h_ratio = (ratio as f32).sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &s in &sizes {
            let (w, h) = (w_ratio * s, h_ratio * s);
            cells.push([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0].map(f32::round_ties_even));
        }
    }
    cells
}

/// detectron2 `generate_cell_anchors`: float sizes, size-major order,
/// w = sqrt(area / ratio), h = ratio * w.
fn detectron2_cell_anchors(size: f64, scales: &[f64], ratios: &[f64]) -> Vec<BoxXyxy> {
    let mut cells = Vec::with_capacity(ratios.len() * scales.len());
    for &scale in scales {
        let area = (size * scale).powi(2);
        for &ratio in ratios {
            let w = (area / ratio).sqrt();
            let h = ratio * w;
            cells.push([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0].map(|v| v as f32));
        }
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(convention: AnchorConvention) -> AnchorGenerator {
        AnchorGenerator::new(&AnchorConfig { convention, ..AnchorConfig::default() })
    }

    /// torchvision's `AnchorGenerator(((32, 40, 50),), ((0.5, 1.0, 2.0),))`.
    #[test]
    fn torchvision_cell_anchors_for_size_32() {
        let g = generator(AnchorConvention::Torchvision);
        let expected = [
            [-23.0, -11.0, 23.0, 11.0],
            [-28.0, -14.0, 28.0, 14.0],
            [-35.0, -18.0, 35.0, 18.0],
            [-16.0, -16.0, 16.0, 16.0],
            [-20.0, -20.0, 20.0, 20.0],
            [-25.0, -25.0, 25.0, 25.0],
            [-11.0, -23.0, 11.0, 23.0],
            [-14.0, -28.0, 14.0, 28.0],
            [-18.0, -35.0, 18.0, 35.0],
        ];
        assert_eq!(g.cell_anchors[0], expected);
    }

    /// torchvision's test_anchor_generator: one size 10, ratio 1, a 3x3 grid
    /// on a 15x15 image (stride 5).
    #[test]
    fn torchvision_small_grid() {
        let cfg = AnchorConfig { sizes: vec![10.0], scales: vec![1.0], ratios: vec![1.0], ..AnchorConfig::default() };
        let a = AnchorGenerator::new(&cfg).anchors((15, 15), &[(3, 3)]);
        let expected = [
            [-5.0, -5.0, 5.0, 5.0],
            [0.0, -5.0, 10.0, 5.0],
            [5.0, -5.0, 15.0, 5.0],
            [-5.0, 0.0, 5.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [5.0, 0.0, 15.0, 10.0],
            [-5.0, 5.0, 5.0, 15.0],
            [0.0, 5.0, 10.0, 15.0],
            [5.0, 5.0, 15.0, 15.0],
        ];
        assert_eq!(a.boxes, expected);
        assert_eq!(a.strides, vec![(5, 5)]);
    }

    /// Size 101 at ratio 1 gives +-50.5, which torch.round takes to +-50.
    #[test]
    fn torchvision_rounds_half_to_even() {
        let g = generator(AnchorConvention::Torchvision);
        assert_eq!(g.cell_anchors[1][5], [-50.0, -50.0, 50.0, 50.0]);
    }

    #[test]
    fn detectron2_cell_anchors_are_float_and_size_major() {
        let g = generator(AnchorConvention::Detectron2);
        let a = g.cell_anchors[0][0];
        assert!((a[0] + 22.627417).abs() < 1e-4 && (a[1] + 11.313708).abs() < 1e-4);
        // Second anchor: same size, ratio 1.
        assert_eq!(g.cell_anchors[0][1], [-16.0, -16.0, 16.0, 16.0]);
    }

    /// 800x1344 pads P6/P7 to 13x21 and 7x11: torchvision's strides become
    /// 61x64 and 114x122. Expected values from torchvision 0.29's
    /// `AnchorGenerator` on an `ImageList` of that size.
    #[test]
    fn torchvision_strides_and_layout() {
        let g = generator(AnchorConvention::Torchvision);
        let grids = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)];
        let a = g.anchors((800, 1344), &grids);
        assert_eq!(a.strides, vec![(8, 8), (16, 16), (32, 32), (61, 64), (114, 122)]);
        assert_eq!(a.boxes.len(), 201_600);
        assert_eq!(a.level_sizes.iter().sum::<usize>(), 201_600);
        // Second location of P3 shifts x by 8; the first of its second row y by 8.
        assert_eq!(a.boxes[9], [-15.0, -11.0, 31.0, 11.0]);
        assert_eq!(a.boxes[168 * 9], [-23.0, -3.0, 23.0, 19.0]);
        // Last P7 anchor: location (6, 10), ratio 2 at size 812.
        let last = a.boxes[a.boxes.len() - 1];
        assert_eq!(last, [1220.0 - 287.0, 684.0 - 574.0, 1220.0 + 287.0, 684.0 + 574.0]);
        // Column sums of torchvision's AnchorGenerator output for this size.
        let mut sums = [0f64; 4];
        for b in &a.boxes {
            for (s, v) in sums.iter_mut().zip(b) {
                *s += f64::from(*v);
            }
        }
        assert_eq!(sums, [128035215.0, 73197873.0, 140555205.0, 85717863.0]);
        assert!(Arc::ptr_eq(&a, &g.anchors((800, 1344), &grids)));
    }
}
