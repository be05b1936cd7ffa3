//! The library's layers (docs/ARCHITECTURE.md), checked on the source: every
//! module imports only the modules below it, and no two files import each
//! other, directly or around a circle. The test reads the `use` lines and
//! paths of `src/` as text (the unit tests at the end of a file are left
//! out), so it fails on the commit that adds a wrong import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each library module and the modules it may import, bottom layer first.
/// The binary (`main.rs`, `cli.rs`, `runtime.rs`, `commands/`) may use
/// them all; none of them may use the binary.
const LAYERS: &[(&str, &[&str])] = &[
    ("ops", &[]),
    ("viz", &[]),
    ("config", &[]),
    ("model", &["config", "ops"]),
    ("data", &["config", "ops"]),
    ("run", &["config"]),
    ("eval", &["data", "viz"]),
    ("infer", &["config", "data", "eval", "model", "run", "viz"]),
    ("inspect", &["config", "data", "eval", "model", "ops", "viz"]),
    ("train", &["config", "data", "eval", "infer", "model", "ops", "run", "viz"]),
];

type ModulePath = Vec<String>;

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The file of a module path (`[model, anchors]` -> src/model/anchors.rs),
/// if there is one.
fn module_file(path: &[String]) -> Option<PathBuf> {
    let joined: PathBuf = path.iter().collect();
    [src().join(&joined).with_extension("rs"), src().join(&joined).join("mod.rs")].into_iter().find(|f| f.is_file())
}

/// The module path of a library file (`src/model/mod.rs` -> `[model]`).
fn module_of(file: &Path) -> ModulePath {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let mut path: ModulePath = relative.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The paths `a::b::c` on a line of code, as lists of segments.
fn paths_on(line: &str) -> Vec<Vec<&str>> {
    let mut paths = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("::") {
        let start = rest[..at].rfind(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).map_or(0, |i| i + 1);
        let end =
            rest[at..].find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).map_or(rest.len(), |i| at + i);
        let segments: Vec<&str> = rest[start..end].split("::").filter(|s| !s.is_empty()).collect();
        paths.push(segments);
        rest = &rest[end..];
    }
    paths
}

/// The module file a path on a line of module `here` names, if any: the
/// longest prefix of the path that is a module of this crate.
fn resolve(here: &[String], segments: &[&str]) -> Option<PathBuf> {
    let (mut base, rest): (ModulePath, &[&str]) = match *segments.first()? {
        "crate" => (Vec::new(), &segments[1..]),
        "super" => (here[..here.len().saturating_sub(1)].to_vec(), &segments[1..]),
        "self" => (here.to_vec(), &segments[1..]),
        _ => (here.to_vec(), segments), // a child module, or not ours
    };
    let mut found = None;
    for segment in rest {
        base.push(segment.to_string());
        match module_file(&base) {
            Some(file) => found = Some(file),
            None => break,
        }
    }
    found
}

/// Every library file with the files it imports; re-export lines (`pub
/// use`) of a module's face count for the layers but not as a file's
/// dependency.
fn imports() -> BTreeMap<PathBuf, Vec<(PathBuf, bool)>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let binary = ["main.rs", "cli.rs", "runtime.rs", "lib.rs"].map(|f| src().join(f));
    let mut graph = BTreeMap::new();
    for file in files.into_iter().filter(|f| !binary.contains(f) && !f.starts_with(src().join("commands"))) {
        let mut here = module_of(&file);
        let mut edges = Vec::new();
        for line in std::fs::read_to_string(&file).unwrap().lines().map(str::trim) {
            if line.starts_with("#[cfg(test)]") {
                break;
            }
            if line.starts_with("//") {
                continue;
            }
            if let Some(name) = line.strip_prefix("mod ").and_then(|l| l.strip_suffix(" {")) {
                here.push(name.to_string()); // an inline module: paths are relative to it
            }
            let re_export = line.starts_with("pub use") || line.starts_with("pub(crate) use");
            for segments in paths_on(line) {
                if let Some(target) = resolve(&here, &segments).filter(|t| *t != file) {
                    edges.push((target, re_export));
                }
            }
        }
        graph.insert(file, edges);
    }
    graph
}

/// `src/...` as a person reads it.
fn shown(file: &Path) -> String {
    file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(file).display().to_string()
}

fn top_module(file: &Path) -> String {
    module_of(file)[0].clone()
}

#[test]
fn every_module_imports_only_the_layers_below() {
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    for (i, (module, below)) in LAYERS.iter().enumerate() {
        let earlier: Vec<&str> = LAYERS[..i].iter().map(|(m, _)| *m).collect();
        assert!(below.iter().all(|b| earlier.contains(b)), "{module} may only import layers listed before it");
    }
    let mut wrong = BTreeSet::new();
    for (file, edges) in imports() {
        let from = top_module(&file);
        let Some(may) = allowed.get(from.as_str()) else {
            panic!("{}: module {from} is not in LAYERS", shown(&file));
        };
        for (target, _) in edges {
            let to = top_module(&target);
            if to != from && !may.contains(&to.as_str()) {
                wrong.insert(format!("{} imports {}", shown(&file), shown(&target)));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that do not point down the layers:\n{}", Vec::from_iter(wrong).join("\n"));
}

#[test]
fn no_two_files_import_each_other() {
    let graph: BTreeMap<PathBuf, Vec<PathBuf>> = imports()
        .into_iter()
        .map(|(file, edges)| (file, edges.into_iter().filter(|(_, re_export)| !re_export).map(|(t, _)| t).collect()))
        .collect();
    // Depth-first search; a file met again while on the stack closes a circle.
    fn visit(
        file: &PathBuf,
        graph: &BTreeMap<PathBuf, Vec<PathBuf>>,
        stack: &mut Vec<PathBuf>,
        done: &mut BTreeSet<PathBuf>,
    ) {
        if let Some(at) = stack.iter().position(|f| f == file) {
            let circle: Vec<String> = stack[at..].iter().chain([file]).map(|f| shown(f)).collect();
            panic!("an import circle: {}", circle.join(" -> "));
        }
        if !done.insert(file.clone()) {
            return;
        }
        stack.push(file.clone());
        for next in graph.get(file).into_iter().flatten() {
            visit(next, graph, stack, done);
        }
        stack.pop();
    }
    let mut done = BTreeSet::new();
    for file in graph.keys() {
        visit(file, &graph, &mut Vec::new(), &mut done);
    }
}
