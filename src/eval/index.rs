//! Groups ground truth and detections by (category, image) the way
//! pycocotools' `_prepare` does, with flat arrays instead of dicts.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context, Result};

use super::image_eval::{DtBox, GtBox};
use super::results::Detection;
use crate::data::coco::CocoJson;

/// What gets evaluated: `imgIds = sorted(unique gt image ids)` and
/// `catIds = sorted(unique category ids)`.
#[derive(Debug, Clone)]
pub struct EvalIndex {
    /// `[I]` image ids, ascending.
    pub image_ids: Vec<u64>,
    /// `[K]` `(category id, name)`, ascending by id (first name for a repeated id).
    pub categories: Vec<(u64, String)>,
    image_of: HashMap<u64, usize>,
    category_of: HashMap<u64, usize>,
}

/// Items grouped by `k * I + i` (category index, image index), each group
/// in input order.
#[derive(Debug, Clone)]
pub struct Buckets<T> {
    images: usize,
    /// `[K * I + 1]` start of each group in `items`.
    offsets: Vec<usize>,
    items: Vec<T>,
}

impl<T: Copy> Buckets<T> {
    /// Counting sort of `(key, item)` pairs into `groups` groups, stable.
    fn new(keyed: &[(usize, T)], categories: usize, images: usize) -> Self {
        let mut offsets = vec![0usize; categories * images + 1];
        for &(key, _) in keyed {
            offsets[key + 1] += 1;
        }
        for i in 1..offsets.len() {
            offsets[i] += offsets[i - 1];
        }
        let mut next = offsets.clone();
        let mut items: Vec<Option<T>> = vec![None; keyed.len()];
        for &(key, item) in keyed {
            items[next[key]] = Some(item);
            next[key] += 1;
        }
        let items = items.into_iter().flatten().collect();
        Self {
            images,
            offsets,
            items,
        }
    }

    /// The items of category index `k` on image index `i`, in input order.
    pub fn get(&self, k: usize, i: usize) -> &[T] {
        let key = k * self.images + i;
        &self.items[self.offsets[key]..self.offsets[key + 1]]
    }
}

impl EvalIndex {
    pub fn new(gt: &CocoJson) -> Self {
        let mut image_ids: Vec<u64> = gt.images.iter().map(|im| im.id).collect();
        image_ids.sort_unstable();
        image_ids.dedup();
        let mut categories: Vec<(u64, String)> = Vec::with_capacity(gt.categories.len());
        for c in &gt.categories {
            if !categories.iter().any(|(id, _)| *id == c.id) {
                categories.push((c.id, c.name.clone()));
            }
        }
        categories.sort_by_key(|(id, _)| *id);
        let image_of = image_ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i))
            .collect();
        let category_of = categories
            .iter()
            .enumerate()
            .map(|(k, (id, _))| (*id, k))
            .collect();
        Self {
            image_ids,
            categories,
            image_of,
            category_of,
        }
    }

    fn key(&self, category_id: u64, image_id: u64) -> Option<usize> {
        let k = *self.category_of.get(&category_id)?;
        let i = *self.image_of.get(&image_id)?;
        Some(k * self.image_ids.len() + i)
    }

    /// Ground-truth boxes by (category, image). Annotations whose image or
    /// category is not listed are left out, as pycocotools leaves them out.
    /// A repeated annotation id is an error (pycocotools would silently
    /// evaluate the last annotation with that id in place of the others).
    pub fn ground_truth(&self, gt: &CocoJson) -> Result<Buckets<GtBox>> {
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
            keyed.push((
                key,
                GtBox {
                    bbox: ann.bbox,
                    area,
                    crowd: ann.iscrowd,
                    id_is_zero,
                },
            ));
        }
        Ok(Buckets::new(
            &keyed,
            self.categories.len(),
            self.image_ids.len(),
        ))
    }

    /// Detections by (category, image); errors name the detection's index.
    pub fn detections(&self, dts: &[Detection]) -> Result<Buckets<DtBox>> {
        let mut keyed = Vec::with_capacity(dts.len());
        for (n, d) in dts.iter().enumerate() {
            let key = self
                .detection_key(d)
                .with_context(|| format!("detection {n}"))?;
            keyed.push((
                key,
                DtBox {
                    bbox: d.bbox,
                    area: d.area(),
                    score: d.score,
                },
            ));
        }
        Ok(Buckets::new(
            &keyed,
            self.categories.len(),
            self.image_ids.len(),
        ))
    }

    /// The group of a detection; errors when a number is not finite, or the
    /// image id or category id is not in the ground truth (pycocotools'
    /// `loadRes` asserts the image ids; it would skip unknown categories).
    pub fn detection_key(&self, d: &Detection) -> Result<usize> {
        d.check_finite()?;
        let Some(&i) = self.image_of.get(&d.image_id) else {
            bail!("image_id {} is not in the ground truth", d.image_id);
        };
        let Some(&k) = self.category_of.get(&d.category_id) else {
            bail!(
                "category_id {} is not in the ground-truth categories",
                d.category_id
            );
        };
        Ok(k * self.image_ids.len() + i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_keyed_by_category_then_image() {
        let b = Buckets::new(&[(3, 'a'), (0, 'b'), (3, 'c'), (1, 'd')], 2, 2);
        assert_eq!(b.get(0, 0), &['b']);
        assert_eq!(b.get(0, 1), &['d']);
        assert!(b.get(1, 0).is_empty());
        assert_eq!(b.get(1, 1), &['a', 'c']);
    }
}
