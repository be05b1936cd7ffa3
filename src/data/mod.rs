//! Datasets: COCO annotations, image decoding, transforms, batching, and the
//! synthetic shapes generator.

pub mod coco;
