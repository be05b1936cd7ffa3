//! Resolving a config: the struct defaults, then the preset or file named
//! by `--config` (which may name its own `base`, detectron2-style), then
//! each `--set KEY=VALUE`. Unknown keys and mistyped values are rejected
//! with the key's full path, before serde sees the tree.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::presets::{assets_dir, DEFAULT_PRESET, PRESETS};
use super::schema::Config;

impl Config {
    /// Resolves `--config` (a preset name or a TOML path; None: the default
    /// preset) and applies each `--set KEY=VALUE`.
    pub fn resolve(config: Option<&str>, overrides: &[String]) -> Result<Self> {
        let name = config.unwrap_or(DEFAULT_PRESET);
        let mut tree = load_tree(name, 0)?;
        for item in overrides {
            apply_override(&mut tree, item)?;
        }
        if !tree.contains_key("name") {
            tree.insert("name".into(), toml::Value::String(config_source_name(name)));
        }
        let config = Self::from_tree(tree)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a resolved config as written beside a run (`config.toml`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_toml(&text).with_context(|| path.display().to_string())
    }

    /// [`Config::from_file`] on the file's text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let tree: toml::Table = toml::from_str(text).map_err(|e| anyhow!("{}", one_line(&e.to_string())))?;
        let config = Self::from_tree(tree)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks a merged TOML tree against the schema and deserialises it;
    /// errors name the key's full path.
    fn from_tree(tree: toml::Table) -> Result<Self> {
        let schema = toml::Value::try_from(Config::default()).expect("the default config serialises");
        check_against_schema(&tree, &schema, "")?;
        serde_path_to_error::deserialize(toml::Value::Table(tree))
            .map_err(|e| anyhow!("config key {}: {}", e.path(), one_line(&e.inner().to_string())))
    }

    /// The config as TOML, for `config.toml` beside every run and checkpoint.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }
}

/// The run name a config source gives: the preset name or the file stem.
fn config_source_name(source: &str) -> String {
    Path::new(source).file_stem().map_or_else(|| source.to_string(), |s| s.to_string_lossy().into_owned())
}

/// Inheritance deeper than this is taken to be a cycle.
const MAX_BASE_DEPTH: usize = 8;

/// Reads a preset or file into a TOML table, merging in its `base` chain.
fn load_tree(source: &str, depth: usize) -> Result<toml::Table> {
    if depth > MAX_BASE_DEPTH {
        bail!("config {source}: `base` chain is deeper than {MAX_BASE_DEPTH} (a cycle?)");
    }
    let (origin, text, folder) = match PRESETS.iter().find(|(name, _)| *name == source) {
        Some((name, text)) => (format!("preset {name}"), text.to_string(), assets_dir()),
        None => {
            let path = Path::new(source);
            if !path.exists() {
                let names: Vec<_> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!("config {source}: no such preset or file (presets: {})", names.join(", "));
            }
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {source}"))?;
            let folder = std::path::absolute(path.parent().unwrap_or(Path::new("")))
                .with_context(|| format!("config {source}: cannot find its folder"))?;
            (source.to_string(), text, folder)
        }
    };
    let mut tree: toml::Table = toml::from_str(&text).map_err(|e| anyhow!("{origin}: {}", one_line(&e.to_string())))?;
    anchor_data_root(&mut tree, &folder);
    let base = match tree.remove("base") {
        None => return Ok(tree),
        Some(toml::Value::String(base)) if base.is_empty() => return Ok(tree),
        Some(toml::Value::String(base)) => base,
        Some(other) => bail!("{origin}: config key base: expected a string, got {}", other.type_str()),
    };
    let mut merged = load_tree(&base, depth + 1).with_context(|| format!("{origin}: base {base}"))?;
    // A run is named after the file given, not after what it inherits.
    merged.remove("name");
    merge(&mut merged, tree);
    Ok(merged)
}

/// Makes a relative `data.root` of a config file absolute, relative to the
/// folder of the file that names it (a preset's, to the assets folder), so
/// a config works from any working directory and a run's saved config.toml
/// names its data wherever it is read. A `--set data.root=...` stays as
/// typed: relative to the working directory.
fn anchor_data_root(tree: &mut toml::Table, folder: &Path) {
    let Some(toml::Value::Table(data)) = tree.get_mut("data") else { return };
    let Some(toml::Value::String(root)) = data.get_mut("root") else { return };
    if !root.is_empty() && Path::new(root.as_str()).is_relative() {
        *root = folder.join(root.as_str()).to_string_lossy().into_owned();
    }
}

/// Deep-merges `over` into `into`; tables merge key by key, values replace.
fn merge(into: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Applies one `a.b.c=VALUE`; VALUE is TOML, or else a bare string.
fn apply_override(tree: &mut toml::Table, item: &str) -> Result<()> {
    let Some((key, raw)) = item.split_once('=') else {
        bail!("--set {item}: expected KEY=VALUE");
    };
    let key = key.trim();
    let value = parse_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|s| !s.is_empty()).ok_or_else(|| anyhow!("--set {item}: empty key"))?;
    let mut table = tree;
    for (i, part) in parts.iter().enumerate() {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {item}: config key {} is not a table", parts[..=i].join(".")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Rejects keys the schema lacks (listing the valid ones at that level) and
/// values whose TOML type differs from the default's.
fn check_against_schema(tree: &toml::Table, schema: &toml::Value, prefix: &str) -> Result<()> {
    let schema = schema.as_table().expect("schema level is a table");
    for (key, value) in tree {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let Some(expected) = schema.get(key) else {
            let mut valid: Vec<&str> = schema.keys().map(String::as_str).collect();
            valid.sort_unstable();
            let level = if prefix.is_empty() { "the top level".to_string() } else { prefix.to_string() };
            bail!("unknown config key {path}; valid keys at {level}: {}", valid.join(", "));
        };
        match (expected, value) {
            (toml::Value::Table(_), toml::Value::Table(t)) => check_against_schema(t, expected, &path)?,
            _ => check_type(&path, expected, value)?,
        }
    }
    Ok(())
}

fn check_type(path: &str, expected: &toml::Value, value: &toml::Value) -> Result<()> {
    use toml::Value as V;
    let ok = match (expected, value) {
        (V::Float(_), V::Integer(_)) => true, // 1 where 1.0 is expected
        (V::Array(e), V::Array(v)) => match e.first() {
            Some(first) => v.iter().all(|item| check_type(path, first, item).is_ok()),
            None => true,
        },
        (e, v) => std::mem::discriminant(e) == std::mem::discriminant(v),
    };
    if ok {
        return Ok(());
    }
    let expected_kind = match expected {
        V::Array(e) => format!("an array of {}", e.first().map_or("values", kind_name)),
        other => kind_name(other).to_string(),
    };
    bail!("config key {path}: expected {expected_kind}, got {} {value}", kind_name(value))
}

fn kind_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a datetime",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
