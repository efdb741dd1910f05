//! Backups that never resurrect: `Store::backup` copies the data and the
//! keyring (sealed under the current key epoch) at one consistent point;
//! `Store::restore` writes them into an empty location and replays the
//! revocation ledger, so that no subject destroyed since comes back.
//!
//! A backup is a directory of three files (mode 0600):
//!
//! ```text
//! data      every row of the four tables: table u8 | key length u32 | key |
//!           value length u32 | value (big-endian lengths)
//! keyring   the keyring image as it stood (sealed under epoch e's root key)
//! manifest  "BIOSEALB" | version u32 (1) | store id 16 | epoch u64 |
//!           high-water mark u64 | ledger length u64 | taken at u64 |
//!           rows u64 | SHA-256(data) | SHA-256(keyring) |
//!           HMAC-SHA-256(backup key of epoch e, everything before)
//! ```
//!
//! The backup key is derived from epoch e's root key: once the epoch is
//! rolled, the manifest can no longer even be checked, and the keyring in
//! it no longer opens.

use super::*;
use crate::crypto::keyring::restored_image;
use crate::crypto::medium::Medium;
use std::io::{BufWriter, Read, Write};

const MAGIC: &[u8; 8] = b"BIOSEALB";
const VERSION: u32 = 1;
const MANIFEST_BODY: usize = 8 + 4 + 16 + 8 * 5 + 32 + 32;
const MANIFEST_LEN: usize = MANIFEST_BODY + 32;
/// Rows written per batch when restoring.
const RESTORE_BATCH: usize = 4096;

/// What [`Store::backup`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupInfo {
    /// The key epoch the backup's keyring is sealed under: the backup can
    /// be restored while this is the store's current epoch.
    pub epoch: u64,
    /// The data's high-water mark at the snapshot.
    pub mark: u64,
    /// Rows copied (all tables).
    pub rows: u64,
    /// Bytes written (data and keyring).
    pub bytes: u64,
    /// When it was taken.
    pub taken_at: Timestamp,
}

/// What [`Store::restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    /// Rows written.
    pub rows: u64,
    /// Revocation-ledger entries replayed (subjects destroyed or whose
    /// consent changed after the backup was taken).
    pub replayed: u64,
}

struct Manifest {
    store_id: [u8; 16],
    epoch: u64,
    mark: u64,
    ledger_len: u64,
    taken_at: u64,
    rows: u64,
    data_hash: [u8; 32],
    keyring_hash: [u8; 32],
}

impl Manifest {
    fn body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(MANIFEST_BODY);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&self.store_id);
        for v in [
            self.epoch,
            self.mark,
            self.ledger_len,
            self.taken_at,
            self.rows,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&self.data_hash);
        b.extend_from_slice(&self.keyring_hash);
        b
    }

    /// Parse (not yet authenticated: the MAC is checked by the caller,
    /// with the backup key of the epoch the manifest names).
    fn parse(b: &[u8]) -> Result<(Manifest, [u8; 32])> {
        let bad = || Error::tampered("backup manifest");
        if b.len() != MANIFEST_LEN || &b[0..8] != MAGIC {
            return Err(bad());
        }
        if b[8..12] != VERSION.to_be_bytes() {
            return Err(bad());
        }
        let u = |i: usize| {
            let o = 28 + 8 * i;
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_be_bytes(a)
        };
        let arr = |o: usize| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&b[o..o + 32]);
            a
        };
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[12..28]);
        Ok((
            Manifest {
                store_id,
                epoch: u(0),
                mark: u(1),
                ledger_len: u(2),
                taken_at: u(3),
                rows: u(4),
                data_hash: arr(68),
                keyring_hash: arr(100),
            },
            arr(MANIFEST_BODY),
        ))
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    a
}

fn private_file(path: &Path) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    Ok(opts.open(path)?)
}

fn table_code(t: Table) -> u8 {
    match t {
        Table::Records => 1,
        Table::Keys => 2,
        Table::Meta => 3,
        Table::Audit => 4,
    }
}

fn table_of(c: u8) -> Option<Table> {
    Table::ALL.into_iter().find(|&t| table_code(t) == c)
}

impl Store {
    /// Write a backup of the store to the new directory `dest`: every row
    /// of the data and the keyring as it stands (sealed under the current
    /// key epoch), taken at one consistent point (every bucket locked while
    /// the rows are copied: operations wait, none fail), tagged with the
    /// epoch, the high-water mark and the revocation ledger's length.
    ///
    /// A backup can be restored ([`Store::restore`]) while its epoch is the
    /// store's current one; rolling the epoch makes it inert. It holds
    /// nothing readable without that epoch's root key.
    pub fn backup(&self, dest: impl AsRef<Path>) -> Result<BackupInfo> {
        let dest = dest.as_ref();
        if dest.exists() {
            return Err(Error::Config(format!(
                "{} exists: a backup is written to a new directory",
                dest.display()
            )));
        }
        create_private_dir(dest)?;
        let _roll = self.roll.lock().unwrap_or_else(|e| e.into_inner());
        let all: Vec<u32> = (0..self.keyring.header().buckets).collect();
        let guards = self.lock_many(&all)?;
        self.flush()?;
        let now = self.now();
        let (image, epoch) = self.keyring.snapshot()?;
        let state = self.keyring.state();
        let mut data = BufWriter::new(private_file(&dest.join("data"))?);
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let (mut rows, mut bytes) = (0u64, 0u64);
        for t in Table::ALL {
            let mut err = None;
            self.db.scan(t, &[], None, &mut |k, v| {
                let (Ok(kl), Ok(vl)) = (u32::try_from(k.len()), u32::try_from(v.len())) else {
                    err = Some(Error::tampered("row too long to back up"));
                    return Ok(false);
                };
                let mut frame = Vec::with_capacity(9 + k.len() + v.len());
                frame.push(table_code(t));
                frame.extend_from_slice(&kl.to_be_bytes());
                frame.extend_from_slice(k);
                frame.extend_from_slice(&vl.to_be_bytes());
                frame.extend_from_slice(v);
                hash.update(&frame);
                if let Err(e) = data.write_all(&frame) {
                    err = Some(e.into());
                    return Ok(false);
                }
                rows += 1;
                bytes += frame.len() as u64;
                Ok(true)
            })?;
            if let Some(e) = err {
                return Err(e);
            }
        }
        drop(guards);
        let data = data.into_inner().map_err(|e| Error::Io(e.into_error()))?;
        data.sync_all()?;
        let mut kf = private_file(&dest.join("keyring"))?;
        kf.write_all(&image)?;
        kf.sync_all()?;
        let mut data_hash = [0u8; 32];
        data_hash.copy_from_slice(hash.finish().as_ref());
        let m = Manifest {
            store_id: self.keyring.header().store_id,
            epoch,
            mark: state.mark,
            ledger_len: state.ledger_len,
            taken_at: now.unix_secs(),
            rows,
            data_hash,
            keyring_hash: sha256(&image),
        };
        let body = m.body();
        let mac = self.keyring.backup_mac(&[&body]);
        let mut mf = private_file(&dest.join("manifest"))?;
        mf.write_all(&body)?;
        mf.write_all(&mac)?;
        mf.sync_all()?;
        std::fs::File::open(dest)?.sync_all()?;
        self.log(
            now,
            AuditEntry::new(AuditEvent::BackupTaken)
                .count(rows)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        Ok(BackupInfo {
            epoch,
            mark: state.mark,
            rows,
            bytes: bytes + image.len() as u64,
            taken_at: now,
        })
    }

    /// Restore the backup in `from` into the empty location `config`
    /// names, and open it. The key directory (embedded) or the database
    /// (shared) must hold the store's live keyring: its revocation ledger
    /// lists every subject destroyed (or whose consent changed) since the
    /// backup, and the restore replays it — those subjects are removed
    /// and every bucket they were in is re-rotated, so none comes back and
    /// the old KEKs the backup carried exist nowhere in the restored store.
    /// Every other subject verifies as it did when the backup was taken.
    ///
    /// A backup of an epoch older than the store's current one fails with
    /// [`Error::EpochDestroyed`]; without the live keyring the restore is
    /// refused ([`Error::KeyUnavailable`]): there would be nothing to
    /// replay. A restore interrupted by a crash is finished by the next
    /// open, or that open fails with a typed error ([`Error::RolledBack`]:
    /// the data was not completely written; restore again into an empty
    /// location).
    pub fn restore(from: impl AsRef<Path>, config: StoreConfig) -> Result<(Store, RestoreReport)> {
        let from = from.as_ref();
        let manifest_bytes = std::fs::read(from.join("manifest"))?;
        let (m, mac) = Manifest::parse(&manifest_bytes)?;
        let (medium, guard, shared_db) = open_target(&config)?;
        let live = Keyring::load_from(medium.clone(), &*config.key)?;
        let (epoch, _) = live.epoch();
        if m.store_id != live.header().store_id {
            return Err(Error::StoreMismatch);
        }
        if m.epoch < epoch {
            return Err(Error::EpochDestroyed { epoch: m.epoch });
        }
        if m.epoch > epoch {
            return Err(Error::tampered(
                "backup manifest (epoch after the keyring's)",
            ));
        }
        let expected = live.backup_mac(&[&m.body()]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &mac[..])) {
            return Err(Error::tampered("backup manifest"));
        }
        let image = std::fs::read(from.join("keyring"))?;
        if sha256(&image) != m.keyring_hash {
            return Err(Error::tampered("backup keyring"));
        }
        // Every row checked against the manifest before anything is written.
        check_rows(from, &m)?;
        let root = config.key.epoch_key(m.epoch)?;
        let new_image = restored_image(&image, &root, &live, m.ledger_len)?;
        drop(root);
        let db = match shared_db {
            Some(db) => db,
            None => {
                create_private_dir(&config.dir)?;
                Arc::new(storage::sled::SledBackend::open(
                    &config.dir,
                    config.cache_bytes,
                )?)
            }
        };
        if Table::ALL
            .into_iter()
            .any(|t| db.last(t, None).map(|r| r.is_some()).unwrap_or(true))
        {
            return Err(Error::Config(
                "restore needs an empty location: the target holds data".into(),
            ));
        }
        let rows = copy_rows(from, &m, &*db)?;
        db.flush()?;
        failpoint::hit("restore:data-written");
        medium.replace(&new_image)?;
        drop((live, medium, guard));
        db.close();
        drop(db);
        let replayed = m.ledger_len;
        let store = Store::open(config)?;
        let total = store.keyring.state().ledger_len;
        Ok((
            store,
            RestoreReport {
                rows,
                replayed: total.saturating_sub(replayed),
            },
        ))
    }

    /// A restore's replay (on open, while the keyring says one is
    /// pending): remove every subject the revocation ledger lists from
    /// `from` on and rotate every bucket they were in, then clear the
    /// pending mark. Idempotent: a crash part-way repeats it.
    pub(super) fn replay_ledger(&self, from: u64) -> Result<()> {
        let entries = self.keyring.ledger()?;
        let buckets = self.keyring.header().buckets;
        let mut by_bucket: std::collections::BTreeMap<u32, Vec<Pseudonym>> = Default::default();
        for e in entries
            .iter()
            .skip(usize::try_from(from).unwrap_or(usize::MAX))
        {
            let p = Pseudonym(e.pseudonym);
            let v = by_bucket.entry(p.bucket(buckets)).or_default();
            if !v.contains(&p) {
                v.push(p);
            }
        }
        let work: Vec<(u32, Vec<Pseudonym>)> = by_bucket.into_iter().collect();
        for group in work.chunks(ROTATION_GROUP) {
            let bs: Vec<u32> = group.iter().map(|(b, _)| *b).collect();
            let guards = self.lock_many(&bs)?;
            self.rotate_many(
                group,
                &guards.iter().collect::<Vec<_>>(),
                false,
                None,
                false,
            )?;
            failpoint::hit("restore:replayed-group");
        }
        self.keyring.update_state(|st| st.replay_from = None)?;
        self.log(
            self.now(),
            AuditEntry::new(AuditEvent::Restored)
                .count(entries.len() as u64 - from.min(entries.len() as u64))
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()
    }
}

/// Check the backup's rows against the manifest (count and hash).
fn check_rows(from: &Path, m: &Manifest) -> Result<()> {
    read_rows(from, m, &mut |_, _, _| Ok(()))
}

/// Copy the backup's rows into `db`, checking them against the manifest.
fn copy_rows(from: &Path, m: &Manifest, db: &dyn Backend) -> Result<u64> {
    let mut w = Writes::default();
    let mut rows = 0u64;
    read_rows(from, m, &mut |t, k, v| {
        w.put(t, k, Some(v));
        rows += 1;
        if w.0.len() >= RESTORE_BATCH {
            std::mem::take(&mut w).apply(db)?;
            failpoint::hit("restore:rows");
        }
        Ok(())
    })?;
    w.apply(db)?;
    Ok(rows)
}

/// Every row of a backup's data file, checked against the manifest: a
/// bad count or hash fails after the last row.
fn read_rows(
    from: &Path,
    m: &Manifest,
    each: &mut dyn FnMut(Table, Vec<u8>, Vec<u8>) -> Result<()>,
) -> Result<()> {
    let (rows, hash) = backup_rows(from, each)?;
    if rows != m.rows || hash != m.data_hash {
        return Err(Error::tampered("backup data"));
    }
    Ok(())
}

/// Every row of the `data` file of the backup in `from`, in order (a
/// malformed frame is `Tampered`); returns the row count and the file's
/// SHA-256, for the caller to check against a manifest.
pub(crate) fn backup_rows(
    from: &Path,
    each: &mut dyn FnMut(Table, Vec<u8>, Vec<u8>) -> Result<()>,
) -> Result<(u64, [u8; 32])> {
    let mut f = std::io::BufReader::new(std::fs::File::open(from.join("data"))?);
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let bad = || Error::tampered("backup data");
    let mut rows = 0u64;
    loop {
        let mut tag = [0u8; 1];
        if f.read(&mut tag)? == 0 {
            break;
        }
        let t = table_of(tag[0]).ok_or_else(bad)?;
        hash.update(&tag);
        let read_part = |f: &mut std::io::BufReader<std::fs::File>,
                         hash: &mut ring::digest::Context|
         -> Result<Vec<u8>> {
            let mut l = [0u8; 4];
            f.read_exact(&mut l).map_err(|_| bad())?;
            let len = u32::from_be_bytes(l) as usize;
            if len > 1 << 26 {
                return Err(bad());
            }
            let mut v = vec![0u8; len];
            f.read_exact(&mut v).map_err(|_| bad())?;
            hash.update(&l);
            hash.update(&v);
            Ok(v)
        };
        let k = read_part(&mut f, &mut hash)?;
        let v = read_part(&mut f, &mut hash)?;
        rows += 1;
        each(t, k, v)?;
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(hash.finish().as_ref());
    Ok((rows, digest))
}

/// The target of a restore: the live keyring's medium, what keeps other
/// processes out while the restore writes, and (shared mode) the
/// database, whose data tables must be empty. Embedded mode: the data
/// directory is created only once the backup checked out.
type Target = (Arc<dyn Medium>, Box<dyn Send>, Option<Arc<dyn Backend>>);

fn open_target(config: &StoreConfig) -> Result<Target> {
    match config.postgres_url() {
        #[cfg(feature = "postgres")]
        Some(url) => {
            use storage::postgres::{PgBackend, PgMedium};
            let pg = PgBackend::connect(url, config.pool_size)?;
            let init = pg.lock_init()?;
            let medium = Arc::new(PgMedium::new(pg.clone()));
            if !medium.exists()? {
                return Err(Error::KeyUnavailable {
                    what: "a restore needs the store's keyring rows (its revocation ledger) in the database",
                });
            }
            let db: Arc<dyn Backend> = pg;
            Ok((medium, init, Some(db)))
        }
        #[cfg(not(feature = "postgres"))]
        Some(_) => Err(Error::Config(
            "a postgresql:// store needs bioseal built with the `postgres` feature".into(),
        )),
        None => {
            let key_dir = config
                .key_dir
                .clone()
                .ok_or_else(|| Error::Config("no key directory (StoreConfig::key_dir)".into()))?;
            check_key_dir(&config.dir, &key_dir)?;
            let kpath = key_dir.join(KEYRING_FILE);
            if !kpath.exists() {
                return Err(Error::KeyUnavailable {
                    what: "a restore needs the store's keyring (its revocation ledger) in the key directory",
                });
            }
            if std::fs::read_dir(&config.dir).is_ok_and(|mut d| d.next().is_some()) {
                return Err(Error::Config(format!(
                    "restore needs an empty location: {} is not empty",
                    config.dir.display()
                )));
            }
            let lock = lock_key_dir(&key_dir)?;
            epoch::settle_next(&kpath, &*config.key)?;
            let medium: Arc<dyn Medium> =
                Arc::new(crate::crypto::keyring::FileMedium::open(&kpath)?);
            Ok((medium, Box::new(lock), None))
        }
    }
}
