//! Weight files named `hf:<owner>/<repo>[@<revision>][/<file>]` (Hugging
//! Face Hub, via hf-hub into its cache: `$HF_HOME/hub`, or
//! `~/.cache/huggingface/hub`; `$HF_ENDPOINT` names another server) or by
//! a local path. A file in the cache is used without the network;
//! `HF_HUB_OFFLINE=1` forbids the network.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// The file taken from a Hub repository when the spec names none.
pub(super) const DEFAULT_FILE: &str = "model.safetensors";
/// The revision taken when the spec pins none.
const DEFAULT_REVISION: &str = "main";

/// `<owner>/<repo>[@<revision>][/<file>]`, parsed.
#[derive(Debug, PartialEq)]
struct HubFile {
    repo: String,
    revision: String,
    file: String,
}

fn parse_hub_spec(spec: &str, hub: &str) -> Result<HubFile> {
    let bad = || anyhow!("weights {spec}: expected hf:<owner>/<repo>[@<revision>][/<file>]");
    let (owner, rest) = hub.split_once('/').ok_or_else(bad)?;
    let (name_rev, file) = rest.split_once('/').unwrap_or((rest, DEFAULT_FILE));
    let (name, revision) = name_rev.split_once('@').unwrap_or((name_rev, DEFAULT_REVISION));
    if [owner, name, revision, file].iter().any(|part| part.is_empty()) {
        return Err(bad());
    }
    Ok(HubFile { repo: format!("{owner}/{name}"), revision: revision.into(), file: file.into() })
}

/// True when `HF_HUB_OFFLINE` asks for the cache only.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false" | "False"))
}

/// A local path for `spec`, downloading a Hub file on first use (later uses
/// are served from the cache without the network). `cache_dir` overrides
/// the hf-hub cache folder.
pub(super) fn resolve_weights(spec: &str, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let Some(hub) = spec.strip_prefix("hf:") else {
        let path = PathBuf::from(spec);
        if !path.is_file() {
            bail!("weights {spec}: no such file (expected a weights file or hf:<owner>/<repo>[@<revision>][/<file>])");
        }
        return Ok(path);
    };
    let HubFile { repo, revision, file } = parse_hub_spec(spec, hub)?;
    let cache = cache_dir.map_or_else(Cache::from_env, |dir| Cache::new(dir.to_path_buf()));
    let handle = Repo::with_revision(repo.clone(), RepoType::Model, revision.clone());
    if let Some(path) = cache.repo(handle.clone()).get(&file) {
        return Ok(path);
    }
    let place = format!("{file} of {repo} at {revision}");
    let cache_hint = format!("the Hub cache {}", cache.path().display());
    if offline() {
        bail!("weights {spec}: HF_HUB_OFFLINE is set and {place} is not in {cache_hint}");
    }
    let api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into()))
        .with_progress(true)
        .build()
        .with_context(|| format!("weights {spec}: cannot start the Hub client"))?;
    api.repo(handle).download(&file).map_err(|err| {
        anyhow!(
            "weights {spec}: cannot download {place} ({err}); without the network, put the file into \
             {cache_hint} (set HF_HOME to a folder that has it) or pass a local file"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hf-hub's cache layout: `models--owner--name/refs/main` holds the
    /// revision, the file lives under `snapshots/<revision>/`. Removed when
    /// the returned folder is dropped.
    fn fake_cache(file: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--timm--resnet18.tv_in1k");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo.join("snapshots/abc123").join(file), b"weights").unwrap();
        root
    }

    #[test]
    fn hub_files_resolve_from_the_cache_without_network() {
        let cache = fake_cache(DEFAULT_FILE);
        let path = resolve_weights("hf:timm/resnet18.tv_in1k", Some(cache.path())).unwrap();
        assert!(path.ends_with("snapshots/abc123/model.safetensors"), "{}", path.display());
        assert_eq!(std::fs::read(path).unwrap(), b"weights");
        let cache = fake_cache("other.safetensors");
        let path = resolve_weights("hf:timm/resnet18.tv_in1k/other.safetensors", Some(cache.path())).unwrap();
        assert!(path.ends_with("other.safetensors"));
    }

    #[test]
    fn specs_name_a_repository_a_revision_and_a_file() {
        let parse = |hub: &str| parse_hub_spec(hub, hub).unwrap();
        let file = |repo: &str, revision: &str, file: &str| HubFile {
            repo: repo.into(),
            revision: revision.into(),
            file: file.into(),
        };
        assert_eq!(parse("timm/r50"), file("timm/r50", "main", DEFAULT_FILE));
        assert_eq!(parse("timm/r50@v1.0/w.pth"), file("timm/r50", "v1.0", "w.pth"));
        assert_eq!(parse("timm/r50/sub/w.safetensors"), file("timm/r50", "main", "sub/w.safetensors"));
    }

    #[test]
    fn bad_specs_are_named() {
        for spec in ["hf:", "hf:owner", "hf:/x", "hf:owner/x@", "hf:owner/x/", "/no/such/file.safetensors"] {
            let err = resolve_weights(spec, None).unwrap_err().to_string();
            assert!(err.contains(spec), "{spec}: {err}");
        }
    }
}
