//! Reading COCO annotation files: good files, and each broken form naming
//! the file and the problem.

use std::path::PathBuf;

use candle_retinanet::config::LabelMode;
use candle_retinanet::data::{Dataset, LoadOptions};

#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

/// `text` written to a file named `name` in a scratch folder.
fn write(name: &str, text: &str) -> Scratch {
    let path = Scratch::new(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn error_of(name: &str, text: &str) -> String {
    let path = write(name, text);
    format!("{:#}", Dataset::load(&path, LoadOptions::default()).unwrap_err())
}

const IMAGES: &str = r#""images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]"#;
const CATEGORIES: &str = r#""categories": [{"id": 5, "name": "cell"}]"#;

#[test]
fn bccd_loads_with_every_box_kept() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/bccd/annotations/instances_train.json");
    let d = Dataset::load(&path, LoadOptions::default()).unwrap();
    assert_eq!(d.images.len(), 205);
    assert_eq!(d.images.iter().map(|im| im.boxes.len()).sum::<usize>(), 2804);
    assert_eq!(d.report.degenerate_boxes + d.report.clipped_boxes + d.report.empty_images, 0);
    assert_eq!(d.categories.name_of(2), "Platelets");
}

#[test]
fn crowd_boxes_and_empty_images_are_kept() {
    let text = format!(
        r#"{{{IMAGES}, {CATEGORIES}, "annotations": [{{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "iscrowd": 1}}]}}"#
    );
    let d = Dataset::load(&write("crowd.json", &text), LoadOptions::default()).unwrap();
    assert_eq!(d.images[0].crowd, vec![true]);
    let empty = format!(r#"{{{IMAGES}, {CATEGORIES}, "annotations": []}}"#);
    let d = Dataset::load(&write("empty.json", &empty), LoadOptions::default()).unwrap();
    assert_eq!((d.images.len(), d.report.empty_images), (1, 1));
    let by_id = LoadOptions { label_mode: LabelMode::CategoryId, drop_empty: false };
    let d = Dataset::load(&write("crowd2.json", &text), by_id).unwrap();
    assert_eq!(d.images[0].labels, vec![5]);
}

#[test]
fn syntax_errors_give_line_and_column() {
    let err = error_of("syntax.json", "{\n  \"images\": [\n    {\"id\": 1,, }\n  ]\n}");
    assert!(err.contains("syntax.json"), "{err}");
    assert!(err.contains("line 3 column"), "{err}");
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let cases = [
        (format!(r#"{{{IMAGES}, "annotations": []}}"#), "missing field `categories`"),
        (
            format!(r#"{{{IMAGES}, {CATEGORIES}, "annotations": [{{"id": 1, "image_id": 1, "category_id": 5}}]}}"#),
            "missing field `bbox`",
        ),
        (
            format!(r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": "wide", "height": 4}}], {CATEGORIES}}}"#),
            "invalid type: string \"wide\"",
        ),
        (
            format!(
                r#"{{{IMAGES}, {CATEGORIES}, "annotations": [{{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3]}}]}}"#
            ),
            "invalid length 3",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let name = format!("fields{i}.json");
        let err = error_of(&name, text);
        assert!(err.contains(&name) && err.contains(expected), "{err}");
    }
}

#[test]
fn inconsistent_files_are_rejected() {
    let cases = [
        (
            format!(
                r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}}, {{"id": 1, "file_name": "b.jpg", "width": 4, "height": 4}}], {CATEGORIES}}}"#
            ),
            "images[1]: duplicate image id 1",
        ),
        (
            format!(r#"{{{IMAGES}, "categories": [{{"id": 5, "name": "a"}}, {{"id": 5, "name": "b"}}]}}"#),
            "duplicate id 5",
        ),
        (
            format!(r#"{{"images": [{{"id": 1, "file_name": "a.jpg", "width": 0, "height": 4}}], {CATEGORIES}}}"#),
            "zero width or height",
        ),
        (
            format!(
                r#"{{{IMAGES}, {CATEGORIES}, "annotations": [{{"id": 3, "image_id": 2, "category_id": 5, "bbox": [1, 1, 1, 1]}}]}}"#
            ),
            "annotations[0] (id 3): image_id 2 is not in images",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let name = format!("bad{i}.json");
        let err = error_of(&name, text);
        assert!(err.contains(&name) && err.contains(expected), "{err}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let err = format!(
        "{:#}",
        Dataset::load(std::path::Path::new("/nonexistent/x.json"), LoadOptions::default()).unwrap_err()
    );
    assert!(err.contains("/nonexistent/x.json"), "{err}");
}
