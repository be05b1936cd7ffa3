//! Inference: image -> detections. [`Predictor`] runs a trained model on
//! single images; [`detect_batch`] and [`evaluate_split`] run it over
//! batches and score it on a dataset split; [`draw_detections`] draws the
//! result.

mod detect;
mod predictor;

use image::RgbImage;

pub use detect::{detect_batch, detect_split, evaluate_split, to_coco_results};
pub use predictor::Predictor;

use crate::data::CategoryMap;
use crate::model::Detections;
use crate::viz::draw::{class_colour, draw_labeled_box};

/// Draws each detection's box with its class name and score, the best on top.
pub fn draw_detections(image: &mut RgbImage, detections: &Detections, categories: &CategoryMap) {
    for i in (0..detections.boxes.len()).rev() {
        let label = detections.labels[i];
        let caption = format!("{} {:.2}", categories.name_of(label), detections.scores[i]);
        draw_labeled_box(image, detections.boxes[i], &caption, class_colour(label));
    }
}
