//! Anchor coverage of a dataset: for each ground-truth box, the IoU of its
//! best anchor at the size the model sees it (keras-retinanet's
//! `debug.py --annotations` check). A box whose best anchor stays below
//! the foreground threshold is only ever a low-quality match.

use rayon::prelude::*;

use crate::config::AnchorConfig;
use crate::data::{scale_boxes, ImageEntry, Transform};
use crate::eval::{LARGE_AREA, SMALL_AREA};
use crate::model::anchors::AnchorGenerator;
use crate::ops::boxes::iou;

/// COCO's size buckets on the original box: small < 32² <= medium < 96²
/// (evaluation's area ranges, each box in one bucket).
pub const BUCKETS: [&str; 4] = ["all", "small", "medium", "large"];

/// The index in [`BUCKETS`] (1, 2 or 3) of a box of `area` square pixels.
pub(super) fn area_bucket(area: f32) -> usize {
    let area = f64::from(area);
    if area < SMALL_AREA {
        1
    } else if area < LARGE_AREA {
        2
    } else {
        3
    }
}

/// Boxes counted, and how many have a best anchor IoU of at least 0.5 / 0.4.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    pub boxes: usize,
    pub at_05: usize,
    pub at_04: usize,
}

impl Coverage {
    fn add(&mut self, best_iou: f32) {
        self.boxes += 1;
        self.at_05 += usize::from(best_iou >= 0.5);
        self.at_04 += usize::from(best_iou >= 0.4);
    }

    pub fn merge(mut self, other: Self) -> Self {
        self.boxes += other.boxes;
        self.at_05 += other.at_05;
        self.at_04 += other.at_04;
        self
    }

    /// Share of boxes at IoU >= 0.5 (1 when there are none).
    pub fn share_05(&self) -> f64 {
        if self.boxes == 0 {
            1.0
        } else {
            self.at_05 as f64 / self.boxes as f64
        }
    }

    pub fn share_04(&self) -> f64 {
        if self.boxes == 0 {
            1.0
        } else {
            self.at_04 as f64 / self.boxes as f64
        }
    }
}

/// `[label][bucket]` coverage, buckets as [`BUCKETS`].
pub type CoverageTable = Vec<[Coverage; 4]>;

/// Feature-map sizes P3..P7 of a padded input: each stride-2 stage of the
/// backbone and of P6/P7 maps `n` to `ceil(n / 2)`.
pub(super) fn grid_sizes(padded: (usize, usize)) -> Vec<(usize, usize)> {
    let half = |(h, w): (usize, usize)| (h.div_ceil(2), w.div_ceil(2));
    let p3 = half(half(half(padded)));
    std::iter::successors(Some(p3), |&g| Some(half(g))).take(5).collect()
}

/// Coverage of the non-crowd boxes of `images` (evaluation-size transform).
pub(super) fn anchor_coverage(
    images: &[ImageEntry],
    transform: &Transform,
    anchors: &AnchorConfig,
    labels: usize,
) -> CoverageTable {
    let generator = AnchorGenerator::new(anchors);
    let min_size = *transform.min_size.last().expect("min_size is validated non-empty");
    let empty = || vec![[Coverage::default(); 4]; labels];
    images
        .par_iter()
        .map(|image| {
            let mut table = empty();
            let original = (image.height as usize, image.width as usize);
            let resized = transform.resized_size(original.0, original.1, min_size);
            let padded = transform.padded_size([resized]);
            let anchors = generator.anchors(padded, &grid_sizes(padded));
            for ((b, &label), _) in image.boxes.iter().zip(&image.labels).zip(&image.crowd).filter(|(_, &c)| !c) {
                let mut scaled = [*b];
                scale_boxes(&mut scaled, original, resized);
                let best = anchors.boxes.iter().map(|a| iou(&scaled[0], a)).fold(0.0f32, f32::max);
                let area = (b[2] - b[0]) * (b[3] - b[1]);
                let bucket = area_bucket(area);
                if let Some(row) = table.get_mut(label) {
                    row[0].add(best);
                    row[bucket].add(best);
                }
            }
            table
        })
        .reduce(empty, |a, b| a.into_iter().zip(b).map(|(x, y)| std::array::from_fn(|k| x[k].merge(y[k]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::InputConfig;

    #[test]
    fn grids_halve_with_ceiling() {
        assert_eq!(grid_sizes((192, 192)), vec![(24, 24), (12, 12), (6, 6), (3, 3), (2, 2)]);
        assert_eq!(grid_sizes((800, 1088)), vec![(100, 136), (50, 68), (25, 34), (13, 17), (7, 9)]);
    }

    #[test]
    fn boxes_like_the_anchors_are_covered_and_tiny_ones_are_not() {
        let transform = Transform::new(&InputConfig { min_size: vec![256], max_size: 256, ..InputConfig::default() });
        let image = ImageEntry {
            id: 1,
            file_name: "a.png".into(),
            width: 256,
            height: 256,
            // A 32 px box on the P3 grid, and a 4 px box no anchor fits.
            boxes: vec![[0.0, 0.0, 32.0, 32.0], [100.0, 100.0, 104.0, 104.0]],
            labels: vec![0, 1],
            crowd: vec![false, false],
        };
        let table = anchor_coverage(&[image], &transform, &AnchorConfig::default(), 2);
        assert_eq!(table[0][0], Coverage { boxes: 1, at_05: 1, at_04: 1 });
        assert_eq!(table[1][1], Coverage { boxes: 1, at_05: 0, at_04: 0 });
        assert_eq!(table[1][2].boxes, 0);
    }
}
