//! A COCO annotation file: parsing, the dataset checks and repairs of both
//! label modes, and the evaluator's ground-truth index. Any input must give
//! a value or an error, never a panic.
#![no_main]

use candle_retinanet::data::coco::{CocoJson, Dataset, LabelMode, LoadOptions};
use candle_retinanet::eval::index::EvalIndex;
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
    let _ = EvalIndex::new(&coco).ground_truth(&coco);
});
