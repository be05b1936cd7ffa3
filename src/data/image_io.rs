//! Image decoding to 8-bit RGB: JPEG (baseline and progressive) and PNG;
//! grayscale, alpha, 16-bit and CMYK converted; EXIF orientation applied.

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// Decodes an image file to RGB, upright as a viewer shows it.
///
/// The format is taken from the file's bytes, not its name, so a PNG named
/// `.jpg` still decodes and a text file named `.jpg` is reported as such.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| path.display().to_string())
}

/// Most bytes a decoded image may take (a 16-bit RGBA 8192x8192 image).
/// A header can claim any size: without a cap a 33 kB PNG asked for 30 GB
/// (found by fuzzing, tests/fixtures/images/huge_dimensions.png).
pub(super) const MAX_DECODED_BYTES: u64 = 512 << 20;

/// [`load_rgb`] on the bytes of an image file.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().context("cannot read image")?;
    let mut decoder = reader.into_decoder().context("not a supported image")?;
    let (width, height) = decoder.dimensions();
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        anyhow::bail!(
            "image of {width}x{height} pixels needs {} MiB to decode, more than the {} MiB allowed",
            decoder.total_bytes() >> 20,
            MAX_DECODED_BYTES >> 20
        );
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    decoder.set_limits(limits).context("image too large to decode")?;
    // A broken EXIF block must not make a good image unreadable.
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).context("corrupt image")?;
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    if image.width() == 0 || image.height() == 0 {
        anyhow::bail!("image has zero width or height");
    }
    Ok(image.into_rgb8())
}

/// The file extensions read as images (lower case).
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The image files directly inside `dir` (by extension), sorted.
pub fn image_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads only the header: (width, height) after EXIF orientation.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let reader = ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let mut decoder = reader.into_decoder().with_context(|| format!("{}: not a supported image", path.display()))?;
    let (w, h) = decoder.dimensions();
    let swapped = matches!(
        decoder.orientation(),
        Ok(image::metadata::Orientation::Rotate90
            | image::metadata::Orientation::Rotate270
            | image::metadata::Orientation::Rotate90FlipH
            | image::metadata::Orientation::Rotate270FlipH)
    );
    Ok(if swapped { (h, w) } else { (w, h) })
}
