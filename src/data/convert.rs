//! Writing datasets: any readable split in the COCO layout (`retinanet
//! convert`), into a folder that appears whole or not at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::source::LoadedSplit;

/// Fills the new folder `out` (absent or empty) through a temporary sibling
/// that is renamed into place, so a failure leaves nothing half-written.
pub fn create_folder_atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!("{}: folder exists and is not empty", out.display());
    }
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(err) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    let _ = std::fs::remove_dir(out); // an empty folder may stand in the way
    std::fs::rename(&tmp, out).with_context(|| format!("cannot create {}", out.display()))
}

/// Writes `splits` (name, split) in the COCO layout under `dir`:
/// `annotations/instances_<name>.json` as read (repairs are made again by
/// whoever reads it) and `images/<file_name>`, hard-linked where the file
/// system allows and copied elsewhere. Returns the number of images.
pub fn write_coco_layout(dir: &Path, splits: &[(&str, &LoadedSplit)]) -> Result<usize> {
    let annotations = dir.join("annotations");
    std::fs::create_dir_all(&annotations).with_context(|| format!("cannot create {}", annotations.display()))?;
    // Where each written image came from: two splits may share an image,
    // but two different files may not take one name.
    let mut sources: HashMap<PathBuf, PathBuf> = HashMap::new();
    for (name, split) in splits {
        for image in &split.coco.images {
            let from = split.files.images.join(&image.file_name);
            let to = dir.join("images").join(&image.file_name);
            match sources.get(&to) {
                Some(earlier) if *earlier == from => continue,
                Some(earlier) => bail!("{} and {} would both be {}", earlier.display(), from.display(), to.display()),
                None => {}
            }
            link_or_copy(&from, &to)?;
            sources.insert(to, from);
        }
        let path = annotations.join(format!("instances_{name}.json"));
        let text = serde_json::to_string(&split.coco).context("cannot serialise the annotations")?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(sources.len())
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}
