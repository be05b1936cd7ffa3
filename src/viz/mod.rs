//! Pictures for people: boxes drawn on images, and plots.

pub(crate) mod draw;
pub(crate) mod plot;
