//! Weight files named `hf:<owner>/<repo>[/<file>]` (Hugging Face Hub, via
//! hf-hub into its cache; `$HF_HOME` moves the cache) or by a local path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;

/// The file taken from a Hub repository when the spec names none.
pub(super) const DEFAULT_FILE: &str = "model.safetensors";

/// A local path for `spec`, downloading a Hub file on first use (later uses
/// are served from the cache without the network). `cache_dir` overrides
/// the hf-hub cache folder.
pub(super) fn resolve_weights(spec: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let Some(hub) = spec.strip_prefix("hf:") else {
        let path = PathBuf::from(spec);
        if !path.is_file() {
            bail!("weights {spec}: no such file");
        }
        return Ok(path);
    };
    let parts: Vec<&str> = hub.splitn(3, '/').collect();
    let (repo, file) = match parts.as_slice() {
        [owner, name] if !owner.is_empty() && !name.is_empty() => (format!("{owner}/{name}"), DEFAULT_FILE),
        [owner, name, file] if !owner.is_empty() && !name.is_empty() && !file.is_empty() => {
            (format!("{owner}/{name}"), *file)
        }
        _ => bail!("weights {spec}: expected hf:<owner>/<repo>[/<file>]"),
    };
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Some(dir) = cache_dir {
        builder = builder.with_cache_dir(dir.to_path_buf());
    }
    let api = builder.build().with_context(|| format!("weights {spec}: cannot start the Hub client"))?;
    api.model(repo.clone()).get(file).with_context(|| format!("weights {spec}: cannot fetch {file} from {repo}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hf-hub's cache layout: `models--owner--name/refs/main` holds the
    /// revision, the file lives under `snapshots/<revision>/`.
    fn fake_cache(file: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("retinanet-hub-{}-{file}", std::process::id()));
        let repo = root.join("models--timm--resnet18.tv_in1k");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo.join("snapshots/abc123").join(file), b"weights").unwrap();
        root
    }

    #[test]
    fn hub_files_resolve_from_the_cache_without_network() {
        let cache = fake_cache(DEFAULT_FILE);
        let path = resolve_weights("hf:timm/resnet18.tv_in1k", Some(&cache)).unwrap();
        assert!(path.ends_with("snapshots/abc123/model.safetensors"), "{}", path.display());
        assert_eq!(std::fs::read(path).unwrap(), b"weights");
        let cache = fake_cache("other.safetensors");
        let path = resolve_weights("hf:timm/resnet18.tv_in1k/other.safetensors", Some(&cache)).unwrap();
        assert!(path.ends_with("other.safetensors"));
    }

    #[test]
    fn bad_specs_are_named() {
        for spec in ["hf:", "hf:owner", "hf:/x", "/no/such/file.safetensors"] {
            let err = resolve_weights(spec, None).unwrap_err().to_string();
            assert!(err.contains(spec), "{spec}: {err}");
        }
    }
}
