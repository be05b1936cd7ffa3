//! The input transform against torch and torchvision.
//!
//! Golden values come from `tests/fixtures/transforms/make_resize.py`:
//!
//! ```python
//! y = F.interpolate(x[None], size=(oh, ow), mode="bilinear", align_corners=False)[0]
//! t = GeneralizedRCNNTransform(min_size=40, max_size=70, image_mean=[0.485, 0.456, 0.406],
//!                              image_std=[0.229, 0.224, 0.225], size_divisible=32).eval()
//! images, targets = t([img], [{"boxes": boxes, "labels": labels}])
//! back = t.postprocess([{"boxes": targets[0]["boxes"], ...}], images.image_sizes, [(30, 50)])
//! ```

use candle_retinanet::config::InputConfig;
use candle_retinanet::data::{hflip_boxes, pad_batch, resize_bilinear, scale_boxes, Augment, Transform};
use image::RgbImage;
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/transforms/resize.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn boxes(v: &Value) -> Vec<[f32; 4]> {
    v.as_array().unwrap().iter().map(|b| floats(b).try_into().unwrap()).collect()
}

/// `x[k] = fract(sin(1 + k) * 43758.5453)`, the script's `pattern`.
fn pattern(len: usize) -> Vec<f32> {
    (0..len)
        .map(|k| {
            let v = ((k + 1) as f64).sin() * 43758.5453;
            (v - v.floor()) as f32
        })
        .collect()
}

fn assert_close(actual: &[f32], expected: &[f32], tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tol, "{what}[{i}]: {a} vs torch {e}");
    }
}

#[test]
fn bilinear_resize_equals_torch_interpolate() {
    for case in fixture()["resize"].as_array().unwrap() {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let (c, h, w, oh, ow) = (get("c"), get("h"), get("w"), get("out_h"), get("out_w"));
        let out = resize_bilinear(&pattern(c * h * w), c, h, w, oh, ow);
        assert_close(&out, &floats(&case["output"]), 1e-6, &format!("{h}x{w} -> {oh}x{ow}"));
    }
}

#[test]
fn whole_transform_equals_generalized_rcnn_transform() {
    let case = &fixture()["transform"];
    let (h, w) = (30u32, 50u32);
    let image = RgbImage::from_fn(w, h, |x, y| image::Rgb([0, 1, 2].map(|c| ((y * 7 + x * 13 + c * 101) % 256) as u8)));
    let transform = Transform::new(&InputConfig { min_size: vec![40], max_size: 70, ..InputConfig::default() });
    let input_boxes = boxes(&case["boxes_in"]);
    let out = transform.apply(&image, &input_boxes, Augment::NONE);
    assert_eq!([out.height, out.width], [40, 66]);
    assert_eq!(floats(&case["resized"]), vec![out.height as f32, out.width as f32]);

    let padded = transform.padded_size([(out.height, out.width)]);
    assert_eq!(padded, (64, 96));
    let tensor = pad_batch(&[&out], padded);
    assert_close(&tensor, &floats(&case["tensor"]), 1e-5, "transformed input");

    let expected_resized = boxes(&case["boxes_resized"]);
    assert_close(out.boxes.as_flattened(), expected_resized.as_flattened(), 1e-5, "resized boxes");

    let mut back = out.boxes.clone();
    scale_boxes(&mut back, (out.height, out.width), (h as usize, w as usize));
    assert_close(back.as_flattened(), boxes(&case["boxes_back"]).as_flattened(), 1e-4, "boxes mapped back");
}

#[test]
fn flip_resize_pad_and_back_is_exact_geometry() {
    // A 100x200 image scaled by 0.5 to 50x100, flipped, padded to 64x128.
    let transform = Transform::new(&InputConfig { min_size: vec![50], max_size: 1000, ..InputConfig::default() });
    let image = RgbImage::new(200, 100);
    let input = vec![[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]];
    let out = transform.apply(&image, &input, Augment { min_size_index: Some(0), hflip: true, seed: None });
    assert_eq!((out.height, out.width), (50, 100));
    assert_eq!(out.boxes, vec![[75.0, 10.0, 95.0, 30.0], [0.0, 0.0, 100.0, 50.0]]);
    assert_eq!(transform.padded_size([(out.height, out.width)]), (64, 128));

    let mut back = out.boxes.clone();
    scale_boxes(&mut back, (50, 100), (100, 200));
    hflip_boxes(&mut back, 200.0);
    assert_eq!(back, input);
}

#[test]
fn flip_mirrors_pixels_and_boxes_together() {
    // A white 10x10 square at x 0..10 of a 40x20 black image.
    let image =
        RgbImage::from_fn(40, 20, |x, y| if x < 10 && y < 10 { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) });
    let cfg = InputConfig { min_size: vec![20], max_size: 40, mean: [0.0; 3], std: [1.0; 3], ..InputConfig::default() };
    let out = Transform::new(&cfg).apply(
        &image,
        &[[0.0, 0.0, 10.0, 10.0]],
        Augment { min_size_index: Some(0), hflip: true, seed: None },
    );
    assert_eq!(out.boxes, vec![[30.0, 0.0, 40.0, 10.0]]);
    let [x1, y1, x2, y2] = out.boxes[0].map(|v| v as usize);
    for y in 0..out.height {
        for x in 0..out.width {
            let inside = (x1..x2).contains(&x) && (y1..y2).contains(&y);
            assert_eq!(out.chw[y * out.width + x], if inside { 1.0 } else { 0.0 }, "pixel ({x}, {y})");
        }
    }
}
