//! [`Store`]: the facade. Enroll, verify, revoke, shred.

use crate::clock::{Clock, Timestamp};
use crate::config::{ShredPolicy, StoreConfig};
use crate::consent::{Consent, Purpose};
use crate::crypto::aead::AeadKey;
use crate::crypto::keyring::{Kek, Keyring};
use crate::crypto::pseudonym::Pseudonym;
use crate::crypto::random;
use crate::embedding::Embedding;
use crate::error::{Error, Result};
use crate::failpoint;
use crate::matcher::{self, Decision};
use crate::storage::record::{dek_aad, payload_aad, WRAPPED_DEK_LEN};
use crate::storage::{self, Db, SubjectPayload, SubjectRecord};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use zeroize::Zeroizing;

const KEYRING_FILE: &str = "keyring";
const DB_DIR: &str = "db";
const MAX_SUBJECT_LEN: usize = 1024;

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
    dim: usize,
    threshold: i64,
    max_templates: usize,
    shred_policy: ShredPolicy,
    clock: Arc<dyn Clock>,
    max_consent_lifetime: Duration,
    /// One mutation lock per bucket: enroll, revoke and rotation of a bucket
    /// are serialised; verify takes none.
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

/// Proof that the caller holds a bucket's mutation lock.
struct BucketGuard<'a>(#[allow(dead_code)] MutexGuard<'a, ()>);

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
        let db = Db::open(&dbpath)?;
        match db.store_id()? {
            Some(id) if id == h.store_id => {}
            Some(_) => return Err(Error::StoreMismatch),
            None if !db.records.is_empty() => return Err(Error::StoreMismatch),
            None => db.set_store_id(&h.store_id)?,
        }
        let buckets = h.buckets;
        let store = Store {
            dir,
            db,
            keyring,
            dim,
            threshold: threshold.fixed(),
            max_templates: config.max_templates,
            shred_policy: config.shred,
            clock: config.clock,
            max_consent_lifetime: config.max_consent_lifetime,
            locks: (0..buckets).map(|_| Mutex::new(())).collect(),
        };
        store.recover()?;
        Ok(store)
    }

    /// Enroll a template for `subject` under `consent`. The consent must name
    /// at least one purpose and an expiry in the future (within the store's
    /// maximum lifetime); it replaces any consent the subject held. A subject
    /// may hold up to the configured number of templates. Durable when it
    /// returns.
    pub fn enroll(&self, subject: &str, embedding: Embedding, consent: Consent) -> Result<()> {
        check_subject(subject)?;
        let template = embedding.quantize(self.dim)?;
        let now = self.clock.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut existing = None;
        if let Some(rec) = self.load(&key)? {
            let dek = self.unwrap_dek(&p, b, &rec)?;
            let payload = self.open_payload(&p, &dek, &rec)?;
            if payload.consent.is_expired(now) {
                // Past its consent: destroy it, then enroll afresh.
                self.rotate(b, Some(&key), &guard)?;
            } else {
                existing = Some((rec, dek, payload));
            }
        }
        let record = match existing {
            Some((rec, dek, mut payload)) => {
                if payload.templates.len() >= self.max_templates {
                    return Err(Error::TooManyTemplates {
                        max: self.max_templates,
                    });
                }
                payload.templates.push(template);
                payload.consent = consent;
                SubjectRecord {
                    payload: self.seal_payload(&p, &dek, &payload)?,
                    ..rec
                }
            }
            None => {
                let dek = random::<32>()?;
                let (generation, wrapped_dek) = self.wrap_dek(&p, b, &dek)?;
                let payload = SubjectPayload {
                    consent,
                    templates: vec![template],
                };
                SubjectRecord {
                    generation,
                    wrapped_dek,
                    payload: self.seal_payload(&p, &dek, &payload)?,
                }
            }
        };
        self.db.records.insert(key, record.encode())?;
        self.db.db.flush()?;
        Ok(())
    }

    /// Is `probe` the enrolled person? Returns [`Decision`] and nothing else.
    ///
    /// Fails with [`Error::NotEnrolled`] for an unknown or revoked subject,
    /// [`Error::PurposeNotConsented`] when `purpose` is not consented, and
    /// [`Error::ConsentExpired`] when the consent has expired, in which case
    /// the subject is revoked and shredded before this returns.
    pub fn verify(&self, subject: &str, purpose: &Purpose, probe: Embedding) -> Result<Decision> {
        check_subject(subject)?;
        let probe = probe.quantize(self.dim)?;
        let (p, b, key) = self.locate(subject);
        let (rec, dek) = self.load_unwrapped(&p, b, &key)?;
        let payload = self.open_payload(&p, &dek, &rec)?;
        if payload.consent.is_expired(self.clock.now()) {
            drop(payload);
            self.expire(&p, b, &key)?;
            return Err(Error::ConsentExpired);
        }
        if !payload.consent.permits(purpose) {
            return Err(Error::PurposeNotConsented);
        }
        Ok(matcher::decide(&payload.templates, &probe, self.threshold))
    }

    /// Revoke `subject`: its records are removed durably, then (with
    /// [`ShredPolicy::Immediate`], the default) the KEK of its bucket is
    /// rotated so that no copy of the data files can be decrypted for it.
    /// After this returns the subject is unknown to every API; enrolling it
    /// again creates a new DEK.
    pub fn revoke(&self, subject: &str) -> Result<ShredReceipt> {
        check_subject(subject)?;
        let (_, b, key) = self.locate(subject);
        let guard = self.lock(b);
        if !self.db.records.contains_key(key)? {
            return Err(Error::NotEnrolled);
        }
        let revoked_at = self.clock.now();
        let status = match self.shred_policy {
            ShredPolicy::Immediate => {
                self.rotate(b, Some(&key), &guard)?;
                ShredStatus::Shredded {
                    at: self.clock.now(),
                }
            }
            ShredPolicy::Deferred => {
                let mut batch = sled::Batch::default();
                batch.remove(key.as_slice());
                batch.insert(storage::pending_key(b).as_slice(), &[][..]);
                self.db.records.apply_batch(batch)?;
                self.db.db.flush()?;
                ShredStatus::Pending
            }
        };
        Ok(ShredReceipt { revoked_at, status })
    }

    /// Complete every pending shred (see [`ShredPolicy::Deferred`]). Returns
    /// the number of buckets rotated.
    pub fn shred(&self) -> Result<usize> {
        let mut n = 0;
        for b in self.db.pending_buckets()? {
            let guard = self.lock(b);
            if self.db.records.contains_key(storage::pending_key(b))? {
                self.rotate(b, None, &guard)?;
                n += 1;
            }
        }
        Ok(n)
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

    /// Finish what a crash interrupted: half-done rotations, and (with
    /// immediate shredding) revocations whose rotation never started.
    fn recover(&self) -> Result<()> {
        for b in self.keyring.interrupted() {
            let guard = self.lock(b);
            self.complete_rotation(b, &guard)?;
        }
        if self.shred_policy == ShredPolicy::Immediate {
            self.shred()?;
        }
        Ok(())
    }

    fn lock(&self, b: u32) -> BucketGuard<'_> {
        // `b` comes from `Pseudonym::bucket(buckets)` or from a marker the
        // store wrote; the modulo keeps a corrupted marker from panicking.
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

    /// Load a record and unwrap its DEK. If a concurrent rotation re-wrapped
    /// the record between the read and the key lookup, its generation has
    /// moved on: read it again (a few times at most). If the generation did
    /// not move, the key really is gone.
    fn load_unwrapped(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
    ) -> Result<(SubjectRecord, Zeroizing<[u8; 32]>)> {
        self.load_unwrapped_with(p, b, key, &mut || Ok(()))
    }

    /// `load_unwrapped`, calling `between` after each read: tests use it to
    /// rotate the bucket exactly inside the race window.
    fn load_unwrapped_with(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        between: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(SubjectRecord, Zeroizing<[u8; 32]>)> {
        let mut last_gen = None;
        for _ in 0..8 {
            let rec = self.load(key)?.ok_or(Error::NotEnrolled)?;
            between()?;
            match self.unwrap_dek(p, b, &rec) {
                Err(Error::KeyUnavailable { .. }) if last_gen != Some(rec.generation) => {
                    last_gen = Some(rec.generation);
                }
                r => return r.map(|dek| (rec, dek)),
            }
        }
        Err(Error::KeyUnavailable {
            what: "the record's key kept changing under concurrent rotations",
        })
    }

    fn unwrap_dek(
        &self,
        p: &Pseudonym,
        b: u32,
        rec: &SubjectRecord,
    ) -> Result<Zeroizing<[u8; 32]>> {
        let aad = dek_aad(&self.keyring.header().store_id, p, b, rec.generation);
        match self
            .keyring
            .with_kek(b, rec.generation, |kek| kek.open(&aad, &rec.wrapped_dek))?
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
            Kek::Unknown => Err(Error::tampered("subject record (key generation)")),
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
            let mut w = [0u8; WRAPPED_DEK_LEN];
            if sealed.len() != WRAPPED_DEK_LEN {
                return Err(Error::tampered("wrapped data key"));
            }
            w.copy_from_slice(&sealed);
            Ok((gen, w))
        })?
    }

    fn open_payload(
        &self,
        p: &Pseudonym,
        dek: &[u8; 32],
        rec: &SubjectRecord,
    ) -> Result<SubjectPayload> {
        let aad = payload_aad(&self.keyring.header().store_id, p);
        let plain = AeadKey::new(dek)
            .open(&aad, &rec.payload)
            .map_err(|_| Error::tampered("subject payload"))?;
        SubjectPayload::decode(&plain, self.dim)
    }

    fn seal_payload(
        &self,
        p: &Pseudonym,
        dek: &[u8; 32],
        payload: &SubjectPayload,
    ) -> Result<Vec<u8>> {
        let plain = payload.encode()?;
        AeadKey::new(dek).seal(&payload_aad(&self.keyring.header().store_id, p), &plain)
    }

    /// Revoke a subject found expired, unless it changed since it was read.
    fn expire(&self, p: &Pseudonym, b: u32, key: &[u8]) -> Result<()> {
        let guard = self.lock(b);
        let Some(rec) = self.load(key)? else {
            return Ok(());
        };
        let dek = self.unwrap_dek(p, b, &rec)?;
        if self
            .open_payload(p, &dek, &rec)?
            .consent
            .is_expired(self.clock.now())
        {
            self.rotate(b, Some(key), &guard)?;
        }
        Ok(())
    }

    /// Rotate bucket `b`'s KEK, removing `remove` in the same atomic batch
    /// that re-wraps the bucket's other DEKs. Three syncs: new KEK slot,
    /// sled batch, old slot zeroed.
    fn rotate(&self, b: u32, remove: Option<&[u8]>, guard: &BucketGuard<'_>) -> Result<()> {
        if self.keyring.is_rotating(b)? {
            self.complete_rotation(b, guard)?;
        }
        let new_gen = self.keyring.begin_rotation(b)?;
        let mut batch = sled::Batch::default();
        if let Some(k) = remove {
            batch.remove(k);
        }
        batch.remove(storage::pending_key(b).as_slice());
        self.rewrap_into(&mut batch, b, new_gen, remove)?;
        self.db.records.apply_batch(batch)?;
        failpoint::hit("rotation:batch-applied");
        self.db.db.flush()?;
        failpoint::hit("rotation:batch-flushed");
        self.keyring.finish_rotation(b)
    }

    /// Finish a rotation whose new KEK is already in the keyring.
    fn complete_rotation(&self, b: u32, _guard: &BucketGuard<'_>) -> Result<()> {
        let newest = self.keyring.with_newest(b, |g, _| g)?;
        let mut batch = sled::Batch::default();
        self.rewrap_into(&mut batch, b, newest, None)?;
        self.db.records.apply_batch(batch)?;
        self.db.db.flush()?;
        self.keyring.finish_rotation(b)
    }

    /// Queue re-wraps of every DEK in bucket `b` not yet under `new_gen`.
    /// A record that cannot be opened (tampered, or already under a shredded
    /// key) is left as it is: it was unreadable before and stays so, and it
    /// must not block a revocation.
    fn rewrap_into(
        &self,
        batch: &mut sled::Batch,
        b: u32,
        new_gen: u64,
        skip: Option<&[u8]>,
    ) -> Result<()> {
        let store_id = self.keyring.header().store_id;
        for kv in self.db.records.scan_prefix(storage::bucket_prefix(b)) {
            let (k, v) = kv?;
            if skip == Some(&k[..]) {
                continue;
            }
            let Some((_, p)) = storage::parse_subject_key(&k) else {
                continue;
            };
            let Ok(rec) = SubjectRecord::decode(&v) else {
                continue;
            };
            if rec.generation == new_gen {
                continue;
            }
            let Ok(dek) = self.unwrap_dek(&p, b, &rec) else {
                continue;
            };
            let aad = dek_aad(&store_id, &p, b, new_gen);
            let sealed = match self
                .keyring
                .with_kek(b, new_gen, |kek| kek.seal(&aad, dek.as_ref()))?
            {
                Kek::Found(s) => s?,
                _ => return Err(Error::tampered("keyring rotation state")),
            };
            let mut wrapped_dek = [0u8; WRAPPED_DEK_LEN];
            if sealed.len() != WRAPPED_DEK_LEN {
                return Err(Error::tampered("wrapped data key"));
            }
            wrapped_dek.copy_from_slice(&sealed);
            let new = SubjectRecord {
                generation: new_gen,
                wrapped_dek,
                payload: rec.payload,
            };
            batch.insert(&k[..], new.encode());
        }
        Ok(())
    }
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
        self.load_unwrapped(&p, b, &key).map(|(_, d)| d)
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
                .expires_at(Timestamp::from_unix_secs(99_999));
            store
                .enroll(&format!("s{i}"), Embedding::new(vec_for(i)), c)
                .expect("enroll");
        }
    }

    fn all_match(store: &Store, n: usize) {
        for i in 0..n {
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
        for kv in store.db.records.scan_prefix([b'S']) {
            let (_, v) = kv.expect("kv");
            assert_eq!(SubjectRecord::decode(&v).expect("decode").generation, 2);
        }
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
            let mut batch = sled::Batch::default();
            store.rewrap_into(&mut batch, 0, g, None).expect("rewrap");
            store.db.records.apply_batch(batch).expect("apply");
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

    /// A rotation that completes between reading a record and looking up
    /// its KEK must not fail the verify: the record is read again.
    #[test]
    fn verify_survives_rotations_inside_the_race_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
        populate(&store, 2);
        let (p, b, key) = store.locate("s0");
        for rotations_in_window in [1, 3, 7] {
            let mut left = rotations_in_window;
            let r = store.load_unwrapped_with(&p, b, &key, &mut || {
                if left > 0 {
                    left -= 1;
                    let g = store.lock(b);
                    store.rotate(b, None, &g)?;
                }
                Ok(())
            });
            assert!(r.is_ok(), "{rotations_in_window} rotations: {:?}", r.err());
        }
        all_match(&store, 2);
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
}
