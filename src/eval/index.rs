//! Groups ground truth and detections by (category, image) the way
//! pycocotools' `_prepare` does, with flat arrays instead of dicts.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};

use super::image_eval::{DtBox, GtBox};
use super::results::Detection;
use crate::data::CocoJson;

/// What gets evaluated: `imgIds = sorted(unique gt image ids)` and
/// `catIds = sorted(unique category ids)`.
#[derive(Debug, Clone)]
pub(super) struct EvalIndex {
    /// `[I]` image ids, ascending.
    pub image_ids: Vec<u64>,
    /// `[K]` `(category id, name)`, ascending by id (first name for a repeated id).
    pub categories: Vec<(u64, String)>,
    image_of: HashMap<u64, usize>,
    category_of: HashMap<u64, usize>,
}

/// Items grouped by (category index, image index), each group in input
/// order. Only non-empty groups are stored, so memory stays proportional to
/// the items, not to categories x images.
#[derive(Debug, Clone)]
pub(super) struct Buckets<T> {
    /// `(k, i)` of each non-empty group, ascending.
    keys: Vec<(usize, usize)>,
    /// `[groups + 1]` start of each group in `items`.
    offsets: Vec<usize>,
    items: Vec<T>,
}

impl<T: Copy> Buckets<T> {
    /// Groups `((k, i), item)` pairs with a stable sort.
    fn new(mut keyed: Vec<((usize, usize), T)>) -> Self {
        keyed.sort_by_key(|(key, _)| *key);
        let mut keys = Vec::new();
        let mut offsets = Vec::new();
        for (n, (key, _)) in keyed.iter().enumerate() {
            if keys.last() != Some(key) {
                keys.push(*key);
                offsets.push(n);
            }
        }
        offsets.push(keyed.len());
        let items = keyed.into_iter().map(|(_, item)| item).collect();
        Self { keys, offsets, items }
    }

    /// `(image index, items)` of category index `k`, ascending by image.
    pub(super) fn category(&self, k: usize) -> impl Iterator<Item = (usize, &[T])> + '_ {
        let lo = self.keys.partition_point(|&(kk, _)| kk < k);
        let hi = self.keys.partition_point(|&(kk, _)| kk <= k);
        (lo..hi).map(|g| (self.keys[g].1, &self.items[self.offsets[g]..self.offsets[g + 1]]))
    }
}

/// One image of one category: its ground truth and detections, file order.
pub(super) type ImageBoxes<'a> = (&'a [GtBox], &'a [DtBox]);

/// The images of category index `k` that have ground truth or detections
/// (those whose `evaluateImg` is not `None`), ascending by image index.
pub(super) fn images_with_boxes<'a>(gts: &'a Buckets<GtBox>, dts: &'a Buckets<DtBox>, k: usize) -> Vec<ImageBoxes<'a>> {
    let mut g = gts.category(k).peekable();
    let mut d = dts.category(k).peekable();
    let mut images = Vec::new();
    loop {
        let next = match (g.peek(), d.peek()) {
            (None, None) => return images,
            (Some(&(gi, _)), Some(&(di, _))) => gi.min(di),
            (Some(&(gi, _)), None) => gi,
            (None, Some(&(di, _))) => di,
        };
        let gt = g.next_if(|&(i, _)| i == next).map_or(&[][..], |(_, items)| items);
        let dt = d.next_if(|&(i, _)| i == next).map_or(&[][..], |(_, items)| items);
        images.push((gt, dt));
    }
}

impl EvalIndex {
    pub(super) fn new(gt: &CocoJson) -> Self {
        let mut image_ids: Vec<u64> = gt.images.iter().map(|im| im.id).collect();
        image_ids.sort_unstable();
        image_ids.dedup();
        let mut seen = HashSet::new();
        let mut categories: Vec<(u64, String)> =
            (gt.categories.iter()).filter(|c| seen.insert(c.id)).map(|c| (c.id, c.name.clone())).collect();
        categories.sort_by_key(|(id, _)| *id);
        let image_of = image_ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        let category_of = categories.iter().enumerate().map(|(k, (id, _))| (*id, k)).collect();
        Self { image_ids, categories, image_of, category_of }
    }

    fn key(&self, category_id: u64, image_id: u64) -> Option<(usize, usize)> {
        let k = *self.category_of.get(&category_id)?;
        let i = *self.image_of.get(&image_id)?;
        Some((k, i))
    }

    /// Ground-truth boxes by (category, image). Annotations whose image or
    /// category is not listed are left out, as pycocotools leaves them out.
    /// A repeated annotation id is an error (pycocotools would silently
    /// evaluate the last annotation with that id in place of the others).
    pub(super) fn ground_truth(&self, gt: &CocoJson) -> Result<Buckets<GtBox>> {
        let mut seen = HashSet::new();
        let mut keyed = Vec::with_capacity(gt.annotations.len());
        for (n, ann) in gt.annotations.iter().enumerate() {
            if let Some(id) = ann.id {
                if !seen.insert(id) {
                    bail!("annotations[{n}] (id {id}): duplicate annotation id {id}");
                }
            }
            let Some(key) = self.key(ann.category_id, ann.image_id) else {
                continue;
            };
            let [_, _, w, h] = ann.bbox;
            let area = ann.area.unwrap_or(w * h);
            let id_is_zero = ann.id == Some(0);
            keyed.push((key, GtBox { bbox: ann.bbox, area, crowd: ann.iscrowd, id_is_zero }));
        }
        Ok(Buckets::new(keyed))
    }

    /// Detections by (category, image); errors name the detection's index.
    pub(super) fn detections(&self, dts: &[Detection]) -> Result<Buckets<DtBox>> {
        let mut keyed = Vec::with_capacity(dts.len());
        for (n, d) in dts.iter().enumerate() {
            let key = self.detection_key(d).with_context(|| format!("detection {n}"))?;
            keyed.push((key, DtBox { bbox: d.bbox, area: d.area(), score: d.score }));
        }
        Ok(Buckets::new(keyed))
    }

    /// The group of a detection; errors when a number is not finite, or the
    /// image id or category id is not in the ground truth (pycocotools'
    /// `loadRes` asserts the image ids; it would skip unknown categories).
    pub(super) fn detection_key(&self, d: &Detection) -> Result<(usize, usize)> {
        d.check_finite()?;
        let Some(&i) = self.image_of.get(&d.image_id) else {
            bail!("image_id {} is not in the ground truth", d.image_id);
        };
        let Some(&k) = self.category_of.get(&d.category_id) else {
            bail!("category_id {} is not in the ground-truth categories", d.category_id);
        };
        Ok((k, i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_sparse() {
        let b = Buckets::new(vec![((1, 1), 'a'), ((0, 0), 'b'), ((1, 1), 'c'), ((0, 1), 'd')]);
        let category = |k| b.category(k).collect::<Vec<_>>();
        assert_eq!(category(0), vec![(0, &['b'][..]), (1, &['d'][..])]);
        assert_eq!(category(1), vec![(1, &['a', 'c'][..])]);
        assert!(category(2).is_empty());
    }

    #[test]
    fn images_with_ground_truth_or_detections_are_merged_in_order() {
        let g = GtBox { bbox: [0.0; 4], area: 0.0, crowd: false, id_is_zero: false };
        let d = DtBox { bbox: [0.0; 4], area: 0.0, score: 0.5 };
        let gts = Buckets::new(vec![((0, 2), g), ((0, 5), g), ((1, 0), g)]);
        let dts = Buckets::new(vec![((0, 5), d), ((0, 1), d), ((0, 5), d)]);
        let sizes: Vec<(usize, usize)> =
            images_with_boxes(&gts, &dts, 0).iter().map(|(g, d)| (g.len(), d.len())).collect();
        assert_eq!(sizes, vec![(0, 1), (1, 0), (1, 2)]);
        assert_eq!(images_with_boxes(&gts, &dts, 1).len(), 1);
    }
}
