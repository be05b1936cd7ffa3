//! The dataset formats users bring (COCO, Pascal VOC, YOLO, keras-retinanet's
//! CSV): the same data written in each reads to the same images, boxes and
//! statistics (BCCD, written by the helpers below), a VOC or YOLO folder
//! trains with `data.root` alone and scores as its COCO conversion does, and
//! broken files give one error naming the file and the line or element.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_retinanet::config::{Config, DataConfig};
use candle_retinanet::data::{load_split, read_coco_json, CocoJson, LoadedSplit};
use candle_retinanet::inspect;

#[path = "support/tiny_model.rs"]
mod tiny_model;
use tiny_model::TINY_MODEL;
#[path = "support/scratch.rs"]
mod scratch;
use scratch::Scratch;

fn bccd() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/bccd")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn link(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(from, to).unwrap();
}

fn stem(file_name: &str) -> String {
    Path::new(file_name).file_stem().unwrap().to_string_lossy().into_owned()
}

/// `(image, category name, [x1, y1, x2, y2])` of every box of a split.
fn boxes_of(coco: &CocoJson) -> Vec<(u64, String, [f64; 4])> {
    let names: BTreeMap<u64, &str> = coco.categories.iter().map(|c| (c.id, c.name.as_str())).collect();
    let mut boxes: Vec<_> = coco
        .annotations
        .iter()
        .map(|a| {
            let [x, y, w, h] = a.bbox;
            (a.image_id, names[&a.category_id].to_string(), [x, y, x + w, y + h])
        })
        .collect();
    boxes.sort_by(|a, b| a.0.cmp(&b.0).then(a.2[0].total_cmp(&b.2[0])).then(a.2[1].total_cmp(&b.2[1])));
    boxes
}

/// Pascal VOC: `devkit` writes Annotations/, JPEGImages/ and
/// ImageSets/Main/<split>.txt, else annotations/, images/ and <split>.txt.
/// Coordinates are 1-based and inclusive: `xmin = x1 + 1`.
fn write_voc(splits: &[(&str, &CocoJson)], images: &Path, dir: &Path, devkit: bool) {
    let (annotations, image_dir, lists) =
        if devkit { ("Annotations", "JPEGImages", "ImageSets/Main") } else { ("annotations", "images", ".") };
    link(images, &dir.join(image_dir));
    for (split, coco) in splits {
        let mut list = String::new();
        for image in &coco.images {
            let mut xml = format!(
                "<annotation>\n  <filename>{}</filename>\n  <size><width>{}</width><height>{}</height><depth>3</depth></size>\n",
                image.file_name, image.width, image.height
            );
            for (_, name, [x1, y1, x2, y2]) in boxes_of(coco).into_iter().filter(|b| b.0 == image.id) {
                xml += &format!(
                    "  <object>\n    <name>{name}</name>\n    <difficult>0</difficult>\n    <bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>\n  </object>\n",
                    x1 + 1.0,
                    y1 + 1.0
                );
            }
            xml += "</annotation>\n";
            write(&dir.join(annotations).join(format!("{}.xml", stem(&image.file_name))), &xml);
            list += &format!("{}\n", stem(&image.file_name));
        }
        write(&dir.join(lists).join(format!("{split}.txt")), &list);
    }
}

/// Ultralytics YOLO: data.yaml, images/<split>/ and labels/<split>/*.txt
/// with `class cx cy w h` normalised; class = category index (sorted by id).
fn write_yolo(splits: &[(&str, &CocoJson)], images: &Path, dir: &Path) {
    let categories = &splits[0].1.categories;
    let names: Vec<String> = categories.iter().map(|c| format!("  {}: {}", c.id - 1, c.name)).collect();
    let keys: Vec<String> = splits.iter().map(|(split, _)| format!("{split}: images/{split}")).collect();
    write(&dir.join("data.yaml"), &format!("path: .\n{}\nnames:\n{}\n", keys.join("\n"), names.join("\n")));
    for (split, coco) in splits {
        for image in &coco.images {
            link(&images.join(&image.file_name), &dir.join("images").join(split).join(&image.file_name));
            let (w, h) = (f64::from(image.width), f64::from(image.height));
            let lines: String = (coco.annotations.iter().filter(|a| a.image_id == image.id))
                .map(|a| {
                    let [x, y, bw, bh] = a.bbox;
                    let class = categories.iter().position(|c| c.id == a.category_id).unwrap();
                    format!("{class} {:.8} {:.8} {:.8} {:.8}\n", (x + bw / 2.0) / w, (y + bh / 2.0) / h, bw / w, bh / h)
                })
                .collect();
            if !lines.is_empty() {
                write(&dir.join("labels").join(split).join(format!("{}.txt", stem(&image.file_name))), &lines);
            }
        }
    }
}

/// keras-retinanet CSV: classes.csv and <split>.csv with
/// `path,x1,y1,x2,y2,class_name` rows (`path,,,,,` for an image without boxes).
fn write_csv(splits: &[(&str, &CocoJson)], images: &Path, dir: &Path) {
    link(images, &dir.join("images"));
    let categories = &splits[0].1.categories;
    let classes: String = categories.iter().map(|c| format!("{},{}\n", c.name, c.id - 1)).collect();
    write(&dir.join("classes.csv"), &classes);
    for (split, coco) in splits {
        let mut rows = String::new();
        for image in &coco.images {
            let boxes: Vec<_> = boxes_of(coco).into_iter().filter(|b| b.0 == image.id).collect();
            if boxes.is_empty() {
                rows += &format!("images/{},,,,,\n", image.file_name);
            }
            for (_, name, [x1, y1, x2, y2]) in boxes {
                rows += &format!("images/{},{x1},{y1},{x2},{y2},{name}\n", image.file_name);
            }
        }
        write(&dir.join(format!("{split}.csv")), &rows);
    }
}

fn data(root: &Path) -> DataConfig {
    DataConfig { root: root.display().to_string(), ..DataConfig::default() }
}

/// A split's boxes keyed by image file stem, with class names.
fn keyed(split: &LoadedSplit) -> BTreeMap<String, Vec<(String, [f32; 4], bool)>> {
    let map = &split.dataset.categories;
    (split.dataset.images.iter())
        .map(|image| {
            let mut boxes: Vec<_> = (image.boxes.iter().zip(&image.labels).zip(&image.crowd))
                .map(|((b, &label), &crowd)| (map.name_of(label), *b, crowd))
                .collect();
            boxes.sort_by(|a, b| a.1[0].total_cmp(&b.1[0]).then(a.1[1].total_cmp(&b.1[1])));
            (stem(&image.file_name), boxes)
        })
        .collect()
}

/// Per class name: boxes, small, medium, large.
fn statistics_by_name(split: &LoadedSplit) -> BTreeMap<String, [usize; 4]> {
    let stats = inspect::statistics(&split.dataset);
    let map = &split.dataset.categories;
    (0..map.num_labels()).map(|label| (map.name_of(label), stats.per_class[label])).collect()
}

#[test]
fn bccd_reads_the_same_in_every_format() {
    let splits: Vec<(&str, CocoJson)> = ["train", "val"]
        .into_iter()
        .map(|s| (s, read_coco_json(&bccd().join(format!("annotations/instances_{s}.json"))).unwrap()))
        .collect();
    let refs: Vec<(&str, &CocoJson)> = splits.iter().map(|(s, c)| (*s, c)).collect();
    let images = bccd().join("images");
    let (voc, yolo, csv) = (Scratch::folder("voc"), Scratch::folder("yolo"), Scratch::folder("csv"));
    write_voc(&refs, &images, &voc, true);
    write_yolo(&refs, &images, &yolo);
    write_csv(&refs, &images, &csv);
    for split in ["train", "val"] {
        let coco = load_split(&data(&bccd()), split).unwrap();
        let expected = keyed(&coco);
        assert_eq!(expected.len(), coco.coco.images.len());
        for (name, root) in [("voc", &voc), ("yolo", &yolo), ("csv", &csv)] {
            let other = load_split(&data(root), split).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(statistics_by_name(&other), statistics_by_name(&coco), "{name} {split}: statistics");
            assert_eq!(other.dataset.report, coco.dataset.report, "{name} {split}: repairs");
            let found = keyed(&other);
            assert_eq!(found.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{name} {split}: images");
            for (image, boxes) in &expected {
                let theirs = &found[image];
                assert_eq!(theirs.len(), boxes.len(), "{name} {split} {image}");
                for ((n1, b1, c1), (n2, b2, c2)) in boxes.iter().zip(theirs) {
                    // YOLO's 8 normalised decimals of a 640 px side: 1e-5 px.
                    let close = b1.iter().zip(b2).all(|(a, b)| (a - b).abs() < 1e-3);
                    assert!(n1 == n2 && c1 == c2 && close, "{name} {split} {image}: {n1} {b1:?} against {n2} {b2:?}");
                }
            }
        }
    }
}

/// The first error of reading split `split` of `root`, all causes on one line.
fn error(root: &Path, split: &str) -> String {
    format!("{:#}", load_split(&data(root), split).expect_err("the dataset must not load"))
}

/// A tiny dataset of one 8x8 image in each format, with one box.
fn tiny_image(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    image::RgbImage::new(8, 8).save(dir.join(name)).unwrap();
}

fn voc_folder(name: &str, object: &str) -> Scratch {
    let dir = Scratch::folder(name);
    tiny_image(&dir.join("images"), "a.png");
    let xml = format!("<annotation>\n<filename>a.png</filename>\n<size><width>8</width><height>8</height></size>\n{object}\n</annotation>\n");
    write(&dir.join("annotations/a.xml"), &xml);
    dir
}

#[test]
fn broken_voc_files_name_the_file_and_line() {
    let bndbox = |b: &str| format!("<object>\n<name>cell</name>\n<bndbox>{b}</bndbox>\n</object>");
    let good = bndbox("<xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax>");
    let cases = [
        (
            bndbox("<xmin>6</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax>"),
            "a.xml: line 4: <object> \"cell\" <bndbox>: x2 4 is below x1 5",
        ),
        (
            bndbox("<xmin>one</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax>"),
            "a.xml: line 6: <object> \"cell\" <bndbox>: <xmin> \"one\" is not a number",
        ),
        (bndbox("<xmin>1</xmin><ymin>1</ymin><xmax>4</xmax>"), "<ymax> missing"),
        ("<object><name>cell</name></object>".to_string(), "a.xml: line 4: <object> \"cell\" without <bndbox>"),
        ("<object><bndbox/></object>".to_string(), "<object> without <name>"),
        ("<object>".to_string(), "a.xml: not valid XML"),
    ];
    for (i, (object, expected)) in cases.iter().enumerate() {
        let err = error(&voc_folder(&format!("voc-bad-{i}"), object), "train");
        assert!(err.contains(expected), "case {i}: {err}");
    }
    let dir = voc_folder("voc-list", &good);
    write(&dir.join("val.txt"), "a\nb\n");
    assert!(error(&dir, "val").contains("val.txt: b has no"), "{}", error(&dir, "val"));
    let config = DataConfig { classes: vec!["other".into()], ..data(&dir) };
    let err = format!("{:#}", load_split(&config, "train").err().unwrap());
    assert!(err.contains("a.xml: line 4: <object> class \"cell\" is not in data.classes"), "{err}");
}

fn yolo_folder(name: &str, yaml: &str, labels: &str) -> Scratch {
    let dir = Scratch::folder(name);
    tiny_image(&dir.join("images/train"), "a.png");
    write(&dir.join("data.yaml"), yaml);
    write(&dir.join("labels/train/a.txt"), labels);
    dir
}

#[test]
fn broken_yolo_files_name_the_file_and_line() {
    let yaml = "train: images/train\nval: images/train\nnames: [cell, dot]\n";
    let cases = [
        (yaml, "0 0.5 0.5 0.2\n", "a.txt: line 1: expected 5 numbers (class cx cy w h), got 4"),
        (yaml, "0 0.5 0.5 0.2 0.2\n1 0.5 1.5 0.2 0.2\n", "a.txt: line 2: 1.5 is outside [0, 1]"),
        (yaml, "2 0.5 0.5 0.2 0.2\n", "a.txt: line 1: class 2 is not in names (0 to 1)"),
        (yaml, "0 0.5 half 0.2 0.2\n", "a.txt: line 1: \"half\" is not a number"),
        ("train: images/train\nnames: [cell]\n", "0 0.5 0.5 0.2 0.2\n", "data.yaml: key val: missing"),
        ("train: images/train\nval: images/train\n", "", "data.yaml: key names: missing"),
        ("train: images/none\nval: images/train\nnames: [cell]\n", "", "images/none: no such folder or file"),
    ];
    for (i, (yaml, labels, expected)) in cases.iter().enumerate() {
        let split = if expected.contains("key val") { "val" } else { "train" };
        let err = error(&yolo_folder(&format!("yolo-bad-{i}"), yaml, labels), split);
        assert!(err.contains(expected), "case {i}: {err}");
    }
}

fn csv_folder(name: &str, classes: &str, rows: &str) -> Scratch {
    let dir = Scratch::folder(name);
    tiny_image(&dir.join("images"), "a.png");
    write(&dir.join("classes.csv"), classes);
    write(&dir.join("train.csv"), rows);
    dir
}

#[test]
fn broken_csv_files_name_the_file_and_line() {
    let classes = "cell,0\ndot,1\n";
    let cases = [
        (classes, "images/a.png,1,1,4,4,cell\nimages/a.png,5,1,4,4,cell\n", "train.csv: line 2: x2 4 is below x1 5"),
        (classes, "images/a.png,1,1,4,4,blob\n", "train.csv: line 1: class \"blob\" is not in classes.csv"),
        (
            classes,
            "images/a.png,1,1,4,cell\n",
            "train.csv: line 1: expected path,x1,y1,x2,y2,class_name, got 5 field(s)",
        ),
        (classes, "images/a.png,1,one,4,4,cell\n", "train.csv: line 1: \"one\" is not a number"),
        ("cell,0\ncell,1\n", "images/a.png,,,,,\n", "classes.csv: line 2: \"cell\" or id 1 repeats line 1"),
        (classes, "images/b.png,1,1,4,4,cell\n", "train.csv: image images/b.png"),
    ];
    for (i, (classes, rows, expected)) in cases.iter().enumerate() {
        let err = error(&csv_folder(&format!("csv-bad-{i}"), classes, rows), "train");
        assert!(err.contains(expected), "case {i}: {err}");
    }
    let dir = csv_folder("csv-noval", classes, "images/a.png,,,,,\n");
    assert!(error(&dir, "val").contains("split val: no annotation file"), "{}", error(&dir, "val"));
}

#[test]
fn a_folder_of_no_known_layout_says_what_was_looked_for() {
    let err = error(&Scratch::folder("unknown"), "train");
    for expected in
        ["no dataset found", "instances_train.json (COCO)", "(Pascal VOC)", "data.yaml (YOLO)", "classes.csv (CSV)"]
    {
        assert!(err.contains(expected), "{err}");
    }
}

fn retinanet(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_retinanet")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "retinanet {}: {stderr}", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sets(extra: &[String]) -> Vec<String> {
    let tiny = TINY_MODEL.iter().chain(&["train.max_steps=3"]).map(|s| s.to_string());
    tiny.chain(extra.iter().cloned()).flat_map(|s| ["--set".to_string(), s]).collect()
}

/// A synthetic set written as the VOC flat layout and as YOLO trains with
/// `data.root` alone, and `eval` scores it as it scores its COCO conversion.
#[test]
fn voc_and_yolo_folders_train_and_score_as_their_coco_conversion() {
    let synth = Scratch::new("set");
    retinanet(&["synth", "--out", synth.to_str().unwrap(), "--train", "8", "--val", "4", "--size", "64"]);
    let splits: Vec<(&str, CocoJson)> = ["train", "val"]
        .into_iter()
        .map(|s| (s, read_coco_json(&synth.join(format!("annotations/instances_{s}.json"))).unwrap()))
        .collect();
    let refs: Vec<(&str, &CocoJson)> = splits.iter().map(|(s, c)| (*s, c)).collect();
    let (voc, yolo) = (Scratch::folder("voc-flat"), Scratch::folder("yolo-train"));
    write_voc(&refs, &synth.join("images"), &voc, false);
    write_yolo(&refs, &synth.join("images"), &yolo);
    for (name, root) in [("voc", &voc), ("yolo", &yolo)] {
        let run = Scratch::new(&format!("run-{name}"));
        let root_key = format!("data.root={}", root.display());
        let mut args = vec!["train".to_string(), "--out".into(), run.display().to_string()];
        args.extend(sets(std::slice::from_ref(&root_key)));
        retinanet(&args.iter().map(String::as_str).collect::<Vec<_>>());

        let converted = Scratch::new("coco");
        let mut convert = vec!["convert".to_string(), "--out".into(), converted.display().to_string()];
        convert.extend(["--set".to_string(), root_key.clone()]);
        retinanet(&convert.iter().map(String::as_str).collect::<Vec<_>>());

        let score = |root: &str| -> serde_json::Value {
            let set = format!("data.root={root}");
            let stdout = retinanet(&["eval", "--json", "--weights", run.to_str().unwrap(), "--set", &set]);
            serde_json::from_str(&stdout).unwrap()
        };
        let (native, coco) = (score(&root.display().to_string()), score(&converted.display().to_string()));
        assert_eq!(native["stats"], coco["stats"], "{name}: the same numbers read natively and converted");
        assert_eq!(native["images"], 4);
        let config = Config::resolve(Some(run.join("config.toml").to_str().unwrap()), &[]).unwrap();
        assert_eq!(config.data.classes, ["circle", "square", "triangle"], "{name}");
    }
}
