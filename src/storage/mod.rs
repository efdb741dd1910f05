//! On-disk records and the sled trees that hold them.
//!
//! Tree `records`:
//! - `b'S' | bucket (u32 BE) | pseudonym (32)` → [`SubjectRecord`]: the
//!   subject's payload and state, each sealed under its DEK
//! - `b'D' | deadline day (u32 BE) | bucket | pseudonym` → empty: the
//!   retention index, so that a sweep visits only subjects due by that day
//! - `b'd' | bucket | pseudonym` → deadline day (u32 BE): where the subject's
//!   index entry is, so that it can be removed without decrypting anything
//! - `b'P' | bucket (u32 BE)` → empty: a revocation in that bucket awaits its shred
//! - `Zdecoy` → random bytes the size of a record, rewritten by every
//!   refused or unknown-subject verify so that it writes what a no-match
//!   writes (see `Store::verify`)
//!
//! Tree `keys`: `b'K' | bucket (u32 BE)` → the bucket's key table
//! ([`DekTable`]): every subject's DEK in the bucket, wrapped under the
//! bucket's KEK; a tree of its own, so that rewriting a table does not churn
//! the leaves that hold records.
//! Tree `meta`: `store-id` → the 16-byte store id, paired with the keyring's;
//! `mark` → the data's high-water mark (u64 BE) and its MAC (see
//! `Store::open`).
//! Tree `audit`: the audit log (see `crate::audit`).
//!
//! `Writes` spans both `records` and `keys`: sled has one log for all trees,
//! so the write order holds across them.

pub(crate) mod record;

use crate::crypto::pseudonym::Pseudonym;
use crate::error::{Error, Result};
use std::path::Path;

pub(crate) use record::{DekTable, SubjectPayload, SubjectRecord, SubjectState};

const SUBJECT: u8 = b'S';
/// The one key the decoy writes (random bytes the size of a record; see
/// `Store::verify`): no storage is ever created for an unknown subject.
pub(crate) const DECOY_KEY: &[u8] = b"Zdecoy";
const KEY_TABLE: u8 = b'K';
const DEADLINE: u8 = b'D';
const DEADLINE_PTR: u8 = b'd';
const PENDING: u8 = b'P';

fn bucket_pseudonym_key(tag: u8, bucket: u32, p: &Pseudonym) -> [u8; 37] {
    let mut k = [0u8; 37];
    k[0] = tag;
    k[1..5].copy_from_slice(&bucket.to_be_bytes());
    k[5..].copy_from_slice(&p.0);
    k
}

/// Key of a subject's pointer to its retention-index entry.
pub(crate) fn deadline_ptr_key(bucket: u32, p: &Pseudonym) -> [u8; 37] {
    bucket_pseudonym_key(DEADLINE_PTR, bucket, p)
}

/// Key of a retention-index entry.
pub(crate) fn deadline_key(day: u32, bucket: u32, p: &Pseudonym) -> [u8; 41] {
    let mut k = [0u8; 41];
    k[0] = DEADLINE;
    k[1..5].copy_from_slice(&day.to_be_bytes());
    k[5..9].copy_from_slice(&bucket.to_be_bytes());
    k[9..].copy_from_slice(&p.0);
    k
}

/// Split a retention-index key into day, bucket and pseudonym.
pub(crate) fn parse_deadline_key(k: &[u8]) -> Option<(u32, u32, Pseudonym)> {
    if k.len() != 41 || k[0] != DEADLINE {
        return None;
    }
    let (mut d, mut b, mut p) = ([0u8; 4], [0u8; 4], [0u8; 32]);
    d.copy_from_slice(&k[1..5]);
    b.copy_from_slice(&k[5..9]);
    p.copy_from_slice(&k[9..]);
    Some((u32::from_be_bytes(d), u32::from_be_bytes(b), Pseudonym(p)))
}

/// First key past every retention-index entry of days `..=day`.
pub(crate) fn deadline_scan_end(day: u32) -> Vec<u8> {
    let mut k = vec![DEADLINE];
    k.extend_from_slice(&day.saturating_add(1).to_be_bytes());
    k
}

/// Day number (days since the epoch) of a Unix time.
pub(crate) fn day_of(secs: u64) -> u32 {
    u32::try_from(secs / 86_400).unwrap_or(u32::MAX)
}

/// Key of a subject record.
pub(crate) fn subject_key(bucket: u32, p: &Pseudonym) -> [u8; 37] {
    bucket_pseudonym_key(SUBJECT, bucket, p)
}

/// Prefix of every subject key of a bucket.
pub(crate) fn subject_prefix(bucket: u32) -> [u8; 5] {
    let mut k = [SUBJECT, 0, 0, 0, 0];
    k[1..5].copy_from_slice(&bucket.to_be_bytes());
    k
}

/// Key of a bucket's key table.
pub(crate) fn key_table_key(bucket: u32) -> [u8; 5] {
    let mut k = [KEY_TABLE, 0, 0, 0, 0];
    k[1..5].copy_from_slice(&bucket.to_be_bytes());
    k
}

/// Key of a bucket's pending-shred marker.
pub(crate) fn pending_key(bucket: u32) -> [u8; 5] {
    let mut k = [PENDING, 0, 0, 0, 0];
    k[1..5].copy_from_slice(&bucket.to_be_bytes());
    k
}

/// Split a subject key into bucket and pseudonym.
pub(crate) fn parse_subject_key(k: &[u8]) -> Option<(u32, Pseudonym)> {
    if k.len() != 37 || k[0] != SUBJECT {
        return None;
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&k[1..5]);
    let mut p = [0u8; 32];
    p.copy_from_slice(&k[5..]);
    Some((u32::from_be_bytes(b), Pseudonym(p)))
}

/// Bucket of a pending-shred marker key.
pub(crate) fn parse_pending_key(k: &[u8]) -> Option<u32> {
    if k.len() != 5 || k[0] != PENDING {
        return None;
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&k[1..5]);
    Some(u32::from_be_bytes(b))
}

/// Writes to the `records` and `keys` trees, applied one by one in the order
/// queued.
///
/// Not a `sled::Batch`: sled rolls its I/O buffer twice per batch (to pin the
/// batch's log position), so every batch costs two buffer writes on sled's
/// I/O threads; measured here, that made a bulk enrollment ~125 µs per
/// subject. Single inserts share the buffer. What a batch gave, atomicity,
/// is replaced by order: sled recovers a prefix of its log, so each call site
/// queues its writes so that every prefix is a state the store handles
/// (SECURITY.md §7 lists the orders).
#[derive(Default)]
pub(crate) struct Writes(Vec<(bool, sled::IVec, Option<sled::IVec>)>);

impl Writes {
    /// Queue an insert into the `records` tree.
    pub(crate) fn insert(&mut self, k: impl Into<sled::IVec>, v: impl Into<sled::IVec>) {
        self.0.push((false, k.into(), Some(v.into())));
    }

    /// Queue a removal from the `records` tree.
    pub(crate) fn remove(&mut self, k: impl Into<sled::IVec>) {
        self.0.push((false, k.into(), None));
    }

    /// Queue a bucket's key table (tree `keys`).
    pub(crate) fn put_table(&mut self, bucket: u32, table: Vec<u8>) {
        self.0.push((
            true,
            key_table_key(bucket).to_vec().into(),
            Some(table.into()),
        ));
    }

    /// Apply every queued write in one sled transaction over both trees:
    /// after a crash, all of them or none. Costs more than [`Writes::apply`]
    /// (sled pins its log for a transaction); used where no order makes
    /// every prefix valid (a record and the key table that holds its DEK).
    pub(crate) fn apply_atomic(self, db: &Db) -> Result<()> {
        use sled::transaction::TransactionError;
        use sled::Transactional;
        (&db.records, &db.keys)
            .transaction(|(r, k)| {
                for (keys, key, v) in &self.0 {
                    let t = if *keys { k } else { r };
                    match v {
                        Some(v) => t.insert(key.clone(), v.clone())?,
                        None => t.remove(key.clone())?,
                    };
                }
                Ok(())
            })
            .map_err(|e: TransactionError<()>| match e {
                TransactionError::Storage(e) => Error::Storage(e),
                TransactionError::Abort(()) => Error::tampered("sled transaction aborted"),
            })
    }

    pub(crate) fn apply(self, db: &Db) -> Result<()> {
        for (keys, k, v) in self.0 {
            let tree = if keys { &db.keys } else { &db.records };
            match v {
                Some(v) => tree.insert(k, v)?,
                None => tree.remove(k)?,
            };
        }
        Ok(())
    }
}

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
pub(crate) struct Db {
    pub(crate) db: sled::Db,
    /// Durability: see [`Syncer`].
    pub(crate) syncer: std::sync::Arc<Syncer>,
    pub(crate) records: sled::Tree,
    pub(crate) meta: sled::Tree,
    pub(crate) audit: sled::Tree,
    /// Bucket key tables, apart from the records: a table is rewritten on
    /// every rotation and new subject, and sled rewrites whole leaves.
    pub(crate) keys: sled::Tree,
}

const STORE_ID_KEY: &[u8] = b"store-id";
/// The data's high-water mark: mark (u64 BE) | MAC (32).
const MARK_KEY: &[u8] = b"mark";

impl Db {
    /// Open sled at `path`, without sled's own background flusher: the
    /// store flushes (see `Durability`).
    pub(crate) fn open(path: &Path, cache_bytes: u64) -> Result<Db> {
        let db = open_sled(path, cache_bytes)?;
        let records = db.open_tree("records")?;
        let meta = db.open_tree("meta")?;
        let audit = db.open_tree("audit")?;
        let keys = db.open_tree("keys")?;
        db.flush()?;
        sync_tree(path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(Db {
            syncer: std::sync::Arc::new(Syncer::new(path)?),
            db,
            records,
            meta,
            audit,
            keys,
        })
    }

    /// The store id recorded in the database, if any.
    pub(crate) fn store_id(&self) -> Result<Option<[u8; 16]>> {
        match self.meta.get(STORE_ID_KEY)? {
            None => Ok(None),
            Some(v) if v.len() == 16 => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&v);
                Ok(Some(id))
            }
            Some(_) => Err(Error::tampered("store id record")),
        }
    }

    pub(crate) fn set_store_id(&self, id: &[u8; 16]) -> Result<()> {
        self.meta.insert(STORE_ID_KEY, id.as_slice())?;
        self.flush()
    }

    /// The data's high-water mark (0 for data that never had one), checked
    /// against `mac` of the value.
    pub(crate) fn mark(&self, mac: impl Fn(u64) -> [u8; 32]) -> Result<u64> {
        match self.meta.get(MARK_KEY)? {
            None => Ok(0),
            Some(v) if v.len() == 40 => {
                let mut m = [0u8; 8];
                m.copy_from_slice(&v[..8]);
                let m = u64::from_be_bytes(m);
                if bool::from(subtle::ConstantTimeEq::ct_eq(&mac(m)[..], &v[8..])) {
                    Ok(m)
                } else {
                    Err(Error::tampered("high-water mark"))
                }
            }
            Some(_) => Err(Error::tampered("high-water mark")),
        }
    }

    /// Write the data's high-water mark (made durable by the next flush).
    pub(crate) fn set_mark(&self, mark: u64, mac: &[u8; 32]) -> Result<()> {
        let mut v = Vec::with_capacity(40);
        v.extend_from_slice(&mark.to_be_bytes());
        v.extend_from_slice(mac);
        self.meta.insert(MARK_KEY, v)?;
        Ok(())
    }

    /// Make everything written so far durable (see [`Syncer`]).
    pub(crate) fn flush(&self) -> Result<()> {
        self.syncer.flush(&self.db)
    }

    /// Buckets with a pending shred.
    pub(crate) fn pending_buckets(&self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for kv in self.records.scan_prefix([PENDING]) {
            let (k, _) = kv?;
            out.push(parse_pending_key(&k).ok_or(Error::tampered("pending-shred marker"))?);
        }
        Ok(out)
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
