//! Boxes with class names and scores drawn onto images.

use std::sync::OnceLock;

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_hollow_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;

/// DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans-LICENSE.txt).
const FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The label font, parsed once.
pub(crate) fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| FontRef::try_from_slice(FONT_BYTES).expect("the bundled font parses"))
}

/// A distinct colour per class (Tableau 10, repeating).
pub(crate) fn class_colour(label: usize) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 10] = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ];
    Rgb(PALETTE[label % PALETTE.len()])
}

/// Draws a `[x1, y1, x2, y2]` box (pixels) with a caption above it, e.g.
/// `"WBC 0.97"`. Parts outside the image are cut off.
pub(crate) fn draw_labeled_box(image: &mut RgbImage, bbox: [f32; 4], caption: &str, colour: Rgb<u8>) {
    let thickness = (image.width().max(image.height()) / 300).clamp(1, 4) as i32;
    let [x1, y1, x2, y2] = bbox.map(|v| v.round() as i32);
    for t in 0..thickness {
        let (w, h) = ((x2 - x1 - 2 * t).max(1) as u32, (y2 - y1 - 2 * t).max(1) as u32);
        draw_hollow_rect_mut(image, Rect::at(x1 + t, y1 + t).of_size(w, h), colour);
    }
    let scale = PxScale::from((image.height() as f32 / 40.0).clamp(11.0, 22.0));
    let (text_w, text_h) = text_size(scale, font(), caption);
    let pad = 2;
    let top = if y1 - (text_h as i32 + 2 * pad) >= 0 { y1 - (text_h as i32 + 2 * pad) } else { y1 };
    let background = Rect::at(x1, top).of_size(text_w + 2 * pad as u32, text_h + 2 * pad as u32);
    draw_filled_rect_mut(image, background, colour);
    draw_text_mut(image, Rgb([255, 255, 255]), x1 + pad, top + pad, scale, font(), caption);
}
