//! The storage seam: what the store's logic (lifecycle, lockout, retention,
//! rotation, audit) needs from a backend, the record formats and the key
//! layout. Two backends implement [`Backend`]: [`sled`] (embedded, one
//! process) and, with the `postgres` feature, `postgres` (shared by many
//! replicas). The seam is a small ordered key-value interface over four
//! tables, in the spirit of redb's `StorageBackend`: get, range scan,
//! ordered or atomic writes, a durability point, and a bucket lock that
//! holds across every process sharing the data.
//!
//! Table `records`:
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
//! Table `keys`: `b'K' | bucket (u32 BE)` → the bucket's key table
//! ([`DekTable`]): every subject's DEK in the bucket, wrapped under the
//! bucket's KEK; a tree of its own, so that rewriting a table does not churn
//! the leaves that hold records.
//! Table `meta`: `store-id` → the 16-byte store id, paired with the keyring's;
//! `mark` → the data's high-water mark (u64 BE) and its MAC (see
//! `Store::open`).
//! Table `audit`: the audit log (see `crate::audit`).
//!
//! `Writes` spans both `records` and `keys`; each backend keeps the write
//! order across them (sled has one log for all trees; PostgreSQL commits
//! in order).

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod record;
pub(crate) mod sled;

use crate::crypto::pseudonym::Pseudonym;
use crate::error::{Error, Result};

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

/// One of the store's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Table {
    /// Subject records, the retention index, pending-shred markers, the decoy.
    Records,
    /// Bucket key tables.
    Keys,
    /// Store id and the data's high-water mark.
    Meta,
    /// The audit log's segments.
    Audit,
}

impl Table {
    pub(crate) const ALL: [Table; 4] = [Table::Records, Table::Keys, Table::Meta, Table::Audit];

    /// The table's name (sled tree name; suffix of the PostgreSQL table).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Records => "records",
            Table::Keys => "keys",
            Table::Meta => "meta",
            Table::Audit => "audit",
        }
    }

    /// The table of a name (the raw-access test hooks).
    #[cfg(feature = "failpoints")]
    pub(crate) fn named(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A key and its value.
pub(crate) type Row = (Vec<u8>, Vec<u8>);

/// A value read from a backend: sled's own buffer (no copy on the verify
/// path) or bytes received from the database.
pub(crate) enum Value {
    Sled(::sled::IVec),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Value::Sled(v) => v,
            Value::Owned(v) => v,
        }
    }
}

/// A scan's visitor: gets each key and value in key order, returns whether
/// to go on.
pub(crate) type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool> + 'a;

/// A held cross-process lock; released on drop.
pub(crate) type RemoteLock = Box<dyn Send>;

/// What the store needs of a storage backend. Every method is one unit of
/// work against the backend (one round trip in shared mode); none sees a
/// key or a plaintext.
pub(crate) trait Backend: Send + Sync {
    /// The value under `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Value>>;
    /// The values under several keys, in one unit of work (one round trip
    /// in shared mode).
    fn get_many(&self, keys: &[(Table, &[u8])]) -> Result<Vec<Option<Value>>> {
        keys.iter().map(|(t, k)| self.get(*t, k)).collect()
    }
    /// Visit every entry with `from <= key < to` (`to = None`: to the end)
    /// in key order, until `visit` returns false.
    fn scan(
        &self,
        table: Table,
        from: &[u8],
        to: Option<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> Result<()>;
    /// The entry with the greatest key `<= at` (`None`: the greatest of all).
    fn last(&self, table: Table, at: Option<&[u8]>) -> Result<Option<Row>>;
    /// Apply `writes` in the order queued: after a crash the backend holds
    /// a prefix of them. With `atomic`, all of them or none.
    fn apply(&self, writes: Writes, atomic: bool) -> Result<()>;
    /// A durability point: everything applied so far survives a crash or a
    /// power cut once this returns.
    fn flush(&self) -> Result<()>;
    /// Take the locks of `buckets` (ascending) across every process sharing
    /// the data, in one step (`None` for a backend one process owns: the
    /// store's own mutexes are the locks). Held from the first read to the
    /// last write of an operation on those buckets.
    ///
    /// `prefetch`: byte ranges of the keyring to read in the same round
    /// trip (shared mode: the buckets' KEK slots, which the keyring then
    /// re-reads under the lock; embedded mode ignores it).
    fn lock_buckets(
        &self,
        buckets: &[u32],
        prefetch: &[(u64, usize)],
    ) -> Result<Option<RemoteLock>>;
    /// The writes since the last `flush` need not reach the disk before
    /// the locks are released (group commit: the next `flush` makes them
    /// durable). Shared mode commits them without waiting for the WAL
    /// flush; embedded mode has nothing to do.
    fn relax(&self) {}
    /// Take the audit log's append lock across processes (`None`: one
    /// process owns the data).
    fn lock_audit(&self) -> Result<Option<RemoteLock>>;
    /// Exclude every keyring write of other processes (an epoch roll):
    /// `None` where one process owns the store.
    fn lock_epoch(&self) -> Result<Option<RemoteLock>> {
        Ok(None)
    }
    /// Raise the data's high-water mark to `value` (its first 8 bytes, the
    /// mark big-endian, decide): never lowers it, even when replicas race.
    fn raise_mark(&self, value: &[u8]) -> Result<()>;
    /// Whether other processes may use the same data at the same time
    /// (cached keys must then be refreshed under the bucket lock).
    fn shared(&self) -> bool;
    /// Where the data lives, for messages (never a password).
    fn describe(&self) -> String;
    /// The store is closing: last housekeeping (file modes).
    fn close(&self) {}
}

/// First key after every key that starts with `prefix` (`None`: none).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Visit every entry whose key starts with `prefix`.
pub(crate) fn scan_prefix(
    db: &dyn Backend,
    table: Table,
    prefix: &[u8],
    visit: &mut Visit<'_>,
) -> Result<()> {
    let end = prefix_end(prefix);
    db.scan(table, prefix, end.as_deref(), visit)
}

/// Every key that starts with `prefix`.
pub(crate) fn keys_with_prefix(
    db: &dyn Backend,
    table: Table,
    prefix: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    scan_prefix(db, table, prefix, &mut |k, _| {
        out.push(k.to_vec());
        Ok(true)
    })?;
    Ok(out)
}

/// Writes to the `records` and `keys` tables, applied in the order queued
/// (see [`Backend::apply`]).
///
/// sled: not a `sled::Batch`: sled rolls its I/O buffer twice per batch (to
/// pin the batch's log position), so every batch costs two buffer writes on
/// sled's I/O threads; measured here, that made a bulk enrollment ~125 µs
/// per subject. Single inserts share the buffer. What a batch gave,
/// atomicity, is replaced by order: sled recovers a prefix of its log, so
/// each call site queues its writes so that every prefix is a state the
/// store handles (SECURITY.md §7 lists the orders).
#[derive(Default)]
pub(crate) struct Writes(pub(crate) Vec<(Table, Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    /// Queue an insert into the `records` table.
    pub(crate) fn insert(&mut self, k: impl AsRef<[u8]>, v: impl Into<Vec<u8>>) {
        self.0
            .push((Table::Records, k.as_ref().to_vec(), Some(v.into())));
    }

    /// Queue a removal from the `records` table.
    pub(crate) fn remove(&mut self, k: impl AsRef<[u8]>) {
        self.0.push((Table::Records, k.as_ref().to_vec(), None));
    }

    /// Queue a bucket's key table (table `keys`).
    pub(crate) fn put_table(&mut self, bucket: u32, table: Vec<u8>) {
        self.0
            .push((Table::Keys, key_table_key(bucket).to_vec(), Some(table)));
    }

    /// Queue a write to any table.
    pub(crate) fn put(&mut self, t: Table, k: impl AsRef<[u8]>, v: Option<Vec<u8>>) {
        self.0.push((t, k.as_ref().to_vec(), v));
    }

    /// Apply every queued write in one transaction: after a crash, all of
    /// them or none. Costs more than [`Writes::apply`] (sled pins its log
    /// for a transaction); used where no order makes every prefix valid (a
    /// record and the key table that holds its DEK).
    pub(crate) fn apply_atomic(self, db: &dyn Backend) -> Result<()> {
        db.apply(self, true)
    }

    /// Apply the queued writes in order.
    pub(crate) fn apply(self, db: &dyn Backend) -> Result<()> {
        db.apply(self, false)
    }
}

const STORE_ID_KEY: &[u8] = b"store-id";
/// The data's high-water mark: mark (u64 BE) | MAC (32).
const MARK_KEY: &[u8] = b"mark";

/// The store id recorded in the data, if any.
pub(crate) fn store_id(db: &dyn Backend) -> Result<Option<[u8; 16]>> {
    match db.get(Table::Meta, STORE_ID_KEY)? {
        None => Ok(None),
        Some(v) => <[u8; 16]>::try_from(&v[..])
            .map(Some)
            .map_err(|_| Error::tampered("store id record")),
    }
}

/// Record the store id (durable when this returns).
pub(crate) fn set_store_id(db: &dyn Backend, id: &[u8; 16]) -> Result<()> {
    let mut w = Writes::default();
    w.put(Table::Meta, STORE_ID_KEY, Some(id.to_vec()));
    w.apply(db)?;
    db.flush()
}

/// The data's high-water mark (0 for data that never had one), checked
/// against `mac` of the value.
pub(crate) fn mark(db: &dyn Backend, mac: impl Fn(u64) -> [u8; 32]) -> Result<u64> {
    match db.get(Table::Meta, MARK_KEY)? {
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

/// Raise the data's high-water mark (made durable by the next flush).
pub(crate) fn set_mark(db: &dyn Backend, mark: u64, mac: &[u8; 32]) -> Result<()> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(&mark.to_be_bytes());
    v.extend_from_slice(mac);
    db.raise_mark(&v)
}

/// The meta key of the high-water mark (for backends).
pub(crate) const fn mark_key() -> &'static [u8] {
    MARK_KEY
}

/// Buckets with a pending shred.
pub(crate) fn pending_buckets(db: &dyn Backend) -> Result<Vec<u32>> {
    keys_with_prefix(db, Table::Records, &[PENDING])?
        .iter()
        .map(|k| parse_pending_key(k).ok_or(Error::tampered("pending-shred marker")))
        .collect()
}
