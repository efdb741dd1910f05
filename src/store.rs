//! [`Store`]: the facade. Enroll, verify, revoke, consent changes, sweep,
//! shred, audit.

use crate::audit::{AuditEntry, AuditEvent, AuditLog, AuditOutcome};
use crate::clock::{Clock, Timestamp};
use crate::config::{AttemptPolicy, Durability, ShredPolicy, StoreConfig};
use crate::consent::{Consent, ConsentStatus, Purpose};
use crate::crypto::aead::AeadKey;
use crate::crypto::keyring::{Kek, Keyring};
use crate::crypto::pseudonym::Pseudonym;
use crate::crypto::random;
use crate::embedding::{Embedding, Template};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::matcher::{self, Decision};
use crate::storage::record::{dek_aad, payload_aad, state_aad, WRAPPED_DEK_LEN};
use crate::storage::{
    self, day_of, Db, DekTable, SubjectPayload, SubjectRecord, SubjectState, Writes,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const KEYRING_FILE: &str = "keyring";
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

/// When a revocation was carried out and whether its shred is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShredReceipt {
    /// When the subject's records were removed.
    pub revoked_at: Timestamp,
    /// Whether the bucket's KEK has been rotated.
    pub status: ShredStatus,
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
    dir: PathBuf,
    db: Db,
    keyring: Keyring,
    audit: AuditLog,
    dim: usize,
    threshold: i64,
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
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("dimension", &self.dim)
            .field("buckets", &self.keyring.header().buckets)
            .finish_non_exhaustive()
    }
}

/// Proof that the caller holds a bucket's lock.
struct BucketGuard<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

/// A subject's record, opened.
struct Loaded {
    dek: Zeroizing<[u8; 32]>,
    payload: SubjectPayload,
    state: SubjectState,
    /// The payload as sealed on disk (empty for a subject not yet written),
    /// kept so that a state change rewrites it without re-sealing.
    sealed_payload: Vec<u8>,
}

impl Store {
    /// Open the store in the configured directory, creating it if the
    /// directory holds no store. Completes any key rotation a crash
    /// interrupted before returning. A wrong root key fails with
    /// [`Error::WrongRootKey`] before any data file is opened.
    pub fn open(config: StoreConfig) -> Result<Store> {
        let (model_id, dim, threshold) = config.validate()?;
        let dir = config.dir.clone();
        if !dir.exists() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(&dir)?;
        }
        let kpath = dir.join(KEYRING_FILE);
        let dbpath = dir.join(DB_DIR);
        let keyring = {
            let root = config.key.root_key()?;
            if kpath.exists() {
                Keyring::open(&kpath, &root)?
            } else if dbpath.exists() {
                return Err(Error::KeyUnavailable {
                    what: "the keyring file is missing; refusing to create a new one over existing data",
                });
            } else {
                Keyring::create(
                    &kpath,
                    &root,
                    config.buckets,
                    &model_id,
                    dim as u32,
                    config.clock.now().unix_secs(),
                )?
            }
        };
        let h = keyring.header();
        if h.model_id != model_id || h.dim as usize != dim {
            return Err(Error::ModelMismatch {
                stored: format!("{}/{}", h.model_id, h.dim),
                configured: format!("{model_id}/{dim}"),
            });
        }
        // bioseal's own flusher (below) replaces sled's, so that queued audit
        // entries and sled's log are flushed together.
        let db = Db::open(&dbpath, config.cache_bytes)?;
        match db.store_id()? {
            Some(id) if id == h.store_id => {}
            Some(_) => return Err(Error::StoreMismatch),
            None if !db.records.is_empty() => return Err(Error::StoreMismatch),
            None => db.set_store_id(&h.store_id)?,
        }
        let audit = AuditLog::open(db.audit.clone(), keyring.audit_key())?;
        let flusher = match config.durability {
            Durability::Immediate => None,
            Durability::GroupCommit { interval } => {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let (drainer, sled_db) = (audit.inner(), db.db.clone());
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
                                    let _ = sled_db.flush();
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
        let buckets = h.buckets;
        let store = Store {
            flusher,
            dir,
            db,
            keyring,
            audit,
            dim,
            threshold: threshold.fixed(),
            max_templates: config.max_templates,
            shred_policy: config.shred,
            attempts: config.attempt_policy(),
            clock: config.clock,
            max_consent_lifetime: config.max_consent_lifetime,
            max_inactivity: config.max_inactivity,
            durability: config.durability,
            locks: (0..buckets).map(|_| Mutex::new(())).collect(),
        };
        store.recover()?;
        Ok(store)
    }

    /// Enroll a template for `subject` under `consent`. The consent must name
    /// at least one purpose, an evidence digest and an expiry in the future
    /// within the store's maximum lifetime; it replaces any consent the
    /// subject held. A subject may hold up to the configured number of
    /// templates. Enrolling resets the failed-attempt counter. Durable when
    /// it returns.
    pub fn enroll(&self, subject: &str, embedding: Embedding, consent: Consent) -> Result<()> {
        self.enroll_staged(subject, embedding, consent)?;
        self.flush()
    }

    /// Enroll many subjects with one sync for the lot: each item is enrolled
    /// as [`Store::enroll`] would, and every item reported `Ok` is durable
    /// when this returns. One item's error (a bad embedding, a consent
    /// without evidence, too many templates) does not stop the others; the
    /// outer error is a storage failure, after which nothing in this call is
    /// known to be durable.
    pub fn enroll_many<S, I>(&self, items: I) -> Result<Vec<Result<()>>>
    where
        S: AsRef<str>,
        I: IntoIterator<Item = (S, Embedding, Consent)>,
    {
        let mut out = Vec::new();
        for (subject, embedding, consent) in items {
            let r = self.enroll_staged(subject.as_ref(), embedding, consent);
            if let Err(e @ (Error::Storage(_) | Error::Io(_))) = r {
                return Err(e);
            }
            out.push(r);
        }
        self.flush()?;
        Ok(out)
    }

    /// Everything [`Store::enroll`] does except the final sync.
    fn enroll_staged(&self, subject: &str, embedding: Embedding, consent: Consent) -> Result<()> {
        check_subject(subject)?;
        let template = embedding.quantize(self.dim)?;
        let now = self.clock.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut existing = self.load_subject(&p, b, &key)?;
        if let Some(l) = &existing {
            if let Some(reason) = self.overdue(l, now) {
                existing = None;
                self.destroy_expired(b, &p, reason, &guard)?;
            }
        }
        let state = SubjectState {
            failures: 0,
            last_failure: 0,
            last_interaction: now.unix_secs(),
        };
        let mut w = Writes::default();
        let (dek, payload) = match existing {
            Some(Loaded {
                dek, mut payload, ..
            }) => {
                if payload.templates.len() >= self.max_templates {
                    return Err(Error::TooManyTemplates {
                        max: self.max_templates,
                    });
                }
                payload.templates.push(template);
                payload.consent = consent;
                (dek, payload)
            }
            None => {
                let dek = random::<32>()?;
                // The key table first: a record must never exist without
                // its DEK (an entry without a record is harmless).
                w.put_table(b, self.table_with(&p, b, &dek)?);
                let payload = SubjectPayload {
                    consent,
                    templates: vec![template],
                };
                (dek, payload)
            }
        };
        let l = Loaded {
            dek,
            payload,
            state,
            sealed_payload: Vec::new(),
        };
        self.put_subject(&mut w, &p, b, &l, true)?;
        w.apply(&self.db)?;
        self.log(
            now,
            AuditEntry::new(AuditEvent::Enroll)
                .subject(&p)
                .outcome(AuditOutcome::Ok),
        )
    }

    /// Is `probe` the enrolled person? Returns [`Decision`] and nothing else.
    ///
    /// Errors: [`Error::NotEnrolled`] for an unknown or revoked subject;
    /// [`Error::PurposeNotConsented`]; [`Error::ConsentExpired`] or
    /// [`Error::RetentionExpired`] when the subject is past its deadline, in
    /// which case it is destroyed before this returns; [`Error::LockedOut`]
    /// during the wait after repeated failures; [`Error::VerificationDisabled`]
    /// after the hard limit. Every call is audited.
    pub fn verify(&self, subject: &str, purpose: &Purpose, probe: Embedding) -> Result<Decision> {
        check_subject(subject)?;
        let probe = probe.quantize(self.dim)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let now = self.clock.now();
        let (result, must_flush) =
            match self.verify_locked(&p, b, &key, purpose, &probe, now, &guard) {
                Ok((d, flush)) => (Ok(d), flush),
                Err(e) => (Err(e), false),
            };
        let outcome = match &result {
            Ok(Decision::Match) => AuditOutcome::Match,
            Ok(Decision::NoMatch) => AuditOutcome::NoMatch,
            Err(Error::LockedOut { .. }) => AuditOutcome::LockedOut,
            Err(Error::VerificationDisabled) => AuditOutcome::Disabled,
            Err(Error::ConsentExpired) => AuditOutcome::ConsentExpired,
            Err(Error::RetentionExpired) => AuditOutcome::RetentionExpired,
            Err(Error::PurposeNotConsented) => AuditOutcome::PurposeNotConsented,
            Err(Error::NotEnrolled) => AuditOutcome::NotEnrolled,
            Err(_) => AuditOutcome::Error,
        };
        self.log(
            now,
            AuditEntry::new(AuditEvent::Verify)
                .subject(&p)
                .purpose(purpose)
                .outcome(outcome),
        )?;
        if must_flush || self.durability == Durability::Immediate {
            self.flush()?;
        }
        result
    }

    /// Revoke `subject`: its records are removed durably, then (with
    /// [`ShredPolicy::Immediate`], the default) the KEK of its bucket is
    /// rotated so that no copy of the data files can be decrypted for it.
    /// After this returns the subject is unknown to every API; enrolling it
    /// again creates a new DEK.
    pub fn revoke(&self, subject: &str) -> Result<ShredReceipt> {
        check_subject(subject)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        if !self.db.records.contains_key(key)? {
            return Err(Error::NotEnrolled);
        }
        self.revoke_locked(b, &p, &guard)
    }

    /// Replace `subject`'s consent (new purposes, expiry, evidence). Counts
    /// as an interaction for the inactivity limit.
    pub fn renew_consent(&self, subject: &str, consent: Consent) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.clock.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        l.payload.consent = consent;
        l.state.last_interaction = now.unix_secs();
        let status = self.status(&l.payload.consent, &l.state);
        self.commit_subject(
            &p,
            b,
            &l,
            true,
            now,
            AuditEntry::new(AuditEvent::ConsentRenewed),
        )?;
        Ok(status)
    }

    /// Withdraw one purpose. Withdrawing the last purpose revokes the
    /// subject (and shreds it, under the immediate policy).
    pub fn withdraw_purpose(&self, subject: &str, purpose: &Purpose) -> Result<Withdrawal> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        if !l.payload.consent.withdraw(purpose) {
            return Err(Error::PurposeNotConsented);
        }
        let entry = AuditEntry::new(AuditEvent::PurposeWithdrawn).purpose(purpose);
        if l.payload.consent.purposes().next().is_none() {
            drop(l);
            self.log(now, entry.subject(&p).outcome(AuditOutcome::Ok))?;
            return self.revoke_locked(b, &p, &guard).map(Withdrawal::Revoked);
        }
        let remaining = l.payload.consent.purposes().cloned().collect();
        self.commit_subject(&p, b, &l, true, now, entry)?;
        Ok(Withdrawal::Remaining(remaining))
    }

    /// The subject's consent and deadlines. A subject past its deadline is
    /// destroyed and reported as expired.
    pub fn consent_status(&self, subject: &str) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let l = self.load_live(&p, b, &key, now, &guard)?;
        Ok(self.status(&l.payload.consent, &l.state))
    }

    /// Operator reset of a subject's failed-attempt counter (re-enables
    /// verification after the hard limit). Audited.
    pub fn reset_attempts(&self, subject: &str) -> Result<()> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        l.state.failures = 0;
        self.commit_subject(
            &p,
            b,
            &l,
            false,
            now,
            AuditEntry::new(AuditEvent::AttemptsReset),
        )
    }

    /// Destroy every subject past its deadline (consent expiry, or the
    /// inactivity limit after its last interaction). Visits only the
    /// subjects the retention index lists as due by today, rotates each
    /// affected bucket once, and is audited.
    ///
    /// Due buckets are handled in groups of up to 256 (each group one
    /// rotation: three syncs); groups share no bucket, so they run on up to
    /// four threads (at most the available parallelism). Every group is
    /// complete in itself: an error stops the sweep after the groups under
    /// way, and the groups done are done.
    pub fn sweep(&self) -> Result<SweepReport> {
        let started = Instant::now();
        let now = self.clock.now();
        let mut due: BTreeMap<u32, Vec<(Pseudonym, u32)>> = BTreeMap::new();
        let mut examined = 0;
        for (day, b, p) in self.due_index_entries(now)? {
            due.entry(b).or_default().push((p, day));
            examined += 1;
        }
        let due: Vec<DueBucket> = due.into_iter().collect();
        let groups: Vec<&[DueBucket]> = due.chunks(ROTATION_GROUP).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(SWEEP_THREADS)
            .min(groups.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let worker = || -> Result<(usize, usize)> {
            let (mut expired, mut rotated) = (0, 0);
            while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(group) = groups.get(i) else { break };
                match self.sweep_group(group, now) {
                    Ok((e, r)) => {
                        expired += e;
                        rotated += r;
                    }
                    Err(e) => {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok((expired, rotated))
        };
        let results: Vec<Result<(usize, usize)>> = if threads <= 1 {
            vec![worker()]
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = (0..threads).map(|_| sc.spawn(worker)).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        };
        let (mut expired, mut rotated) = (0, 0);
        for r in results {
            let (e, r) = r?;
            expired += e;
            rotated += r;
        }
        self.log(
            now,
            AuditEntry::new(AuditEvent::Sweep)
                .count(expired as u64)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        Ok(SweepReport {
            examined,
            expired,
            buckets_rotated: rotated,
            took: started.elapsed(),
        })
    }

    /// One group of a sweep: lock its buckets (ascending, so groups cannot
    /// deadlock with each other or with single-bucket operations), find the
    /// subjects really past their deadline, destroy them (one rotation for
    /// the group under immediate shredding) and audit each. Returns the
    /// subjects destroyed and the buckets rotated.
    fn sweep_group(&self, group: &[DueBucket], now: Timestamp) -> Result<(usize, usize)> {
        let guards: Vec<BucketGuard<'_>> = group.iter().map(|(b, _)| self.lock(*b)).collect();
        let mut work: Vec<(u32, Vec<(Pseudonym, AuditOutcome)>)> = Vec::new();
        for (b, candidates) in group {
            let doomed = self.sweep_bucket(*b, candidates, now)?;
            if !doomed.is_empty() {
                work.push((*b, doomed));
            }
        }
        let removals: Vec<(u32, Vec<Pseudonym>)> = work
            .iter()
            .map(|(b, d)| (*b, d.iter().map(|(p, _)| *p).collect()))
            .collect();
        let mut rotated = 0;
        match self.shred_policy {
            ShredPolicy::Immediate if !removals.is_empty() => {
                self.rotate_many(&removals, &guards.iter().collect::<Vec<_>>())?;
                rotated = removals.len();
            }
            ShredPolicy::Immediate => {}
            ShredPolicy::Deferred => {
                for (b, ps) in &removals {
                    self.remove_deferred(*b, ps)?;
                }
            }
        }
        let mut expired = 0;
        for (_, doomed) in &work {
            for (p, reason) in doomed {
                self.log(
                    now,
                    AuditEntry::new(AuditEvent::Expire)
                        .subject(p)
                        .outcome(*reason),
                )?;
            }
            expired += doomed.len();
        }
        Ok((expired, rotated))
    }

    /// Every retention-index entry (day, bucket, pseudonym) due by `now`'s day.
    fn due_index_entries(&self, now: Timestamp) -> Result<Vec<(u32, u32, Pseudonym)>> {
        let end = storage::deadline_scan_end(day_of(now.unix_secs()));
        let mut out = Vec::new();
        for kv in self.db.records.range(&[b'D'][..]..&end[..]) {
            let (k, _) = kv?;
            out.push(storage::parse_deadline_key(&k).ok_or(Error::tampered("retention index"))?);
        }
        Ok(out)
    }

    /// Which of a bucket's due candidates are past their deadline (caller
    /// holds the bucket's lock). Cleans up index entries a crash left.
    fn sweep_bucket(
        &self,
        b: u32,
        candidates: &[(Pseudonym, u32)],
        now: Timestamp,
    ) -> Result<Vec<(Pseudonym, AuditOutcome)>> {
        let mut doomed = Vec::new();
        for &(p, day) in candidates {
            let key = storage::subject_key(b, &p);
            let reason = match self.load_subject(&p, b, &key) {
                Ok(Some(l)) => {
                    let reason = self.overdue(&l, now);
                    if reason.is_none() {
                        self.drop_stale_index_entry(b, &p, day)?;
                    }
                    reason
                }
                Ok(None) => {
                    // A stale index entry: nothing to destroy.
                    let mut w = Writes::default();
                    self.remove_index(&mut w, b, &p)?;
                    w.remove(&storage::deadline_key(day, b, &p)[..]);
                    w.apply(&self.db)?;
                    None
                }
                // Listed as due and unreadable: nothing can be lost by removing it.
                Err(_) => Some(AuditOutcome::RetentionExpired),
            };
            if let Some(reason) = reason {
                doomed.push((p, reason));
            }
        }
        Ok(doomed)
    }

    /// How many subjects a [`Store::sweep`] run now would destroy, without
    /// destroying or writing anything (a dry run). Visits the same
    /// retention-index entries the sweep would.
    pub fn due(&self) -> Result<usize> {
        let now = self.clock.now();
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        for (_, b, p) in self.due_index_entries(now)? {
            if !seen.insert((b, p.0)) {
                continue;
            }
            let _guard = self.lock(b);
            match self.load_subject(&p, b, &storage::subject_key(b, &p)) {
                Ok(Some(l)) if self.overdue(&l, now).is_some() => n += 1,
                Ok(_) => {}
                Err(_) => n += 1,
            }
        }
        Ok(n)
    }

    /// Complete every pending shred (see [`ShredPolicy::Deferred`]). Returns
    /// the number of buckets rotated.
    pub fn shred(&self) -> Result<usize> {
        let mut n = 0;
        for group in self.db.pending_buckets()?.chunks(ROTATION_GROUP) {
            let guards: Vec<BucketGuard<'_>> = group.iter().map(|b| self.lock(*b)).collect();
            let mut work = Vec::new();
            for &b in group {
                if self.db.records.contains_key(storage::pending_key(b))? {
                    work.push((b, Vec::new()));
                }
            }
            if !work.is_empty() {
                self.rotate_many(&work, &guards.iter().collect::<Vec<_>>())?;
                n += work.len();
            }
        }
        if n > 0 {
            self.log(
                self.clock.now(),
                AuditEntry::new(AuditEvent::Shred)
                    .count(n as u64)
                    .outcome(AuditOutcome::Ok),
            )?;
            self.flush()?;
        }
        Ok(n)
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Counts describing the store (no template data; walks the record keys).
    pub fn stats(&self) -> Result<StoreStats> {
        let mut subjects = 0;
        for kv in self.db.records.scan_prefix([b'S']) {
            kv?;
            subjects += 1;
        }
        let (generation_min, generation_max) = self.keyring.generation_range();
        Ok(StoreStats {
            subjects,
            buckets: self.keyring.header().buckets,
            pending_shreds: self.db.pending_buckets()?.len(),
            generation_min,
            generation_max,
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    // ---- internals -------------------------------------------------------

    /// The verify steps that run under the bucket lock. Returns the
    /// decision and whether the state change must be flushed now.
    #[allow(clippy::too_many_arguments)]
    fn verify_locked(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        purpose: &Purpose,
        probe: &Template,
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<(Decision, bool)> {
        let l = self.load_live(p, b, key, now, guard)?;
        if !l.payload.consent.permits(purpose) {
            return Err(Error::PurposeNotConsented);
        }
        let st = l.state;
        if st.failures >= self.attempts.hard_limit {
            return Err(Error::VerificationDisabled);
        }
        if st.failures >= self.attempts.soft_limit {
            let until =
                Timestamp::from_unix_secs(st.last_failure).saturating_add(self.attempts.wait);
            if now < until {
                return Err(Error::LockedOut { until });
            }
        }
        let decision = matcher::decide(&l.payload.templates, probe, self.threshold);
        let mut next = st;
        match decision {
            Decision::Match => {
                next.failures = 0;
                // Day granularity: at most one write per subject per day.
                if day_of(now.unix_secs()) != day_of(st.last_interaction) {
                    next.last_interaction = now.unix_secs();
                }
            }
            Decision::NoMatch => {
                next.failures = st.failures.saturating_add(1);
                next.last_failure = now.unix_secs();
            }
        }
        if next != st {
            let mut w = Writes::default();
            self.put_subject(&mut w, p, b, &Loaded { state: next, ..l }, false)?;
            w.apply(&self.db)?;
        }
        // A failure must survive a crash: otherwise crashing the service
        // would reset the counter.
        Ok((decision, next.failures > st.failures))
    }

    /// Load a subject that must exist and be within its deadline; one past
    /// it is destroyed and its expiry returned as the error.
    fn load_live(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<Loaded> {
        let l = self.load_subject(p, b, key)?.ok_or(Error::NotEnrolled)?;
        if let Some(reason) = self.overdue(&l, now) {
            drop(l);
            self.destroy_expired(b, p, reason, guard)?;
            return Err(match reason {
                AuditOutcome::ConsentExpired => Error::ConsentExpired,
                _ => Error::RetentionExpired,
            });
        }
        Ok(l)
    }

    /// Why a subject is past its deadline at `now`, if it is.
    fn overdue(&self, l: &Loaded, now: Timestamp) -> Option<AuditOutcome> {
        if l.payload.consent.is_expired(now) {
            Some(AuditOutcome::ConsentExpired)
        } else if now >= self.inactivity_deadline(&l.state) {
            Some(AuditOutcome::RetentionExpired)
        } else {
            None
        }
    }

    fn inactivity_deadline(&self, state: &SubjectState) -> Timestamp {
        Timestamp::from_unix_secs(state.last_interaction).saturating_add(self.max_inactivity)
    }

    fn deadline(&self, consent: &Consent, state: &SubjectState) -> Timestamp {
        let expiry = consent.expiry().unwrap_or_default();
        expiry.min(self.inactivity_deadline(state))
    }

    fn status(&self, consent: &Consent, state: &SubjectState) -> ConsentStatus {
        ConsentStatus {
            purposes: consent.purposes().cloned().collect(),
            granted_at: consent.granted(),
            expires_at: consent.expiry().unwrap_or_default(),
            evidence: consent.evidence_digest().copied(),
            policy_version: consent.policy(),
            last_interaction: Timestamp::from_unix_secs(state.last_interaction),
            deadline: self.deadline(consent, state),
        }
    }

    fn destroy_expired(
        &self,
        b: u32,
        p: &Pseudonym,
        reason: AuditOutcome,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        self.destroy(b, &[*p], guard)?;
        self.log(
            self.clock.now(),
            AuditEntry::new(AuditEvent::Expire)
                .subject(p)
                .outcome(reason),
        )?;
        self.flush()?;
        Ok(())
    }

    /// Destroy a subject, then log and flush its revocation.
    fn revoke_locked(
        &self,
        b: u32,
        p: &Pseudonym,
        guard: &BucketGuard<'_>,
    ) -> Result<ShredReceipt> {
        let revoked_at = self.clock.now();
        let status = if self.destroy(b, &[*p], guard)? {
            ShredStatus::Shredded {
                at: self.clock.now(),
            }
        } else {
            ShredStatus::Pending
        };
        let outcome = match status {
            ShredStatus::Shredded { .. } => AuditOutcome::Shredded,
            ShredStatus::Pending => AuditOutcome::ShredPending,
        };
        self.log(
            revoked_at,
            AuditEntry::new(AuditEvent::Revoke)
                .subject(p)
                .outcome(outcome),
        )?;
        self.flush()?;
        Ok(ShredReceipt { revoked_at, status })
    }

    /// Remove subjects of bucket `b`, shredding them as the policy says.
    /// Returns whether the bucket's KEK was rotated. A rotation is durable
    /// when this returns; a deferred removal is made durable by the caller's
    /// flush, which also covers the audit entry it appends.
    fn destroy(&self, b: u32, ps: &[Pseudonym], guard: &BucketGuard<'_>) -> Result<bool> {
        match self.shred_policy {
            ShredPolicy::Immediate => {
                self.rotate_many(&[(b, ps.to_vec())], &[guard])?;
                Ok(true)
            }
            ShredPolicy::Deferred => {
                self.remove_deferred(b, ps)?;
                Ok(false)
            }
        }
    }

    /// Remove subjects of bucket `b` and mark the bucket's shred pending
    /// (caller holds the lock). Their key-table entries stay until the shred,
    /// which drops every entry without a record.
    fn remove_deferred(&self, b: u32, ps: &[Pseudonym]) -> Result<()> {
        // The marker first: a crash part-way through the removals must not
        // leave a removed subject without a pending shred.
        let mut w = Writes::default();
        w.insert(storage::pending_key(b).as_slice(), &[][..]);
        for p in ps {
            self.remove_subject(&mut w, b, p)?;
        }
        w.apply(&self.db)
    }

    /// Make everything written so far durable: queued audit entries into
    /// sled, then sled's log to disk.
    fn flush(&self) -> Result<()> {
        self.audit.inner().drain()?;
        self.db.db.flush()?;
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

    /// Finish what a crash interrupted: half-done rotations, and (with
    /// immediate shredding) revocations whose rotation never started.
    fn recover(&self) -> Result<()> {
        for b in self.keyring.interrupted() {
            let _guard = self.lock(b);
            self.complete_rotation(b)?;
        }
        if self.shred_policy == ShredPolicy::Immediate {
            self.shred()?;
        }
        Ok(())
    }

    fn lock(&self, b: u32) -> BucketGuard<'_> {
        // `b` comes from `Pseudonym::bucket(buckets)` or from a key the store
        // wrote; the modulo keeps a corrupted key from panicking.
        let m = &self.locks[b as usize % self.locks.len()];
        BucketGuard(m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn locate(&self, subject: &str) -> (Pseudonym, u32, [u8; 37]) {
        let p = self.keyring.pseudonym_key().pseudonym(subject.as_bytes());
        let b = p.bucket(self.keyring.header().buckets);
        (p, b, storage::subject_key(b, &p))
    }

    fn load(&self, key: &[u8]) -> Result<Option<SubjectRecord>> {
        match self.db.records.get(key)? {
            None => Ok(None),
            Some(v) => SubjectRecord::decode(&v).map(Some),
        }
    }

    /// Read and open a subject's record and state (caller holds the lock).
    fn load_subject(&self, p: &Pseudonym, b: u32, key: &[u8]) -> Result<Option<Loaded>> {
        let Some(rec) = self.load(key)? else {
            return Ok(None);
        };
        let table = self
            .db
            .keys
            .get(storage::key_table_key(b))?
            .ok_or(Error::tampered("bucket key table (missing)"))?;
        let (generation, wrapped) = DekTable::find(&table, p)?
            .ok_or(Error::tampered("bucket key table (no entry for a record)"))?;
        let dek = self.unwrap_dek(p, b, generation, &wrapped)?;
        let dek_key = AeadKey::new(&dek);
        let payload = self.open_payload(p, &dek_key, &rec)?;
        let plain = dek_key
            .open(&state_aad(&self.keyring.header().store_id, p), &rec.state)
            .map_err(|_| Error::tampered("subject state"))?;
        let state = SubjectState::decode(&plain)?;
        Ok(Some(Loaded {
            dek,
            payload,
            state,
            sealed_payload: rec.payload,
        }))
    }

    /// Queue the writes of a subject: its record (payload re-sealed when
    /// `reseal`, else kept as loaded; state always re-sealed) and its
    /// retention-index entry.
    ///
    /// Order (every prefix is a state the store handles): the new index
    /// entry first, so that the index never lists a subject later than its
    /// deadline; then the record, the index pointer, and last the removal of
    /// the old index entry. A crash can leave an index entry that no pointer
    /// names; [`Store::sweep`] removes it when it visits it.
    fn put_subject(
        &self,
        w: &mut Writes,
        p: &Pseudonym,
        b: u32,
        l: &Loaded,
        reseal: bool,
    ) -> Result<()> {
        let store_id = self.keyring.header().store_id;
        let key = AeadKey::new(&l.dek);
        let day = day_of(self.deadline(&l.payload.consent, &l.state).unix_secs());
        let ptr = storage::deadline_ptr_key(b, p);
        let old = self.db.records.get(ptr)?.as_deref().and_then(be_u32);
        if old != Some(day) {
            w.insert(&storage::deadline_key(day, b, p)[..], &[][..]);
        }
        let payload = if reseal || l.sealed_payload.is_empty() {
            key.seal(&payload_aad(&store_id, p), &l.payload.encode()?)?
        } else {
            l.sealed_payload.clone()
        };
        let rec = SubjectRecord {
            payload,
            state: key.seal(&state_aad(&store_id, p), &l.state.encode()?)?,
        };
        w.insert(&storage::subject_key(b, p)[..], rec.encode());
        if old != Some(day) {
            w.insert(&ptr[..], &day.to_be_bytes()[..]);
            if let Some(old) = old {
                w.remove(&storage::deadline_key(old, b, p)[..]);
            }
        }
        Ok(())
    }

    /// Write a subject durably with its audit entry: its writes, the entry,
    /// one flush.
    fn commit_subject(
        &self,
        p: &Pseudonym,
        b: u32,
        l: &Loaded,
        reseal: bool,
        now: Timestamp,
        entry: AuditEntry,
    ) -> Result<()> {
        let mut w = Writes::default();
        self.put_subject(&mut w, p, b, l, reseal)?;
        w.apply(&self.db)?;
        self.log(now, entry.subject(p).outcome(AuditOutcome::Ok))?;
        self.flush()
    }

    /// A live subject listed under `day` whose index pointer names another
    /// day: the entry was left by a crash between the writes of
    /// [`Store::put_subject`]; remove it.
    fn drop_stale_index_entry(&self, b: u32, p: &Pseudonym, day: u32) -> Result<()> {
        let ptr = self.db.records.get(storage::deadline_ptr_key(b, p))?;
        if matches!(ptr.as_deref().and_then(be_u32), Some(d) if d != day) {
            self.db
                .records
                .remove(&storage::deadline_key(day, b, p)[..])?;
        }
        Ok(())
    }

    /// Queue removal of the retention-index pointer, then of the entry it
    /// names (in that order: a pointer must never name a missing entry).
    fn remove_index(&self, w: &mut Writes, b: u32, p: &Pseudonym) -> Result<()> {
        let ptr = storage::deadline_ptr_key(b, p);
        let day = self.db.records.get(ptr)?.as_deref().and_then(be_u32);
        w.remove(&ptr[..]);
        if let Some(day) = day {
            w.remove(&storage::deadline_key(day, b, p)[..]);
        }
        Ok(())
    }

    /// Queue removal of everything stored for a subject, the record first
    /// (once it is gone, the subject is unknown; what follows is cleanup).
    fn remove_subject(&self, w: &mut Writes, b: u32, p: &Pseudonym) -> Result<()> {
        w.remove(&storage::subject_key(b, p)[..]);
        self.remove_index(w, b, p)
    }

    fn unwrap_dek(
        &self,
        p: &Pseudonym,
        b: u32,
        generation: u64,
        wrapped: &[u8; WRAPPED_DEK_LEN],
    ) -> Result<Zeroizing<[u8; 32]>> {
        let aad = dek_aad(&self.keyring.header().store_id, p, b, generation);
        match self
            .keyring
            .with_kek(b, generation, |kek| kek.open(&aad, wrapped))?
        {
            Kek::Found(Ok(dek)) if dek.len() == 32 => {
                let mut out = Zeroizing::new([0u8; 32]);
                out.copy_from_slice(&dek);
                Ok(out)
            }
            Kek::Found(_) => Err(Error::tampered("wrapped data key")),
            Kek::Shredded => Err(Error::KeyUnavailable {
                what: "the key that wrapped this record was shredded",
            }),
            Kek::Unknown => Err(Error::tampered("bucket key table (key generation)")),
        }
    }

    fn wrap_dek(
        &self,
        p: &Pseudonym,
        b: u32,
        dek: &[u8; 32],
    ) -> Result<(u64, [u8; WRAPPED_DEK_LEN])> {
        let store_id = self.keyring.header().store_id;
        self.keyring.with_newest(b, |gen, kek| {
            let sealed = kek.seal(&dek_aad(&store_id, p, b, gen), dek)?;
            Ok((gen, to_wrapped(&sealed)?))
        })?
    }

    /// The bucket's key table with `p`'s entry set to `dek`, wrapped under
    /// the newest KEK.
    fn table_with(&self, p: &Pseudonym, b: u32, dek: &[u8; 32]) -> Result<Vec<u8>> {
        let (generation, wrapped) = self.wrap_dek(p, b, dek)?;
        let mut table = match self.db.keys.get(storage::key_table_key(b))? {
            Some(v) => DekTable::decode(&v)?,
            None => DekTable::new(generation),
        };
        if table.generation != generation {
            return Err(Error::tampered("bucket key table (generation)"));
        }
        table.put(p, wrapped);
        Ok(table.encode())
    }

    fn open_payload(
        &self,
        p: &Pseudonym,
        dek: &AeadKey,
        rec: &SubjectRecord,
    ) -> Result<SubjectPayload> {
        let aad = payload_aad(&self.keyring.header().store_id, p);
        let plain = dek
            .open(&aad, &rec.payload)
            .map_err(|_| Error::tampered("subject payload"))?;
        SubjectPayload::decode(&plain, self.dim)
    }

    /// Rotate the KEKs of distinct buckets, each locked by the caller,
    /// removing the listed subjects of each first. Three syncs for the whole
    /// group: the new KEK slots, sled's log, the old slots zeroed.
    ///
    /// Order: the keyring syncs the new slots before any sled write, so from
    /// then on a crash is completed on open ([`Store::recover`]); then the
    /// removals, each bucket's re-wrapped key table, and the pending markers.
    fn rotate_many(
        &self,
        work: &[(u32, Vec<Pseudonym>)],
        _guards: &[&BucketGuard<'_>],
    ) -> Result<()> {
        for (b, _) in work {
            if self.keyring.is_rotating(*b)? {
                self.complete_rotation(*b)?;
            }
        }
        let buckets: Vec<u32> = work.iter().map(|(b, _)| *b).collect();
        let gens = self.keyring.begin_rotations(&buckets)?;
        let mut w = Writes::default();
        let mut tables = Vec::with_capacity(work.len());
        for ((b, remove), &gen) in work.iter().zip(&gens) {
            // A bucket with a pending shred may hold entries of subjects a
            // deferred revocation removed: drop every entry without a record.
            let thorough = self.db.records.contains_key(storage::pending_key(*b))?;
            for p in remove {
                self.remove_subject(&mut w, *b, p)?;
            }
            tables.push((*b, self.rewrap_table(*b, gen, remove, thorough)?));
        }
        for (b, table) in tables {
            if let Some(t) = table {
                w.put_table(b, t);
            }
            w.remove(storage::pending_key(b).as_slice());
        }
        w.apply(&self.db)?;
        failpoint::hit("rotation:batch-applied");
        let now = self.clock.now();
        for (&b, &gen) in buckets.iter().zip(&gens) {
            self.log(
                now,
                AuditEntry::new(AuditEvent::KeyRotation)
                    .rotation(b, gen)
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        self.flush()?;
        failpoint::hit("rotation:batch-flushed");
        self.keyring.finish_rotations(&buckets)
    }

    /// Finish a rotation whose new KEK is already in the keyring (after a
    /// crash): re-wrap the key table under it, dropping entries that have no
    /// record (a removal the crash interrupted), then zero the old slot.
    fn complete_rotation(&self, b: u32) -> Result<()> {
        let newest = self.keyring.with_newest(b, |g, _| g)?;
        if let Some(t) = self.rewrap_table(b, newest, &[], true)? {
            self.db.keys.insert(storage::key_table_key(b), t)?;
        }
        self.log(
            self.clock.now(),
            AuditEntry::new(AuditEvent::KeyRotation)
                .rotation(b, newest)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        self.keyring.finish_rotation(b)
    }

    /// Bucket `b`'s key table re-wrapped under `new_gen`, without the entries
    /// of `remove` (and, if `thorough`, without entries that have no record).
    /// `None` if the bucket has no table or it cannot be parsed: it is left
    /// as it is. An entry that cannot be unwrapped (tampered, or under a
    /// shredded key) is dropped: it was unreadable before and stays so, and
    /// it must not block a revocation.
    fn rewrap_table(
        &self,
        b: u32,
        new_gen: u64,
        remove: &[Pseudonym],
        thorough: bool,
    ) -> Result<Option<Vec<u8>>> {
        let Some(v) = self.db.keys.get(storage::key_table_key(b))? else {
            return Ok(None);
        };
        let Ok(table) = DekTable::decode(&v) else {
            return Ok(None);
        };
        let store_id = self.keyring.header().store_id;
        let mut keep = Vec::with_capacity(table.entries.len());
        for (p, wrapped) in &table.entries {
            let p = Pseudonym(*p);
            if remove.contains(&p)
                || (thorough && !self.db.records.contains_key(storage::subject_key(b, &p))?)
            {
                continue;
            }
            keep.push((p, wrapped));
        }
        let old = table.generation;
        let deks: Vec<(Pseudonym, Zeroizing<Vec<u8>>)> =
            match self.keyring.with_kek(b, old, |kek| {
                keep.iter()
                    .filter_map(|(p, w)| {
                        kek.open(&dek_aad(&store_id, p, b, old), &w[..])
                            .ok()
                            .filter(|d| d.len() == 32)
                            .map(|d| (*p, d))
                    })
                    .collect()
            })? {
                Kek::Found(d) => d,
                Kek::Shredded | Kek::Unknown => Vec::new(),
            };
        let nonces = crate::crypto::random_nonces(deks.len())?;
        let rewrapped = match self.keyring.with_kek(b, new_gen, |kek| {
            let mut out = DekTable::new(new_gen);
            for ((p, dek), nonce) in deks.iter().zip(&nonces) {
                let sealed = kek.seal_with_nonce(nonce, &dek_aad(&store_id, p, b, new_gen), dek)?;
                out.entries.push((p.0, to_wrapped(&sealed)?));
            }
            Ok::<_, Error>(out)
        })? {
            Kek::Found(t) => t?,
            _ => return Err(Error::tampered("keyring rotation state")),
        };
        Ok(Some(rewrapped.encode()))
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
    }
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

/// Crate-internal access for the forensics unit test.
#[cfg(test)]
impl Store {
    pub(crate) fn test_dek(&self, subject: &str) -> Result<Zeroizing<[u8; 32]>> {
        let (p, b, key) = self.locate(subject);
        let _g = self.lock(b);
        Ok(self
            .load_subject(&p, b, &key)?
            .ok_or(Error::NotEnrolled)?
            .dek)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, RootKey, Threshold};

    const DIM: usize = 8;

    fn config(dir: &Path, policy: ShredPolicy) -> StoreConfig {
        StoreConfig::new(dir, RootKey::from_bytes([9; 32]))
            .model("m", DIM)
            .threshold(Threshold::cosine(0.9))
            .buckets(1)
            .shred_policy(policy)
            .clock(ManualClock::new(Timestamp::from_unix_secs(1_000)))
    }

    fn vec_for(i: usize) -> Vec<f32> {
        (0..DIM)
            .map(|j| {
                if j == i % DIM {
                    1.0
                } else {
                    0.05 * (i / DIM) as f32
                }
            })
            .collect()
    }

    fn populate(store: &Store, n: usize) {
        for i in 0..n {
            let c = Consent::new([Purpose::IDENTITY_VERIFICATION])
                .expires_at(Timestamp::from_unix_secs(99_999))
                .evidence([1; 32]);
            store
                .enroll(&format!("s{i}"), Embedding::new(vec_for(i)), c)
                .expect("enroll");
        }
    }

    fn all_match(store: &Store, n: usize) {
        match_each(store, 0..n);
    }

    /// Every subject `s{i}` for `i` in `ids` matches its own vector.
    fn match_each(store: &Store, ids: impl IntoIterator<Item = usize>) {
        for i in ids {
            let d = store
                .verify(
                    &format!("s{i}"),
                    &Purpose::IDENTITY_VERIFICATION,
                    Embedding::new(vec_for(i)),
                )
                .expect("verify");
            assert_eq!(d, Decision::Match, "s{i}");
        }
    }

    fn keyring_slot_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let k = std::fs::read(dir.join(KEYRING_FILE)).expect("read");
        (k[512..640].to_vec(), k[640..768].to_vec())
    }

    /// Crash right after the new KEK slot was synced: on reopen the rotation
    /// is completed (every DEK re-wrapped, old slot zeroed) before anything else.
    #[test]
    fn rotation_interrupted_after_new_slot_is_completed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
            populate(&store, 6);
            assert_eq!(store.keyring.begin_rotation(0).expect("begin"), 2);
            // "crash": drop without finishing
        }
        let (a, b) = keyring_slot_bytes(dir.path());
        assert!(
            a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0),
            "both slots live"
        );
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
        let (a, _) = keyring_slot_bytes(dir.path());
        assert!(a.iter().all(|&x| x == 0), "old slot zeroed on open");
        let s = store.stats().expect("stats");
        assert_eq!((s.generation_min, s.generation_max), (2, 2));
        all_match(&store, 6);
        let table = store
            .db
            .keys
            .get(storage::key_table_key(0))
            .expect("read")
            .expect("table");
        let table = DekTable::decode(&table).expect("decode");
        assert_eq!((table.generation, table.entries.len()), (2, 6));
    }

    /// Crash after the re-wrap batch was flushed but before the old slot was
    /// zeroed.
    #[test]
    fn rotation_interrupted_before_zeroing_is_completed_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
            populate(&store, 6);
            let g = store.keyring.begin_rotation(0).expect("begin");
            let t = store
                .rewrap_table(0, g, &[], false)
                .expect("rewrap")
                .expect("table");
            store
                .db
                .keys
                .insert(storage::key_table_key(0), t)
                .expect("insert");
            store.db.db.flush().expect("flush");
        }
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
        assert!(keyring_slot_bytes(dir.path()).0.iter().all(|&x| x == 0));
        assert!(!store.keyring.is_rotating(0).expect("state"));
        all_match(&store, 6);
    }

    /// A deferred revocation left pending is shredded on open once the store
    /// runs with immediate shredding.
    #[test]
    fn pending_shred_runs_on_open_with_immediate_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("open");
            populate(&store, 3);
            assert_eq!(
                store.revoke("s1").expect("revoke").status,
                ShredStatus::Pending
            );
        }
        {
            let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("reopen");
            assert_eq!(
                store.stats().expect("stats").pending_shreds,
                1,
                "deferred stays pending"
            );
        }
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
        let s = store.stats().expect("stats");
        assert_eq!((s.pending_shreds, s.generation_max, s.subjects), (0, 2, 2));
    }

    /// A crash between the writes of `put_subject` can leave a retention
    /// entry under a day the subject's pointer does not name. The sweep that
    /// visits it removes it and leaves the subject alone; an entry with no
    /// subject at all is removed too.
    #[test]
    fn sweep_removes_index_entries_left_by_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate).clock(clock.clone()))
            .expect("open");
        populate(&store, 2);
        let (p, b, _) = store.locate("s0");
        let ghost = Pseudonym([7; 32]);
        // As a crash would leave them: a stale entry for a live subject (day 0,
        // its pointer names the day of its deadline) and one for no subject.
        for k in [
            storage::deadline_key(0, b, &p),
            storage::deadline_key(0, b, &ghost),
        ] {
            store.db.records.insert(k, &[][..]).expect("insert");
        }
        let report = store.sweep().expect("sweep");
        assert_eq!((report.examined, report.expired), (2, 0));
        for k in [
            storage::deadline_key(0, b, &p),
            storage::deadline_key(0, b, &ghost),
        ] {
            assert!(!store.db.records.contains_key(k).expect("read"));
        }
        let day = day_of(99_999);
        assert!(store
            .db
            .records
            .contains_key(storage::deadline_key(day, b, &p))
            .expect("read"));
        assert_eq!(store.sweep().expect("sweep").examined, 0);
        all_match(&store, 2);
    }

    fn table_of(store: &Store, b: u32) -> DekTable {
        let v = store
            .db
            .keys
            .get(storage::key_table_key(b))
            .expect("read")
            .expect("table");
        DekTable::decode(&v).expect("decode")
    }

    /// A deferred revocation leaves the subject's key-table entry until the
    /// shred, which drops it (no record) while re-wrapping the rest.
    #[test]
    fn deferred_shred_drops_the_revoked_entry_from_the_key_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("open");
        populate(&store, 3);
        store.revoke("s1").expect("revoke");
        let t = table_of(&store, 0);
        assert_eq!((t.generation, t.entries.len()), (1, 3));
        assert_eq!(store.shred().expect("shred"), 1);
        let t = table_of(&store, 0);
        assert_eq!((t.generation, t.entries.len()), (2, 2));
        let (p1, _, _) = store.locate("s1");
        assert!(t.entries.iter().all(|(p, _)| *p != p1.0));
    }

    /// A crash after a rotation removed a record but before it wrote the
    /// bucket's new key table: recovery drops the orphaned entry instead of
    /// re-wrapping it under the new KEK (which would keep the removed
    /// subject's DEK alive).
    #[test]
    fn recovery_drops_entries_whose_record_was_removed_before_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p1 = {
            let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
            populate(&store, 3);
            let (p1, b, key) = store.locate("s1");
            store.keyring.begin_rotation(b).expect("begin");
            store.db.records.remove(key).expect("remove");
            p1
            // "crash": drop with the rotation unfinished
        };
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
        let t = table_of(&store, 0);
        assert_eq!((t.generation, t.entries.len()), (2, 2));
        assert!(t.entries.iter().all(|(p, _)| *p != p1.0));
        assert!(matches!(
            store.verify(
                "s1",
                &Purpose::IDENTITY_VERIFICATION,
                Embedding::new(vec_for(1))
            ),
            Err(Error::NotEnrolled)
        ));
        match_each(&store, [0, 2]);
    }

    #[test]
    fn re_enrollment_after_revocation_gets_a_new_dek() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
        populate(&store, 1);
        let first = store.test_dek("s0").expect("dek");
        store.revoke("s0").expect("revoke");
        populate(&store, 1);
        let second = store.test_dek("s0").expect("dek");
        assert_ne!(*first, *second);
    }

    /// The flusher drains the audit queue when it reaches the wake mark,
    /// long before its interval, so that callers do not seal and MAC
    /// entries themselves.
    #[test]
    fn a_filling_audit_queue_wakes_the_flusher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate).durability(
            Durability::GroupCommit {
                interval: std::time::Duration::from_secs(60),
            },
        ))
        .expect("open");
        populate(&store, 1);
        let verify = || {
            let d = store.verify(
                "s0",
                &Purpose::IDENTITY_VERIFICATION,
                Embedding::new(vec_for(0)),
            );
            assert_eq!(d.expect("verify"), Decision::Match);
        };
        let stored = store.db.audit.len();
        for _ in 1..crate::audit::WAKE_AT {
            verify();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            store.db.audit.len(),
            stored,
            "nothing drains below the mark"
        );
        verify();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.db.audit.len() == stored && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            store.db.audit.len() > stored,
            "the flusher drained at the mark"
        );
    }
}
