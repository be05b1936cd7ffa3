//! candle-retinanet: RetinaNet object detection in Rust on Candle.
//!
//! Data flows one way: dataset -> transforms -> batches -> model -> loss
//! (training) or postprocess -> detections -> COCO evaluation / drawing.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod hub;
pub mod inference;
pub mod model;
pub mod ops;
pub mod predictor;
pub mod runtime;
pub mod train;
pub mod viz;
