//! Pascal VOC XML annotations: the devkit layout (`Annotations/*.xml`,
//! `JPEGImages/`, `ImageSets/Main/<split>.txt`) and the flat one labelling
//! tools export (`annotations/*.xml`, `images/`, an optional
//! `<split>.txt`; without a list, a split is every file). Read into the COCO
//! form (`CocoBuilder`).
//!
//! VOC's pixel coordinates are 1-based and inclusive; they become 0-based
//! corners as detectron2's VOC loader makes them: `x1 = xmin - 1`,
//! `y1 = ymin - 1`, `x2 = xmax`, `y2 = ymax`. A `difficult` box is an
//! ignored region, an ordinary box or left out (`data.voc_difficult`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use roxmltree::{Document, Node};

use super::coco::{check_corners, CocoBuilder, CocoJson, SplitFiles};
use super::image_io::image_size;
use crate::config::{DataConfig, VocDifficult};

/// The folders of a VOC dataset.
pub(super) struct VocLayout {
    annotations: PathBuf,
    images: PathBuf,
    /// Where `<split>.txt` lists are looked for.
    lists: Vec<PathBuf>,
}

impl VocLayout {
    /// The devkit or the flat layout under `root`, if either holds XML files.
    pub(super) fn find(root: &Path) -> Option<Self> {
        let layouts = [
            (root.join("Annotations"), root.join("JPEGImages"), vec![root.join("ImageSets/Main"), root.to_path_buf()]),
            (root.join("annotations"), root.join("images"), vec![root.to_path_buf()]),
        ];
        layouts
            .into_iter()
            .find(|(annotations, _, _)| holds_xml(annotations))
            .map(|(annotations, images, lists)| Self { annotations, images, lists })
    }

    /// What `auto` looked for, for the error when nothing is found.
    pub(super) const LOOKED_FOR: &'static str = "Annotations/*.xml or annotations/*.xml (Pascal VOC)";
}

/// One object of an XML file.
struct VocObject {
    name: String,
    difficult: bool,
    /// VOC's `[xmin, ymin, xmax, ymax]`.
    bndbox: [f64; 4],
    /// Where the `<object>` element starts, for errors.
    line: u32,
}

/// One XML file.
struct VocFile {
    path: PathBuf,
    filename: Option<String>,
    size: Option<(u32, u32)>,
    objects: Vec<VocObject>,
}

/// Reads split `split` (`train`, `val`, or a list file relative to the
/// root) of the VOC dataset at `root`.
pub(super) fn read_split(
    root: &Path,
    layout: &VocLayout,
    split: &str,
    cfg: &DataConfig,
) -> Result<(CocoJson, SplitFiles)> {
    let all = xml_files(&layout.annotations);
    let (listed, list_file) = split_members(root, layout, split, &all)?;
    // Class names come from every file, so that all splits agree.
    let parsed: Vec<VocFile> = all.par_iter().map(|path| parse_file(path)).collect::<Result<_>>()?;
    let names = match cfg.classes.is_empty() {
        true => parsed
            .iter()
            .flat_map(|f| f.objects.iter().map(|o| o.name.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        false => cfg.classes.clone(),
    };
    let mut builder = CocoBuilder::new(&names);
    for file in parsed.iter().filter(|f| listed.contains(&stem(&f.path))) {
        add_file(&mut builder, file, &names, &layout.images, cfg.voc_difficult)?;
    }
    let annotations = list_file.unwrap_or_else(|| layout.annotations.clone());
    Ok((builder.finish(), SplitFiles { annotations, images: layout.images.clone() }))
}

/// The ids of a split, and the list file they came from (none: every file).
fn split_members(
    root: &Path,
    layout: &VocLayout,
    split: &str,
    all: &[PathBuf],
) -> Result<(BTreeSet<String>, Option<PathBuf>)> {
    let candidates = layout.lists.iter().map(|dir| dir.join(format!("{split}.txt"))).chain([root.join(split)]);
    let Some(list) = candidates.into_iter().find(|f| f.is_file()) else {
        return Ok((all.iter().map(|p| stem(p)).collect(), None));
    };
    let text = std::fs::read_to_string(&list).with_context(|| format!("cannot read {}", list.display()))?;
    let ids: BTreeSet<String> = text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    let known: BTreeSet<String> = all.iter().map(|p| stem(p)).collect();
    if let Some(missing) = ids.iter().find(|id| !known.contains(*id)) {
        bail!("{}: {missing} has no {}/{missing}.xml", list.display(), layout.annotations.display());
    }
    Ok((ids, Some(list)))
}

/// Adds one file's image and boxes; errors name the file and the line.
fn add_file(
    builder: &mut CocoBuilder,
    file: &VocFile,
    names: &[String],
    images: &Path,
    difficult: VocDifficult,
) -> Result<()> {
    let at = |line: u32| format!("{}: line {line}", file.path.display());
    let file_name = file.filename.clone().unwrap_or_else(|| format!("{}.jpg", stem(&file.path)));
    let (width, height) = match file.size {
        Some(size) => size,
        None => image_size(&images.join(&file_name)).with_context(|| format!("{}: no <size>", file.path.display()))?,
    };
    let image_id = builder.add_image(file_name, width, height);
    for object in &file.objects {
        let class = (names.iter().position(|n| *n == object.name))
            .with_context(|| format!("{}: <object> class {:?} is not in data.classes", at(object.line), object.name))?;
        let crowd = match (object.difficult, difficult) {
            (true, VocDifficult::Drop) => continue,
            (true, VocDifficult::Ignore) => true,
            _ => false,
        };
        let [xmin, ymin, xmax, ymax] = object.bndbox;
        let corners = [xmin - 1.0, ymin - 1.0, xmax, ymax];
        check_corners(corners).with_context(|| format!("{}: <object> {:?} <bndbox>", at(object.line), object.name))?;
        builder.add_box(image_id, class, corners, crowd);
    }
    Ok(())
}

fn parse_file(path: &Path) -> Result<VocFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let doc = Document::parse(&text).with_context(|| format!("{}: not valid XML", path.display()))?;
    let line = |node: Node| doc.text_pos_at(node.range().start).row;
    let root = doc.root_element();
    let in_file = |node: Node, what: String| anyhow!("{}: line {}: {what}", path.display(), line(node));
    let size = match child(root, "size") {
        None => None,
        Some(size) => {
            let width = number(size, "width").map_err(|e| in_file(size, e))? as u32;
            let height = number(size, "height").map_err(|e| in_file(size, e))? as u32;
            (width > 0 && height > 0).then_some((width, height))
        }
    };
    let mut objects = Vec::new();
    for object in root.children().filter(|n| n.has_tag_name("object")) {
        let name = child_text(object, "name").ok_or_else(|| in_file(object, "<object> without <name>".into()))?;
        let difficult = child_text(object, "difficult").is_some_and(|d| d.trim() == "1");
        let bndbox =
            child(object, "bndbox").ok_or_else(|| in_file(object, format!("<object> {name:?} without <bndbox>")))?;
        let mut corners = [0.0; 4];
        for (value, tag) in corners.iter_mut().zip(["xmin", "ymin", "xmax", "ymax"]) {
            *value = number(bndbox, tag).map_err(|e| in_file(bndbox, format!("<object> {name:?} <bndbox>: {e}")))?;
        }
        objects.push(VocObject { name: name.trim().to_string(), difficult, bndbox: corners, line: line(object) });
    }
    let filename = child_text(root, "filename").map(|f| f.trim().to_string()).filter(|f| !f.is_empty());
    Ok(VocFile { path: path.to_path_buf(), filename, size, objects })
}

fn child<'a, 'input>(node: Node<'a, 'input>, tag: &str) -> Option<Node<'a, 'input>> {
    node.children().find(|n| n.has_tag_name(tag))
}

fn child_text<'a>(node: Node<'a, '_>, tag: &str) -> Option<&'a str> {
    child(node, tag).and_then(|n| n.text())
}

/// The number in `<tag>` under `node` (exporters write integers or floats).
fn number(node: Node, tag: &str) -> std::result::Result<f64, String> {
    let text = child_text(node, tag).ok_or_else(|| format!("<{tag}> missing"))?;
    text.trim().parse().map_err(|_| format!("<{tag}> {:?} is not a number", text.trim()))
}

fn is_xml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("xml"))
}

/// True when `dir` is a folder with an `.xml` file in it (stops at the first).
fn holds_xml(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut entries| entries.any(|e| e.is_ok_and(|e| is_xml(&e.path()))))
}

/// The `.xml` files directly in `dir`, sorted (none when it is not a folder).
fn xml_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_xml(p)).collect();
    files.sort();
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}
