//! Where a keyring image lives: a file in the key directory (embedded
//! mode) or rows in the shared database (shared mode).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a keyring image lives: a file in the key directory (embedded
/// mode) or rows in the shared database (shared mode). Positioned writes
/// of whole 128-byte units, durable together: the layout above is the same
/// in both.
pub(crate) trait Medium: Send + Sync {
    /// The whole image.
    fn read_all(&self) -> Result<Vec<u8>>;
    /// `len` bytes at `off`.
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>>;
    /// Overwrite the bytes at each offset in place; durable when this
    /// returns (a file: written, then one `fdatasync`; the database: one
    /// statement).
    fn write(&self, writes: &[(u64, Vec<u8>)]) -> Result<()>;
    /// Exclusive access to the state copies across processes (`None`: one
    /// process owns the keyring).
    fn lock_state(&self) -> Result<Option<crate::storage::RemoteLock>>;
    /// Whether other processes change this keyring (cached keys and state
    /// must then be re-read under the locks).
    fn shared(&self) -> bool;
    /// Replace the whole image atomically (an epoch roll, a restore): a
    /// crash leaves the old image or the new one. Returns the medium that
    /// holds the new image.
    fn replace(&self, image: &[u8]) -> Result<Arc<dyn Medium>>;
}

/// The file that holds a new keyring image before it is renamed over the
/// keyring (an epoch roll or a restore in progress).
pub(crate) fn next_path(path: &Path) -> PathBuf {
    path.with_extension("next")
}

/// Write `image` to a new file beside `path` and rename it over `path`:
/// written and synced, renamed, the directory synced.
fn write_and_rename(path: &Path, tmp: &Path, image: &[u8], point: &str) -> Result<()> {
    let _ = std::fs::remove_file(tmp);
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(tmp)?;
    f.write_all(image)?;
    f.sync_all()?;
    drop(f);
    if let Some(parent) = tmp.parent() {
        File::open(parent)?.sync_all()?;
    }
    crate::failpoint::hit(&format!("{point}:next-synced"));
    std::fs::rename(tmp, path)?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    crate::failpoint::hit(&format!("{point}:renamed"));
    Ok(())
}

/// The keyring file: written whole and renamed into place at creation and
/// at each epoch roll (whose old image is sealed under a destroyed epoch),
/// otherwise only overwritten in place.
pub(crate) struct FileMedium {
    file: File,
    path: PathBuf,
}

impl FileMedium {
    /// Write a new keyring file at `path` (which must not exist).
    pub(crate) fn create(path: &Path, image: &[u8]) -> Result<FileMedium> {
        if path.exists() {
            return Err(Error::Config(format!(
                "{} already exists: a key directory holds the keyring of one store",
                path.display()
            )));
        }
        write_and_rename(path, &path.with_extension("tmp"), image, "keyring-create")?;
        FileMedium::open(path)
    }

    /// Open an existing keyring file.
    pub(crate) fn open(path: &Path) -> Result<FileMedium> {
        Ok(FileMedium {
            file: OpenOptions::new().read(true).write(true).open(path)?,
            path: path.to_path_buf(),
        })
    }
}

impl Medium for FileMedium {
    fn read_all(&self) -> Result<Vec<u8>> {
        // Positioned: the file's cursor is never used.
        let mut buf = vec![0u8; self.file.metadata()?.len() as usize];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, off)?;
        Ok(buf)
    }
    fn write(&self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        for (off, bytes) in writes {
            self.file.write_all_at(bytes, *off)?;
        }
        Ok(self.file.sync_data()?)
    }
    fn lock_state(&self) -> Result<Option<crate::storage::RemoteLock>> {
        Ok(None)
    }
    fn shared(&self) -> bool {
        false
    }
    fn replace(&self, image: &[u8]) -> Result<Arc<dyn Medium>> {
        write_and_rename(&self.path, &next_path(&self.path), image, "keyring")?;
        Ok(Arc::new(FileMedium::open(&self.path)?))
    }
}
