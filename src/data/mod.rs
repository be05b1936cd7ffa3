//! Datasets: COCO annotations, image decoding, transforms, batching, and the
//! synthetic shapes generator.

pub mod coco;
pub mod image_io;
pub mod loader;
pub mod source;
pub mod synthetic;
pub mod transforms;
