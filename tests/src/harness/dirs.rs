//! Temp directories that honour `DLOCK_KEEP_SERVER_DIRS`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A temp directory for one server or cluster, removed on drop unless
/// `DLOCK_KEEP_SERVER_DIRS=1` asks to keep it for a post-mortem.
#[derive(Debug)]
pub(crate) struct ServerDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl ServerDir {
    pub(crate) fn new(prefix: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dlock-{prefix}-"))
            .tempdir()
            .context("creating a temp directory for a test server")?;
        let path = dir.path().to_path_buf();
        Ok(ServerDir {
            dir: Some(dir),
            path,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (if needed) and returns a subdirectory.
    pub(crate) fn sub(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for ServerDir {
    fn drop(&mut self) {
        let keep = matches!(
            std::env::var("DLOCK_KEEP_SERVER_DIRS").as_deref(),
            Ok("1") | Ok("true") | Ok("yes")
        );
        if let Some(dir) = self.dir.take() {
            if keep {
                eprintln!("dlock harness: kept {}", self.path.display());
                // TempDir deletes in Drop; not running it keeps the directory on every
                // tempfile version the workspace allows.
                std::mem::forget(dir);
            }
        }
    }
}
