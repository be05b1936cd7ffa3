//! COCO bbox evaluation, pycocotools-exact: the same numbers, bit for bit,
//! as `COCOeval(gt, gt.loadRes(results), "bbox")` with `evaluate()`,
//! `accumulate()` and `summarize()`, computed in parallel. See [`evaluate`]
//! and [`read_results`]; `tests/fixtures/coco_eval` holds the cases checked
//! against pycocotools.
//!
//! Where pycocotools crashes or silently does something odd, this module
//! does the following instead:
//! - an empty results list is valid (pycocotools' `loadRes` raises);
//! - a detection whose category id is not in the ground truth is an error
//!   (pycocotools drops it silently), like an unknown image id (an assert
//!   in pycocotools);
//! - a repeated annotation id in the ground truth is an error (pycocotools
//!   evaluates the last annotation with that id in place of the others);
//! - a ground-truth annotation without `area` uses `w * h` (pycocotools
//!   raises `KeyError`), one without `id` counts as a non-zero id;
//! - with fewer than three max-dets, the summary numbers that need the
//!   missing ones are -1 (pycocotools raises `IndexError`).
//!
//! Kept as pycocotools has it: a match to an annotation with id 0 counts as
//! a false positive (pycocotools marks matches by annotation id, 0 meaning
//! none), and annotations whose image or category is not listed are left
//! out.

mod accumulate;
mod coco_eval;
mod grid;
mod image_eval;
mod index;
mod params;
mod plot;
mod report;
mod results;
mod summary;

pub use coco_eval::{evaluate, read_results, ClassAp, EvalResult};
pub use params::{AreaRange, EvalParams};
pub(crate) use params::{LARGE_AREA, SMALL_AREA};
pub use plot::write_pr_plots;
pub use report::{write_eval_json, EvalReport};
pub use results::{parse_results, Detection};
