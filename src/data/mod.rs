//! Datasets: annotation files to validated images and boxes (`source`
//! reads COCO (`coco`), Pascal VOC (`voc`), YOLO (`yolo`) and
//! keras-retinanet's CSV (`keras_csv`) into one form), image decoding
//! (`image_io`), the model's input transform
//! (`transforms`) with the training augmentations (`augment`), seeded and resumable batches (`loader`), and the
//! synthetic shapes generator (`synthetic`).
//!
//! Label semantics: a box's *label* is in `0..num_classes`; [`CategoryMap`]
//! maps labels to the dataset's category ids and names. Crowd boxes are
//! kept with `crowd = true`: never foreground, the anchors they cover
//! ignored in training and in evaluation.

mod augment;
mod coco;
mod convert;
mod image_io;
mod keras_csv;
mod loader;
mod source;
mod synthetic;
mod transforms;
mod voc;
mod yolo;

pub use coco::{
    read_coco_json, CategoryMap, CocoAnnotation, CocoCategory, CocoImage, CocoJson, Dataset, ImageEntry, LoadOptions,
    LoadReport, SplitFiles,
};
pub use convert::{create_folder_atomically, write_coco_layout};
pub use image_io::{decode_rgb, image_files, image_size, load_rgb};
pub use loader::{Batch, Loader, LoaderOptions, Shard, Target};
pub use source::{load_split, LoadedSplit};
pub use synthetic::{write_dataset, SynthSpec, CLASSES, MAX_SHAPE, MIN_SHAPE};
pub use transforms::{hflip_boxes, pad_batch, resize_bilinear, scale_boxes, Augment, Transform, TransformedImage};
