//! The embedded backend: sled in a directory, owned by one process.
//!
//! Each [`Table`] is a sled tree of the same name. sled has one log for all
//! trees, so writes keep their order across tables; a durability point is
//! sled's `flush` followed by [`Syncer::sync`].

use super::{Backend, RemoteLock, Row, Table, Value, Visit, Writes};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Open sled at `path` without its background flusher. sled releases its
/// file lock only when its I/O threads drop their last reference, a moment
/// after the previous handle is dropped; so a lock conflict is retried for up
/// to a second before it is reported (a store really open elsewhere still
/// fails, just a second later).
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let mut tries = 0;
    loop {
        match sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(e))
                if tries < 50 && e.to_string().contains("could not acquire lock") =>
            {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return Ok(r?),
        }
    }
}

/// Makes what sled has written durable. sled 0.34's `flush` writes its
/// buffers and then calls `sync_file_range`, which flushes no device cache
/// and no metadata, and it never syncs the blob files it writes for large
/// values or the directory entries of new files. So every durability point
/// of bioseal is `flush` followed by [`Syncer::sync`]: `fdatasync` of sled's
/// log file, and `fsync` of every blob file not yet synced and of the blob
/// directory.
pub(crate) struct Syncer {
    log: std::fs::File,
    blobs: std::path::PathBuf,
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl Syncer {
    fn new(path: &Path) -> Result<Syncer> {
        let log = std::fs::File::open(path.join("db"))?;
        Ok(Syncer {
            log,
            blobs: path.join("blobs"),
            synced_blobs: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// `sled::Db::flush`, then `fdatasync` everything it wrote.
    pub(crate) fn flush(&self, db: &sled::Db) -> Result<()> {
        db.flush()?;
        self.sync()
    }

    /// `fdatasync` sled's log; `fsync` new blob files and their directory.
    pub(crate) fn sync(&self) -> Result<()> {
        self.log.sync_data()?;
        let mut seen = self.synced_blobs.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = false;
        let mut listed = std::collections::HashSet::new();
        if let Ok(dir) = std::fs::read_dir(&self.blobs) {
            for e in dir {
                let e = e?;
                listed.insert(e.file_name());
                if !seen.contains(&e.file_name()) && sync_blob(&e.path())? {
                    seen.insert(e.file_name());
                    new = true;
                }
            }
        }
        // Forget blobs sled has removed.
        seen.retain(|n| listed.contains(n));
        if new {
            std::fs::File::open(&self.blobs)?.sync_all()?;
        }
        Ok(())
    }
}

/// `fsync` a blob file (mode 0600 first). sled removes old blobs on its own
/// threads, so one listed a moment ago may be gone: nothing to sync then
/// (false).
fn sync_blob(path: &Path) -> Result<bool> {
    match std::fs::File::open(path) {
        Ok(f) => {
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            f.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Make `dir` and everything below it private: directories 0700, files
/// 0600, whatever the umask was when they were created (sled creates its
/// files with the process umask) or the mode an existing directory had.
pub(crate) fn restrict_tree(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        let r = if t.is_dir() {
            restrict_tree(&e.path())
        } else if t.is_file() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))
                .map_err(Error::from)
        } else {
            Ok(())
        };
        match r {
            // sled removes old blobs and snapshots on its own threads.
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
}

/// `fsync` every file below `dir` and every directory, `dir` included
/// (after creating a store: sled syncs none of the directory entries it
/// creates).
pub(crate) fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The sled database of a store.
pub(crate) struct SledBackend {
    dir: PathBuf,
    pub(crate) db: ::sled::Db,
    /// Durability: see [`Syncer`].
    pub(crate) syncer: std::sync::Arc<Syncer>,
    /// One tree per [`Table`], in [`Table::ALL`]'s order.
    trees: [::sled::Tree; 4],
}

impl SledBackend {
    /// Open sled in `dir/db` without sled's own background flusher (the
    /// store flushes; see `Durability`), make its files private and sync
    /// every directory entry sled created.
    pub(crate) fn open(dir: &Path, cache_bytes: u64) -> Result<SledBackend> {
        let path = dir.join("db");
        let db = open_sled(&path, cache_bytes)?;
        let trees = [
            db.open_tree(Table::ALL[0].name())?,
            db.open_tree(Table::ALL[1].name())?,
            db.open_tree(Table::ALL[2].name())?,
            db.open_tree(Table::ALL[3].name())?,
        ];
        db.flush()?;
        sync_tree(&path)?;
        std::fs::File::open(dir)?.sync_all()?;
        restrict_tree(dir)?;
        Ok(SledBackend {
            dir: dir.to_path_buf(),
            syncer: std::sync::Arc::new(Syncer::new(&path)?),
            db,
            trees,
        })
    }

    /// The sled tree of a table.
    pub(crate) fn tree(&self, t: Table) -> &::sled::Tree {
        &self.trees[t as usize]
    }
}

impl Backend for SledBackend {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Value>> {
        Ok(self.tree(table).get(key)?.map(Value::Sled))
    }

    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<()> {
        use std::ops::Bound;
        let end = to.map_or(Bound::Unbounded, Bound::Excluded);
        for kv in self
            .tree(table)
            .range::<&[u8], _>((Bound::Included(from), end))
        {
            let (k, v) = kv?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, table: Table, at: Option<&[u8]>) -> Result<Option<Row>> {
        let t = self.tree(table);
        let kv = match at {
            None => t.last()?,
            Some(at) => t.range::<&[u8], _>(..=at).next_back().transpose()?,
        };
        Ok(kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn apply(&self, writes: Writes, atomic: bool) -> Result<()> {
        if !atomic {
            for (t, k, v) in writes.0 {
                match v {
                    Some(v) => self.tree(t).insert(k, v)?,
                    None => self.tree(t).remove(k)?,
                };
            }
            return Ok(());
        }
        use ::sled::transaction::TransactionError;
        use ::sled::Transactional;
        let [a, b, c, d] = &self.trees;
        (a, b, c, d)
            .transaction(|(a, b, c, d)| {
                for (t, key, v) in &writes.0 {
                    let tree = [a, b, c, d][*t as usize];
                    match v {
                        Some(v) => tree.insert(key.as_slice(), v.as_slice())?,
                        None => tree.remove(key.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => Error::Storage(e.to_string()),
                TransactionError::Abort(()) => Error::tampered("sled transaction aborted"),
            })
    }

    fn flush(&self) -> Result<()> {
        self.syncer.flush(&self.db)
    }

    fn lock_buckets(
        &self,
        _buckets: &[u32],
        _prefetch: &[(u64, usize)],
    ) -> Result<Option<RemoteLock>> {
        Ok(None)
    }

    fn lock_audit(&self) -> Result<Option<RemoteLock>> {
        Ok(None)
    }

    fn raise_mark(&self, value: &[u8]) -> Result<()> {
        // One process owns the data and raises its mark under the store's
        // mutex: the new value is always the higher.
        self.tree(Table::Meta).insert(super::mark_key(), value)?;
        Ok(())
    }

    fn shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn close(&self) {
        // Files sled created while open (snapshots) get the private mode.
        let _ = restrict_tree(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob sled removed between the listing and the sync is skipped, not
    /// an error (a 1M-subject run failed with NotFound before); a present
    /// one is synced and made 0600.
    #[test]
    fn a_blob_removed_before_its_sync_is_skipped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("12345");
        assert!(!sync_blob(&gone).expect("missing is fine"));
        std::fs::write(&gone, b"blob").expect("write");
        std::fs::set_permissions(&gone, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(sync_blob(&gone).expect("sync"));
        let mode = std::fs::metadata(&gone).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
