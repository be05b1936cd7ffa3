//! Pictures for people: boxes drawn on images, and plots.

pub mod draw;
pub mod plot;
