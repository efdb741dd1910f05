//! [`Store`]: the facade. Enroll, verify, revoke, consent changes, sweep,
//! shred, audit.

use crate::audit::{AuditEntry, AuditEvent, AuditLog, AuditOutcome};
use crate::clock::{Clock, Timestamp};
use crate::config::{AttemptPolicy, Durability, ShredPolicy, StoreConfig};
use crate::consent::{Consent, ConsentStatus, Purpose};
use crate::crypto::aead::AeadKey;
use crate::crypto::custody::UserKey;
use crate::crypto::keyring::{Kek, Keyring};
use crate::crypto::pseudonym::Pseudonym;
use crate::crypto::random;
use crate::embedding::{Embedding, Template};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::matcher::{self, Decision, Threshold};
use crate::storage::record::{dek_aad, payload_aad, state_aad, WRAPPED_DEK_LEN};
use crate::storage::{
    self, day_of, Backend, DekTable, SubjectPayload, SubjectRecord, SubjectState, Table, Writes,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zeroize::{Zeroize, Zeroizing};

/// The keyring's file name in the key directory.
const KEYRING_FILE: &str = "bioseal.keyring";
/// The key directory's lock file (see `lock_key_dir`).
const LOCK_FILE: &str = "bioseal.lock";
/// Where stores before the key directory kept their keyring.
const LEGACY_KEYRING_FILE: &str = "keyring";
const DB_DIR: &str = "db";
const MAX_SUBJECT_LEN: usize = 1024;
/// Buckets a sweep or shred rotates together (three syncs per group); their
/// locks are held for the group's duration.
const ROTATION_GROUP: usize = 256;
/// A bucket with the subjects the retention index lists as due in it, each
/// with the day of its index entry.
type DueBucket = (u32, Vec<(Pseudonym, u32)>);

/// Most threads a sweep runs its groups on (never more than the machine's
/// available parallelism).
const SWEEP_THREADS: usize = 4;

/// When a revocation was carried out, and the two bounds of its erasure:
/// in the live data (the shred) and in backups (the key epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShredReceipt {
    /// When the subject's records were removed.
    pub revoked_at: Timestamp,
    /// Whether the bucket's KEK has been rotated: from then on no copy of
    /// the live data opens the subject with today's keyring.
    pub status: ShredStatus,
    /// By when every backup (and every other copy of the keyring sealed
    /// under the current epoch: dumps, copies of the key directory) is
    /// inert for this subject: the end of the current key epoch plus the
    /// key provider's destruction delay. Restoring a backup before then
    /// replays the revocation ledger, so the subject never comes back.
    /// `None`: the key provider cannot destroy keys (a fixed root key), so
    /// backups never become inert.
    pub backups_inert_by: Option<Timestamp>,
}

/// State of a revocation's crypto-shred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShredStatus {
    /// The KEK that wrapped the subject's DEK was overwritten: no copy of the
    /// data files can be decrypted for this subject any more.
    Shredded {
        /// When the old KEK slot was zeroed and synced.
        at: Timestamp,
    },
    /// Waiting for [`Store::shred`] ([`ShredPolicy::Deferred`]).
    Pending,
}

/// What [`Store::withdraw_purpose`] left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withdrawal {
    /// Purposes still consented.
    Remaining(Vec<Purpose>),
    /// That was the last purpose: the subject was revoked.
    Revoked(ShredReceipt),
}

/// What a [`Store::sweep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Retention-index entries visited (only subjects due by today).
    pub examined: usize,
    /// Subjects destroyed.
    pub expired: usize,
    /// Bucket KEKs rotated.
    pub buckets_rotated: usize,
    /// The new key epoch, if the current one was due and this sweep
    /// rolled it (see [`StoreConfig::epoch_length`]).
    pub epoch_rolled: Option<u64>,
    /// Wall-clock time the sweep took.
    pub took: Duration,
}

/// Counts that describe a store. Never template data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    /// Enrolled subjects.
    pub subjects: usize,
    /// Bucket count.
    pub buckets: u32,
    /// Buckets whose shred is pending.
    pub pending_shreds: usize,
    /// Lowest live KEK generation.
    pub generation_min: u64,
    /// Highest live KEK generation.
    pub generation_max: u64,
}

/// An open bioseal store. `Send + Sync`: share one behind an `Arc`.
///
/// See the crate documentation for a complete example.
pub struct Store {
    /// Embedded mode: the data directory.
    dir: Option<PathBuf>,
    /// Embedded mode: the key directory's lock, held while the store is
    /// open (one process owns an embedded store).
    _key_lock: Option<std::fs::File>,
    /// Supplies and destroys the epoch root keys.
    keys: Arc<dyn crate::crypto::keys::KeyProvider>,
    /// How long an epoch runs before `sweep` rolls it.
    epoch_length: Duration,
    /// Held by an epoch roll.
    roll: Mutex<()>,
    db: Arc<dyn Backend>,
    keyring: Keyring,
    audit: AuditLog,
    dim: usize,
    max_templates: usize,
    shred_policy: ShredPolicy,
    clock: Arc<dyn Clock>,
    max_consent_lifetime: Duration,
    max_inactivity: Duration,
    attempts: AttemptPolicy,
    durability: Durability,
    /// The group-commit thread and the channel that stops it.
    flusher: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    /// One lock per bucket. Every operation on a subject holds its bucket's
    /// lock from the first read to the last write: a verify's lockout check,
    /// comparison and counter update are one step, and no rotation of the
    /// bucket runs in between.
    locks: Vec<Mutex<()>>,
    /// Stand-ins for the work of a refused or unknown-subject verify.
    decoy: lockout::Decoy,
    /// The data's high-water mark: raised at every rotation, written to
    /// the data before the flush and to the keyring after it.
    mark: Mutex<u64>,
    /// The latest time seen (Unix seconds): the clock's readings that were
    /// not a jump forward of more than `max_clock_jump`; persisted in the
    /// keyring at every rotation and sweep.
    seen: std::sync::atomic::AtomicU64,
    max_clock_jump: Duration,
    /// The match threshold on the fixed-point scale (the keyring holds the
    /// cosine).
    threshold_fixed: std::sync::atomic::AtomicI64,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("data", &self.db.describe())
            .field("dimension", &self.dim)
            .field("buckets", &self.keyring.header().buckets)
            .finish_non_exhaustive()
    }
}

/// Proof that the caller holds a bucket's lock: the store's mutex, and in
/// shared mode the lock across processes (held by the first guard of a
/// group).
struct BucketGuard<'a> {
    _local: MutexGuard<'a, ()>,
    _remote: Option<storage::RemoteLock>,
}

/// A subject's record, opened.
struct Loaded {
    dek: Zeroizing<[u8; 32]>,
    payload: SubjectPayload,
    state: SubjectState,
    /// The payload as sealed on disk (empty for a subject not yet written),
    /// kept so that a state change rewrites it without re-sealing.
    sealed_payload: Vec<u8>,
    /// A split-custody subject's templates as sealed on disk under the key
    /// derived from its server half and user key (empty in server custody);
    /// a DEK change keeps them as they are.
    sealed_templates: Vec<u8>,
    /// The day its retention-index pointer named when it was read (`None`:
    /// not read; then `put_subject` reads it).
    index_day: Option<Option<u32>>,
}

mod backup;
mod custody;
mod epoch;
pub(crate) use backup::backup_rows;
pub use backup::{BackupInfo, RestoreReport};
pub use epoch::EpochStatus;
mod lifecycle;
mod lockout;
mod retention;
mod rotation;
mod subject;
#[cfg(test)]
mod tests;

impl Store {
    /// Open the store in the configured directory, creating it if the
    /// directory holds no store. Completes any key rotation a crash
    /// interrupted before returning. A wrong root key fails with
    /// [`Error::WrongRootKey`] before any data file is opened.
    pub fn open(config: StoreConfig) -> Result<Store> {
        let (model_id, dim, threshold) = config.validate()?;
        let opened = match config.postgres_url() {
            #[cfg(feature = "postgres")]
            Some(url) => open_shared(&config, url, &model_id, dim, threshold)?,
            #[cfg(not(feature = "postgres"))]
            Some(_) => {
                return Err(Error::Config(
                    "a postgresql:// store needs bioseal built with the `postgres` feature".into(),
                ))
            }
            None => open_embedded(&config, &model_id, dim, threshold)?,
        };
        let Opened {
            dir,
            keyring,
            created,
            db,
            data_existed,
            init_lock,
            key_lock,
            epochs_settled,
        } = opened;
        let h = keyring.header();
        if h.model_id != model_id || h.dim as usize != dim {
            return Err(Error::ModelMismatch {
                stored: format!("{}/{}", h.model_id, h.dim),
                configured: format!("{model_id}/{dim}"),
            });
        }
        let kstate = keyring.state();
        if let Some(t) = threshold {
            if t.as_cosine() != kstate.threshold {
                return Err(Error::Config(format!(
                    "the store's threshold is {} (kept in the keyring); the configuration asks for {}: \
                     change it with Store::set_threshold, or leave it unset",
                    kstate.threshold,
                    t.as_cosine()
                )));
            }
        }
        let fresh_keyring = created || (kstate.mark == 0 && kstate.audit_entries == 0);
        if !data_existed && !fresh_keyring {
            // A used keyring and no data: this keyring belongs to data
            // elsewhere (or deleted); never bind it to new, empty data.
            return Err(Error::StoreMismatch);
        }
        let db = db()?;
        match storage::store_id(&*db)? {
            Some(id) if id == h.store_id => {}
            Some(_) => return Err(Error::StoreMismatch),
            None if db.last(Table::Records, None)?.is_some() => return Err(Error::StoreMismatch),
            None => storage::set_store_id(&*db, &h.store_id)?,
        }
        drop(init_lock);
        let audit = AuditLog::open(db.clone(), keyring.audit_key())?;
        let flusher = match config.durability {
            Durability::Immediate => None,
            Durability::GroupCommit { interval } => {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let (drainer, backend) = (audit.inner(), db.clone());
                let handle = std::thread::Builder::new()
                    .name("bioseal-flusher".into())
                    .spawn(move || {
                        // A message asks for a drain only (the queue is
                        // filling); the interval's timeout drains and flushes;
                        // the store dropping the sender stops the thread
                        // after a last drain and flush. Errors surface at the
                        // next explicit flush.
                        let mut due = std::time::Instant::now() + interval;
                        loop {
                            let wait = due.saturating_duration_since(std::time::Instant::now());
                            match rx.recv_timeout(wait) {
                                Ok(()) => {
                                    let _ = drainer.drain();
                                }
                                Err(e) => {
                                    let _ = drainer.drain();
                                    let _ = backend.flush();
                                    if e == std::sync::mpsc::RecvTimeoutError::Disconnected {
                                        break;
                                    }
                                    due = std::time::Instant::now() + interval;
                                }
                            }
                        }
                    })?;
                Some((tx, handle))
            }
        };
        // Rollback: the data's high-water mark against the keyring's, and
        // the audit head the keyring anchored.
        let data_mark = storage::mark(&*db, |m| keyring.mark_mac(m))?;
        let anchored = crate::audit::AuditHead {
            entries: kstate.audit_entries,
            last_mac: kstate.audit_mac,
        };
        let rolled_back = data_mark < kstate.mark || !audit.holds(&anchored)?;
        if rolled_back && !config.accept_rollback {
            return Err(Error::RolledBack {
                data: data_mark,
                keyring: kstate.mark,
            });
        }
        let buckets = h.buckets;
        let threshold = Threshold::cosine(kstate.threshold);
        let store = Store {
            mark: Mutex::new(data_mark.max(kstate.mark)),
            seen: std::sync::atomic::AtomicU64::new(if config.accept_clock_jump {
                config.clock.now().unix_secs().max(kstate.last_seen)
            } else {
                kstate.last_seen
            }),
            max_clock_jump: config.max_clock_jump,
            threshold_fixed: std::sync::atomic::AtomicI64::new(threshold.fixed()),
            flusher,
            dir,
            _key_lock: key_lock,
            epoch_length: config.epoch_length,
            roll: Mutex::new(()),
            db,
            keyring,
            audit,
            dim,
            max_templates: config.max_templates,
            shred_policy: config.shred,
            attempts: config.attempt_policy(),
            keys: config.key,
            clock: config.clock,
            max_consent_lifetime: config.max_consent_lifetime,
            max_inactivity: config.max_inactivity,
            durability: config.durability,
            locks: (0..buckets).map(|_| Mutex::new(())).collect(),
            decoy: lockout::Decoy::new(dim)?,
        };
        if config.accept_clock_jump {
            let seen = store.seen.load(std::sync::atomic::Ordering::SeqCst);
            store.keyring.update_state(|st| st.last_seen = seen)?;
            store.log(
                store.now(),
                AuditEntry::new(AuditEvent::ClockJumpAccepted)
                    .count(seen.saturating_sub(kstate.last_seen))
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        if rolled_back {
            store.log(
                store.now(),
                AuditEntry::new(AuditEvent::RollbackAccepted)
                    .count(kstate.mark.saturating_sub(data_mark))
                    .outcome(AuditOutcome::Ok),
            )?;
            // Past both marks: the newer data cannot come back silently.
            let anchor = store.advance_mark()?;
            store.keyring.update_state(|st| {
                st.mark = anchor.mark;
                st.audit_entries = anchor.audit_entries;
                st.audit_mac = anchor.audit_mac;
            })?;
        }
        if epochs_settled > 0 {
            // A roll a crash interrupted, finished (or undone) by this open.
            let (epoch, _) = store.keyring.epoch();
            store.log(
                store.now(),
                AuditEntry::new(AuditEvent::EpochRolled)
                    .count(epoch)
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        store.recover()?;
        if let Some(from) = store.keyring.state().replay_from {
            // A restore wrote this keyring: replay the revocation ledger
            // (again, if a crash interrupted it).
            store.replay_ledger(from)?;
        }
        Ok(store)
    }

    /// Change the match threshold (a cosine in (0, 1]). It is kept in the
    /// authenticated keyring; the change is audited and durable when this
    /// returns.
    pub fn set_threshold(&self, t: Threshold) -> Result<()> {
        if !t.is_valid() {
            return Err(Error::Config(
                "threshold must be a finite cosine above 0 and at most 1".into(),
            ));
        }
        self.keyring
            .update_state(|st| st.threshold = t.as_cosine())?;
        self.threshold_fixed
            .store(t.fixed(), std::sync::atomic::Ordering::SeqCst);
        self.log(
            self.now(),
            AuditEntry::new(AuditEvent::ThresholdChanged).outcome(AuditOutcome::Ok),
        )?;
        self.flush()
    }

    /// The match threshold the store decides with (kept in the keyring).
    pub fn threshold(&self) -> Threshold {
        Threshold::cosine(self.keyring.state().threshold)
    }

    /// The clock's reading; remembered as the latest time seen unless it is
    /// a jump forward of more than `max_clock_jump` past it.
    fn now(&self) -> Timestamp {
        use std::sync::atomic::Ordering;
        let now = self.clock.now();
        let seen = self.seen.load(Ordering::Relaxed);
        if now.unix_secs() <= seen.saturating_add(self.max_clock_jump.as_secs()) {
            self.seen.fetch_max(now.unix_secs(), Ordering::Relaxed);
        }
        now
    }

    /// Refuse destruction by deadline while the clock reads more than
    /// `max_clock_jump` past the latest time seen: a clock set forward
    /// (by mistake or by an attacker) must not crypto-shred everyone.
    pub(super) fn check_clock(&self, now: Timestamp) -> Result<()> {
        let seen = self.seen.load(std::sync::atomic::Ordering::SeqCst);
        if now.unix_secs() > seen.saturating_add(self.max_clock_jump.as_secs()) {
            return Err(Error::ClockJump {
                last_seen: Timestamp::from_unix_secs(seen),
                now,
            });
        }
        Ok(())
    }

    /// The fixed-point threshold for the matcher.
    fn fixed_threshold(&self) -> i64 {
        self.threshold_fixed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Raise the high-water mark by one: write it to the data, drain the
    /// audit queue, flush and sync; returns what the keyring must record
    /// (its state is written by the caller's keyring sync).
    fn advance_mark(&self) -> Result<crate::crypto::keyring::Anchor> {
        let mark = {
            let mut m = self.mark.lock().unwrap_or_else(|e| e.into_inner());
            if self.db.shared() {
                // Another replica may have raised it.
                *m = (*m).max(storage::mark(&*self.db, |v| self.keyring.mark_mac(v))?);
            }
            *m += 1;
            storage::set_mark(&*self.db, *m, &self.keyring.mark_mac(*m))?;
            *m
        };
        let inner = self.audit.inner();
        inner.drain()?;
        let head = inner.head();
        self.db.flush()?;
        Ok(crate::crypto::keyring::Anchor {
            mark,
            audit_entries: head.entries,
            audit_mac: head.last_mac,
            now: self.seen.load(std::sync::atomic::Ordering::SeqCst),
        })
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Counts describing the store (no template data; walks the record keys).
    pub fn stats(&self) -> Result<StoreStats> {
        let mut subjects = 0;
        storage::scan_prefix(&*self.db, Table::Records, b"S", &mut |_, _| {
            subjects += 1;
            Ok(true)
        })?;
        self.keyring.refresh_all()?;
        let (generation_min, generation_max) = self.keyring.generation_range();
        Ok(StoreStats {
            subjects,
            buckets: self.keyring.header().buckets,
            pending_shreds: storage::pending_buckets(&*self.db)?.len(),
            generation_min,
            generation_max,
        })
    }

    /// The storage backend, for the raw-access test hooks.
    #[cfg(feature = "failpoints")]
    pub(crate) fn raw_db(&self) -> &dyn Backend {
        &*self.db
    }

    /// The store's data directory (embedded mode; `None` in shared mode).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Make everything written so far durable: queued audit entries into
    /// sled, then sled's log to disk.
    fn flush(&self) -> Result<()> {
        self.audit.inner().drain()?;
        self.db.flush()?;
        Ok(())
    }

    fn log(&self, now: Timestamp, e: AuditEntry) -> Result<()> {
        if self.audit.append(now, e)? {
            if let Some((tx, _)) = &self.flusher {
                // The flusher is gone only while the store is dropped.
                let _ = tx.send(());
            }
        }
        Ok(())
    }

    fn lock(&self, b: u32) -> Result<BucketGuard<'_>> {
        let mut g = self.lock_many(&[b])?;
        g.pop().ok_or(Error::tampered("bucket lock"))
    }

    /// Lock the distinct, ascending buckets `buckets`: the store's mutexes,
    /// then (shared mode) the database's locks in one round trip, then the
    /// cached keys of those buckets are refreshed (another replica may have
    /// rotated them).
    fn lock_many(&self, buckets: &[u32]) -> Result<Vec<BucketGuard<'_>>> {
        // A bucket comes from `Pseudonym::bucket(buckets)` or from a key the
        // store wrote; the modulo keeps a corrupted key from panicking.
        let mut guards: Vec<BucketGuard<'_>> = buckets
            .iter()
            .map(|&b| BucketGuard {
                _local: self.locks[b as usize % self.locks.len()]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
                _remote: None,
            })
            .collect();
        let prefetch = if self.db.shared() {
            self.keyring.slot_ranges(buckets)
        } else {
            Vec::new()
        };
        if let Some(remote) = self.db.lock_buckets(buckets, &prefetch)? {
            if let Some(first) = guards.first_mut() {
                first._remote = Some(remote);
            }
            self.keyring.refresh(buckets)?;
            // A replica that died mid-rotation left both KEKs in a bucket;
            // its locks died with its session, so no one else is rotating
            // it: finish the rotation here, without any restart.
            for &b in buckets {
                if self.keyring.is_rotating(b)? {
                    self.complete_rotation(b)?;
                }
            }
        }
        Ok(guards)
    }

    fn locate(&self, subject: &str) -> (Pseudonym, u32, [u8; 37]) {
        let p = self.keyring.pseudonym_key().pseudonym(subject.as_bytes());
        let b = p.bucket(self.keyring.header().buckets);
        (p, b, storage::subject_key(b, &p))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Stop the flusher (it drains and flushes once more), then flush
        // whatever is left: best effort, there is no one to report to.
        if let Some((tx, handle)) = self.flusher.take() {
            drop(tx);
            let _ = handle.join();
        }
        let _ = self.flush();
        self.db.close();
    }
}

/// What a backend's part of [`Store::open`] found.
struct Opened {
    dir: Option<PathBuf>,
    keyring: Keyring,
    /// Whether the keyring was created by this open.
    created: bool,
    /// Opens the data (sled only after the keyring checks passed).
    db: Box<dyn FnOnce() -> Result<Arc<dyn Backend>>>,
    /// Whether data existed before this open.
    data_existed: bool,
    /// Shared mode: held until the store id is bound (store creation is
    /// serialised across replicas).
    init_lock: Option<storage::RemoteLock>,
    /// Embedded mode: the key directory's lock.
    key_lock: Option<std::fs::File>,
    /// Epochs other than the keyring's that this open destroyed (a roll a
    /// crash interrupted).
    epochs_settled: usize,
}

/// The keyring image of a new store (either backend): the configured
/// threshold is required.
fn new_keyring_image(
    config: &StoreConfig,
    model_id: &str,
    dim: usize,
    threshold: Option<Threshold>,
) -> Result<Vec<u8>> {
    let t = threshold.ok_or_else(|| {
        Error::Config("no threshold set for a new store (StoreConfig::threshold)".into())
    })?;
    let (epoch, root) = epoch::first_epoch(&*config.key)?;
    Keyring::image(
        &root,
        epoch,
        config.buckets,
        model_id,
        dim as u32,
        config.clock.now().unix_secs(),
        t.as_cosine(),
    )
}

/// Embedded mode: the data directory, the key directory and the keyring
/// file in it.
fn open_embedded(
    config: &StoreConfig,
    model_id: &str,
    dim: usize,
    threshold: Option<Threshold>,
) -> Result<Opened> {
    let dir = config.dir.clone();
    if !dir.exists() {
        create_private_dir(&dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent)?.sync_all()?;
        }
    }
    let key_dir = config.key_dir.clone().ok_or_else(|| {
            Error::Config(
                "no key directory (StoreConfig::key_dir): the keyring must live outside the data directory"
                    .into(),
            )
        })?;
    check_key_dir(&dir, &key_dir)?;
    // Private before sled creates anything in it; the files inside are
    // made private once sled has opened them (below).
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    if dir.join(LEGACY_KEYRING_FILE).exists() {
        return Err(Error::LegacyLayout(format!(
            "{} holds its keyring inside the data directory, where every copy of the data \
                 carries it; this version keeps it in a key directory with a new format: \
                 re-create the store and enroll again",
            dir.display()
        )));
    }
    if !key_dir.exists() {
        create_private_dir(&key_dir)?;
    }
    std::fs::set_permissions(
        &key_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;
    let key_lock = lock_key_dir(&key_dir)?;
    let kpath = key_dir.join(KEYRING_FILE);
    let dbpath = dir.join(DB_DIR);
    epoch::settle_next(&kpath, &*config.key)?;
    let (keyring, created) = if kpath.exists() {
        let medium = crate::crypto::keyring::FileMedium::open(&kpath)?;
        (Keyring::load_from(Arc::new(medium), &*config.key)?, false)
    } else if dbpath.exists() {
        return Err(Error::KeyUnavailable {
                what: "the keyring file is missing from the key directory; refusing to create a new one over existing data",
            });
    } else {
        let image = new_keyring_image(config, model_id, dim, threshold)?;
        let medium = crate::crypto::keyring::FileMedium::create(&kpath, &image)?;
        (Keyring::load_from(Arc::new(medium), &*config.key)?, true)
    };
    let epochs_settled = epoch::settle_epochs(&*config.key, keyring.epoch().0)?;
    Ok(Opened {
        key_lock: Some(key_lock),
        epochs_settled,
        data_existed: dbpath.exists(),
        db: {
            let (dir, cache) = (dir.clone(), config.cache_bytes);
            Box::new(move || {
                let db: Arc<dyn Backend> = Arc::new(storage::sled::SledBackend::open(&dir, cache)?);
                Ok(db)
            })
        },
        dir: Some(dir),
        keyring,
        created,
        init_lock: None,
    })
}

/// Shared mode: the database at `url`, its schema, and the keyring rows
/// in it (created under the creation lock if missing).
#[cfg(feature = "postgres")]
fn open_shared(
    config: &StoreConfig,
    url: &str,
    model_id: &str,
    dim: usize,
    threshold: Option<Threshold>,
) -> Result<Opened> {
    use storage::postgres::{PgBackend, PgMedium};
    let pg = PgBackend::connect(url, config.pool_size)?;
    let init = pg.lock_init()?;
    let medium = Arc::new(PgMedium::new(pg.clone()));
    let (keyring, created) = if medium.exists()? {
        (Keyring::load_from(medium, &*config.key)?, false)
    } else if storage::store_id(&*pg)?.is_some() || pg.last(Table::Records, None)?.is_some() {
        return Err(Error::KeyUnavailable {
            what: "the keyring rows are missing from the database; refusing to create a new keyring over existing data",
        });
    } else {
        let image = new_keyring_image(config, model_id, dim, threshold)?;
        medium.create(&image)?;
        (Keyring::load_from(medium, &*config.key)?, true)
    };
    // Under the creation lock, which an epoch roll also takes: no roll is
    // under way, so any other live epoch is a stray one.
    let epochs_settled = epoch::settle_epochs(&*config.key, keyring.epoch().0)?;
    // Another replica may roll the epoch: this one adopts it under its
    // locks, with the key from the same provider.
    keyring.share_provider(config.key.clone());
    pg.set_namespace(&keyring.header().store_id);
    Ok(Opened {
        key_lock: None,
        epochs_settled,
        dir: None,
        keyring,
        created,
        data_existed: !created,
        db: Box::new(move || {
            let db: Arc<dyn Backend> = pg;
            Ok(db)
        }),
        init_lock: Some(init),
    })
}

fn be_u32(v: &[u8]) -> Option<u32> {
    let a: [u8; 4] = v.try_into().ok()?;
    Some(u32::from_be_bytes(a))
}

fn to_wrapped(sealed: &[u8]) -> Result<[u8; WRAPPED_DEK_LEN]> {
    let mut w = [0u8; WRAPPED_DEK_LEN];
    if sealed.len() != WRAPPED_DEK_LEN {
        return Err(Error::tampered("wrapped data key"));
    }
    w.copy_from_slice(sealed);
    Ok(w)
}

/// Create `dir` and any missing parents, mode 0700.
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    Ok(b.create(dir)?)
}

/// The key directory's lock file: one process opens an embedded store
/// (sled refuses a second too, but only after the keyring was read; an
/// epoch roll must not race another process's open).
fn lock_key_dir(key_dir: &Path) -> Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let f = opts.open(key_dir.join(LOCK_FILE))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Storage(format!(
            "the store is open in another process (the key directory {} is locked)",
            key_dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Refuse a key directory that is, or is inside, the data directory.
fn check_key_dir(data: &Path, keys: &Path) -> Result<()> {
    let abs = |p: &Path| -> Result<PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        };
        // Resolve what exists (symbolic links included); keep the rest.
        let mut base = p.clone();
        let mut rest = Vec::new();
        while !base.exists() {
            match (base.file_name(), base.parent()) {
                (Some(n), Some(parent)) => {
                    rest.push(n.to_owned());
                    base = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut out = base.canonicalize().unwrap_or(base);
        out.extend(rest.iter().rev());
        Ok(out)
    };
    if abs(keys)?.starts_with(abs(data)?) {
        return Err(Error::Config(format!(
            "the key directory {} is inside the data directory {}: every copy of the data would carry the keyring",
            keys.display(),
            data.display()
        )));
    }
    Ok(())
}

fn check_subject(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN {
        return Err(Error::InvalidSubject);
    }
    Ok(())
}

// `Store` must stay shareable across threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
};

/// Access for the forensics tests (the crate's own, and with the
/// `failpoints` feature its integration tests): the keys an operator holds.
#[cfg(any(test, feature = "failpoints"))]
impl Store {
    pub(crate) fn test_dek(&self, subject: &str) -> Result<Zeroizing<[u8; 32]>> {
        let (p, b, key) = self.locate(subject);
        let _g = self.lock(b)?;
        Ok(self
            .load_subject(&p, b, &key)?
            .ok_or(Error::NotEnrolled)?
            .dek)
    }

    /// A split-custody subject's server half (`None` in server custody).
    pub(crate) fn test_split_half(&self, subject: &str) -> Result<Option<[u8; 32]>> {
        let (p, b, key) = self.locate(subject);
        let _g = self.lock(b)?;
        let l = self.load_subject(&p, b, &key)?.ok_or(Error::NotEnrolled)?;
        Ok(l.payload.split.as_ref().map(|s| s.server_half))
    }
}
