//! A COCO results file: parsing, the checks against a ground truth, and a
//! full evaluation of whatever passes them (non-finite or huge numbers,
//! ties, empty boxes).
#![no_main]

use candle_retinanet::data::CocoJson;
use candle_retinanet::eval::{evaluate, parse_results, EvalParams};
use libfuzzer_sys::fuzz_target;

/// Two images, two categories, a crowd box and an image without boxes.
const GROUND_TRUTH: &str = r#"{
  "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
             {"id": 2, "file_name": "b.jpg", "width": 32, "height": 32}],
  "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
  "annotations": [
    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 10], "area": 200, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 20, 30, 20], "area": 600, "iscrowd": 1},
    {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 64, 48], "area": 3072, "iscrowd": 0}
  ]
}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(detections) = parse_results(data) else {
        return;
    };
    let gt: CocoJson = serde_json::from_str(GROUND_TRUTH).expect("the ground truth parses");
    // Detections the ground truth does not know are an error, not a panic.
    let _ = evaluate(&gt, &detections, &EvalParams::default());
});
