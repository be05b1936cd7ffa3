//! Decoding of the image forms found in real datasets, each made here.

use std::io::Cursor;

use candle_retinanet::data::{image_size, load_rgb};
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageBuffer, ImageEncoder, Luma, LumaA, Rgb, Rgba};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

#[test]
fn grayscale_png_becomes_rgb() {
    let path = Scratch::new("g.png");
    ImageBuffer::from_fn(4, 3, |x, y| Luma([(x * 10 + y) as u8])).save(&path).unwrap();
    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.dimensions(), (4, 3));
    assert_eq!(rgb.get_pixel(3, 2).0, [32, 32, 32]);
}

#[test]
fn gray_alpha_and_rgba_png_drop_alpha() {
    let dir = Scratch::folder("alpha");
    ImageBuffer::from_fn(2, 2, |_, _| LumaA([7u8, 9])).save(dir.join("la.png")).unwrap();
    ImageBuffer::from_fn(2, 2, |_, _| Rgba([1u8, 2, 3, 0])).save(dir.join("rgba.png")).unwrap();
    assert_eq!(load_rgb(&dir.join("la.png")).unwrap().get_pixel(1, 1).0, [7, 7, 7]);
    assert_eq!(load_rgb(&dir.join("rgba.png")).unwrap().get_pixel(1, 1).0, [1, 2, 3]);
}

#[test]
fn sixteen_bit_png_is_scaled_to_eight_bits() {
    let path = Scratch::new("deep.png");
    ImageBuffer::from_fn(2, 1, |x, _| Rgb([if x == 0 { 0u16 } else { 65535 }, 32896, 257])).save(&path).unwrap();
    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 1]);
    assert_eq!(rgb.get_pixel(1, 0).0, [255, 128, 1]);
}

/// A little-endian TIFF block holding one tag: Orientation = `value`.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut t = b"II*\0".to_vec();
    t.extend_from_slice(&8u32.to_le_bytes()); // first IFD offset
    t.extend_from_slice(&1u16.to_le_bytes()); // one entry
    t.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    t.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    t.extend_from_slice(&1u32.to_le_bytes()); // count
    t.extend_from_slice(&value.to_le_bytes());
    t.extend_from_slice(&[0, 0]); // value padding
    t.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    t
}

#[test]
fn exif_rotated_jpeg_is_turned_upright() {
    // Stored 40x20, left half black and right half white; orientation 6
    // means "rotate 90 degrees clockwise to view".
    let stored = ImageBuffer::from_fn(40, 20, |x, _| if x < 20 { Rgb([0u8; 3]) } else { Rgb([255u8; 3]) });
    let mut bytes = Vec::new();
    let mut encoder = JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 95);
    encoder.set_exif_metadata(exif_orientation(6)).unwrap();
    encoder.write_image(stored.as_raw(), 40, 20, image::ExtendedColorType::Rgb8).unwrap();
    let path = Scratch::new("rotated.jpg");
    std::fs::write(&path, &bytes).unwrap();

    let rgb = load_rgb(&path).unwrap();
    assert_eq!(rgb.dimensions(), (20, 40), "width and height swap");
    assert_eq!(image_size(&path).unwrap(), (20, 40));
    // After a clockwise turn the stored left (black) half is on top.
    assert!(rgb.get_pixel(10, 5).0[0] < 30, "top is black");
    assert!(rgb.get_pixel(10, 35).0[0] > 225, "bottom is white");
}

/// Made by `tests/fixtures/images/make_images.py` (Pillow): left half red,
/// right half blue.
fn assert_red_blue(path: &str) {
    let rgb = load_rgb(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    assert_eq!(rgb.dimensions(), (24, 16), "{path}");
    let [r, _, b] = rgb.get_pixel(3, 8).0;
    assert!(r > 230 && b < 30, "{path}: left is red, got {:?}", rgb.get_pixel(3, 8));
    let [r, _, b] = rgb.get_pixel(20, 8).0;
    assert!(r < 30 && b > 230, "{path}: right is blue, got {:?}", rgb.get_pixel(20, 8));
}

#[test]
fn progressive_and_cmyk_jpeg_become_rgb() {
    assert_red_blue("tests/fixtures/images/progressive.jpg");
    assert_red_blue("tests/fixtures/images/cmyk.jpg");
}

#[test]
fn baseline_jpeg_decodes() {
    let path = Scratch::new("plain.jpg");
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 8, |x, y| Rgb([(x * 16) as u8, (y * 32) as u8, 100])))
        .save(&path)
        .unwrap();
    assert_eq!(load_rgb(&path).unwrap().dimensions(), (16, 8));
}

#[test]
fn broken_files_are_errors_naming_the_file() {
    let dir = Scratch::folder("broken");
    let good = {
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(ImageBuffer::from_pixel(64, 64, Rgb([9u8, 9, 9])))
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    };
    std::fs::write(dir.join("truncated.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    std::fs::write(dir.join("text.jpg"), b"this is not an image").unwrap();
    for name in ["truncated.png", "empty.jpg", "text.jpg", "missing.jpg"] {
        let err = load_rgb(&dir.join(name)).unwrap_err();
        assert!(format!("{err:#}").contains(name), "{name}: {err:#}");
    }
}

/// Found by fuzzing (fuzz/fuzz_targets/image_decode.rs): a 33 kB PNG whose
/// header claims 83,886,080x128 pixels made decoding allocate 30 GB (the
/// chunk CRCs, which fuzzing builds of the png crate skip, fixed since).
#[test]
fn a_header_claiming_a_huge_image_is_an_error_not_an_allocation() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/images/huge_dimensions.png");
    let err = format!("{:#}", load_rgb(std::path::Path::new(path)).unwrap_err());
    assert!(err.contains("huge_dimensions.png") && err.contains("83886080x128"), "{err}");
}
