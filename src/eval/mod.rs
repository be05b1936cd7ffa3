//! COCO bbox evaluation, pycocotools-exact: the same numbers as
//! `COCOeval(gt, gt.loadRes(results), "bbox")` for every input, computed
//! in parallel. See [`evaluate`] and [`read_results`].

pub mod accumulate;
pub mod coco_eval;
pub mod grid;
pub mod image_eval;
pub mod index;
pub mod params;
pub mod plot;
pub mod report;
pub mod results;
pub mod summary;

pub use coco_eval::{evaluate, ClassAp, EvalResult};
pub use params::{AreaRange, EvalParams};
pub use plot::write_pr_plots;
pub use report::{write_eval_json, EvalReport};
pub use results::{parse_results, read_results, Detection};
