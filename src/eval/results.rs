//! COCO results files: a JSON list of `{"image_id", "category_id", "bbox",
//! "score"}` objects, as written by detectors and read by pycocotools'
//! `loadRes` (bbox results only). `coco_eval::read_results` checks a file
//! against its ground truth.

use std::fmt;

use anyhow::{anyhow, bail, Result};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// One detection in COCO results format.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Detection {
    pub image_id: u64,
    /// The COCO category id (not a model label).
    pub category_id: u64,
    /// `[x, y, w, h]` in original image pixels, top-left origin.
    pub bbox: [f64; 4],
    pub score: f64,
}

impl Detection {
    /// Box area as `loadRes` sets it: `w * h`.
    pub fn area(&self) -> f64 {
        self.bbox[2] * self.bbox[3]
    }

    /// Errors when a coordinate or the score is not finite.
    pub fn check_finite(&self) -> Result<()> {
        if self.bbox.iter().any(|v| !v.is_finite()) {
            bail!("bbox {:?} is not finite", self.bbox);
        }
        if !self.score.is_finite() {
            bail!("score {} is not finite", self.score);
        }
        Ok(())
    }
}

/// Parses the JSON text of a results file; errors name the entry index.
pub fn parse_results(bytes: &[u8]) -> Result<Vec<Detection>> {
    let mut failed_entry = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = ResultsSeed { failed_entry: &mut failed_entry }
        .deserialize(&mut de)
        .and_then(|detections| de.end().map(|()| detections));
    parsed.map_err(|err| match failed_entry {
        Some(i) => anyhow!("entry {i}: {err}"),
        None => anyhow!("not a COCO results list: {err}"),
    })
}

/// Deserialises the top-level list, remembering which entry failed.
struct ResultsSeed<'a> {
    failed_entry: &'a mut Option<usize>,
}

impl<'de> DeserializeSeed<'de> for ResultsSeed<'_> {
    type Value = Vec<Detection>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ResultsSeed<'_> {
    type Value = Vec<Detection>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of detections")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let mut detections = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        loop {
            match seq.next_element::<Detection>() {
                Ok(Some(d)) => detections.push(d),
                Ok(None) => return Ok(detections),
                Err(err) => {
                    *self.failed_entry = Some(detections.len());
                    return Err(de::Error::custom(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_ignores_extra_fields() {
        let text = br#"[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3.5, 4], "score": 0.5, "segmentation": []}]"#;
        let d = parse_results(text).unwrap();
        assert_eq!(d, vec![Detection { image_id: 1, category_id: 2, bbox: [1.0, 2.0, 3.5, 4.0], score: 0.5 }]);
        assert!(parse_results(b"[]").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_entry() {
        let text = br#"[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5},
                        {"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]}]"#;
        let err = parse_results(text).unwrap_err().to_string();
        assert!(err.starts_with("entry 1: missing field `score`"), "{err}");
        let err = parse_results(br#"{"image_id": 1}"#).unwrap_err().to_string();
        assert!(err.starts_with("not a COCO results list"), "{err}");
    }
}
