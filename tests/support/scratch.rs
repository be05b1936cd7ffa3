//! Scratch paths for the tests that write files: each in a fresh folder of
//! the system's temp directory that is removed, with everything in it, when
//! the `Scratch` is dropped (tempfile's `TempDir`), so a test run leaves
//! nothing behind. `#[path]`-included, as tiny_model.rs.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A path named `name` that does not exist yet, alone in its own temp
/// folder; derefs to the path.
pub(crate) struct Scratch {
    path: PathBuf,
    _folder: tempfile::TempDir,
}

impl Scratch {
    pub(crate) fn new(name: &str) -> Scratch {
        let folder = tempfile::Builder::new().prefix("retinanet-test-").tempdir().expect("a temp folder");
        Scratch { path: folder.path().join(name), _folder: folder }
    }

    /// The same path, created as an empty folder.
    #[allow(dead_code)] // not every test file that includes this creates one
    pub(crate) fn folder(name: &str) -> Scratch {
        let scratch = Scratch::new(name);
        std::fs::create_dir(&scratch.path).expect("a folder in a fresh temp folder");
        scratch
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for Scratch {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}
