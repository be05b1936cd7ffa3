//! A COCO annotation file: parsing, the dataset checks and repairs of both
//! label modes, and the evaluator's ground-truth index. Any input must give
//! a value or an error, never a panic.
#![no_main]

use candle_retinanet::config::LabelMode;
use candle_retinanet::data::{CocoJson, Dataset, LoadOptions};
use candle_retinanet::eval::{evaluate, EvalParams};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(coco) = serde_json::from_slice::<CocoJson>(data) else {
        return;
    };
    for label_mode in [LabelMode::Contiguous, LabelMode::CategoryId] {
        for drop_empty in [false, true] {
            let _ = Dataset::from_coco(&coco, LoadOptions { label_mode, drop_empty });
        }
    }
    // The evaluator's ground-truth index, with no detection to score.
    let _ = evaluate(&coco, &[], &EvalParams::default());
});
