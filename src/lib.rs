//! # bioseal
//!
//! Consent-enforcing, crypto-shredding storage for face-embedding templates.
//!
//! A verification service links bioseal in, enrolls a person's embedding
//! under that person's consent, and later asks one question: *is this new
//! embedding the same person?* The answer is [`Decision::Match`] or
//! [`Decision::NoMatch`], nothing else.
//!
//! - Templates are sealed per subject (AES-256-GCM under a random data key,
//!   wrapped under one of B bucket keys, which the keyring holds sealed by a
//!   root key kept outside the data directory). Records are keyed by a keyed
//!   pseudonym, never by the subject id.
//! - Comparison is a fixed-point integer dot product with a constant-time
//!   threshold test; no score ever leaves the crate.
//! - Consent is enforced: no enrollment without purposes and an expiry, no
//!   verification for another purpose or after expiry.
//! - [`Store::revoke`] crypto-shreds: it rotates the subject's bucket key and
//!   overwrites the old one in place, so no copy of the data files can bring
//!   the template back.
//! - Key epochs make erasure reach backups: the keyring is sealed under the
//!   current epoch's root key, which a [`KeyProvider`] (a file,
//!   [`FileEpochProvider`]; an HSM, `Pkcs11Provider`) destroys when
//!   [`Store::roll_epoch`] moves to the next; every backup, key-directory
//!   copy or database dump of the old epoch is then inert.
//!   [`Store::backup`] and [`Store::restore`] (which replays the revocation
//!   ledger) never bring a revoked subject back.
//!
//! - Split custody, per subject ([`Store::enroll_with`],
//!   [`Store::verify_with`]): the templates open only with a 32-byte
//!   [`UserKey`] the person holds (a passkey's WebAuthn PRF output), which
//!   bioseal never stores; the operator, with every key and file it has,
//!   cannot open them. Consent, lockout, retention and revoke work without it.
//!
//! - Embedded by default (sled in a directory, owned by one process); with
//!   a `postgresql://` location (feature `postgres`), any number of service
//!   replicas share one store on PostgreSQL, attempt limits and revocations
//!   exact across them (see [`StoreConfig::new`]).
//!
//! SECURITY.md in the repository is the threat model (§15: key epochs and
//! backups; §16: shared mode).
//!
//! ## Example
//!
//! ```
//! use bioseal::{Consent, Decision, Embedding, Error, FileEpochProvider, Purpose, Store,
//!               StoreConfig, Threshold, Timestamp};
//!
//! # fn main() -> Result<(), Error> {
//! let data = tempfile::tempdir()?;           // the data directory
//! let secrets = tempfile::tempdir()?;        // elsewhere: epoch keys and keyring
//! let config = || -> Result<StoreConfig, Error> {
//!     // Epoch root keys in a 0600 file (or an HSM: Pkcs11Provider).
//!     let keys = FileEpochProvider::open(secrets.path().join("bioseal.epochs"))?;
//!     Ok(StoreConfig::new(data.path().join("store"), keys)
//!         .key_dir(secrets.path())                // the keyring lives beside them
//!         .model("example-model", 4)
//!         .threshold(Threshold::cosine(0.8)))
//! };
//! let store = Store::open(config()?)?;
//!
//! let now = std::time::SystemTime::now()
//!     .duration_since(std::time::UNIX_EPOCH)
//!     .map_or(0, |d| d.as_secs());
//! let one_year = Timestamp::from_unix_secs(now + 365 * 86_400);
//! let consent = Consent::new([Purpose::IDENTITY_VERIFICATION])
//!     .expires_at(one_year)
//!     .evidence([0u8; 32]); // SHA-256 of the signed release
//! store.enroll("user-42", Embedding::new(vec![0.9, 0.1, 0.3, 0.2]), consent)?;
//!
//! let same = Embedding::new(vec![0.88, 0.12, 0.31, 0.19]);
//! assert_eq!(store.verify("user-42", &Purpose::IDENTITY_VERIFICATION, same)?, Decision::Match);
//!
//! let other = Embedding::new(vec![-0.2, 0.9, -0.1, 0.3]);
//! assert_eq!(store.verify("user-42", &Purpose::IDENTITY_VERIFICATION, other)?, Decision::NoMatch);
//!
//! // Not consented for this purpose:
//! let probe = Embedding::new(vec![0.9, 0.1, 0.3, 0.2]);
//! assert!(matches!(
//!     store.verify("user-42", &Purpose::IMPERSONATION_CHECK, probe),
//!     Err(Error::PurposeNotConsented)
//! ));
//!
//! let backup = data.path().join("backup-1");
//! store.backup(&backup)?;     // consistent, online, sealed under the current key epoch
//!
//! let receipt = store.revoke("user-42")?;   // records removed, bucket key rotated and overwritten
//! assert!(receipt.backups_inert_by.is_some()); // the backup is inert by then (epoch end)
//! let probe = Embedding::new(vec![0.9, 0.1, 0.3, 0.2]);
//! assert!(matches!(
//!     store.verify("user-42", &Purpose::IDENTITY_VERIFICATION, probe),
//!     Err(Error::NotEnrolled)
//! ));
//!
//! // The data is lost; the key directory survives. Restoring the backup
//! // replays the revocation ledger: the revoked subject stays revoked.
//! drop(store);
//! std::fs::remove_dir_all(data.path().join("store"))?;
//! let (store, report) = Store::restore(&backup, config()?)?;
//! assert_eq!(report.replayed, 1);
//! let probe = Embedding::new(vec![0.9, 0.1, 0.3, 0.2]);
//! assert!(matches!(
//!     store.verify("user-42", &Purpose::IDENTITY_VERIFICATION, probe),
//!     Err(Error::NotEnrolled)
//! ));
//!
//! // Rolling the epoch destroys the key that sealed the backup.
//! store.roll_epoch()?;
//! drop(store);
//! std::fs::remove_dir_all(data.path().join("store"))?;
//! assert!(matches!(
//!     Store::restore(&backup, config()?),
//!     Err(Error::EpochDestroyed { epoch: 1 })
//! ));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod calibrate;
mod clock;
mod config;
mod consent;
mod crypto;
mod embedding;
mod error;
mod failpoint;
pub mod forensics;
mod matcher;
mod storage;
mod store;

pub use audit::{AuditEntry, AuditEvent, AuditHead, AuditLog, AuditOutcome};
pub use clock::{Clock, ManualClock, SystemClock, Timestamp};
pub use config::{
    AttemptPolicy, Durability, ShredPolicy, StoreConfig, DEFAULT_BUCKETS, DEFAULT_EPOCH_LENGTH,
    DEFAULT_MAX_CLOCK_JUMP, DEFAULT_MAX_CONSENT_LIFETIME, DEFAULT_MAX_INACTIVITY,
    DEFAULT_MAX_TEMPLATES,
};
pub use consent::{Consent, ConsentStatus, Purpose};
pub use crypto::custody::{Custody, UserKey};
pub use crypto::epochs::{EpochRecord, FileEpochProvider};
pub use crypto::keyring::MAX_BUCKETS;
pub use crypto::keys::{KeyProvider, RootKey};
#[cfg(feature = "pkcs11")]
pub use crypto::pkcs11::Pkcs11Provider;
pub use embedding::{Embedding, MAX_DIMENSION};
pub use error::{ConsentError, EmbeddingError, Error, Result};
pub use matcher::{Decision, Threshold};
pub use store::{
    BackupInfo, EpochStatus, RestoreReport, ShredReceipt, ShredStatus, Store, StoreStats,
    SweepReport, Withdrawal,
};

/// Decoders exposed for the fuzz targets and the decoding property tests.
/// Not a stable API.
#[doc(hidden)]
pub mod __fuzz {
    use crate::error::Result;

    pub use crate::crypto::keyring::parse_image as parse_keyring;

    /// Decode a subject record envelope.
    pub fn decode_record(bytes: &[u8]) -> Result<()> {
        crate::storage::SubjectRecord::decode(bytes).map(|_| ())
    }

    /// Decode a bucket key table, and look `probe` up in it.
    pub fn decode_key_table(bytes: &[u8], probe: [u8; 32]) -> Result<usize> {
        let p = crate::crypto::pseudonym::Pseudonym(probe);
        let found = crate::storage::DekTable::find(bytes, &p)?;
        let t = crate::storage::DekTable::decode(bytes)?;
        if found.is_some() != t.entries.iter().any(|(q, _)| *q == probe) {
            return Err(crate::Error::Config("find and decode disagree".into()));
        }
        Ok(t.entries.len())
    }

    /// Decode a subject payload for dimension `dim`.
    pub fn decode_payload(bytes: &[u8], dim: usize) -> Result<()> {
        crate::storage::SubjectPayload::decode(bytes, dim).map(|_| ())
    }

    /// Validate and quantise an embedding.
    pub fn quantize(values: Vec<f32>, dim: usize) -> Result<()> {
        crate::embedding::Embedding::new(values)
            .quantize(dim)
            .map(|_| ())
            .map_err(Into::into)
    }
}

/// The constant-time matcher on caller-supplied vectors, for the timing-leak
/// measurement (`benches/timing_leak.rs`). Not a stable API. It exposes no
/// stored template and no score: the caller supplies every vector and gets
/// the decision only.
#[doc(hidden)]
pub mod __timing {
    use crate::embedding::{Embedding, Template};
    use crate::error::Result;
    use crate::matcher::{decide, Decision, Threshold};

    /// Quantised templates and a probe, ready for repeated decisions.
    pub struct Fixture {
        templates: Vec<Template>,
        probe: Template,
        threshold: i64,
    }

    impl Fixture {
        /// Validate and quantise like the store does.
        pub fn new(templates: Vec<Vec<f32>>, probe: Vec<f32>, threshold: f32) -> Result<Self> {
            let dim = probe.len();
            let templates = templates
                .into_iter()
                .map(|t| Embedding::new(t).quantize(dim))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(Fixture {
                templates,
                probe: Embedding::new(probe).quantize(dim)?,
                threshold: Threshold::cosine(threshold).fixed(),
            })
        }

        /// Number of templates.
        pub fn templates(&self) -> usize {
            self.templates.len()
        }

        /// Overwrite this fixture's values with `other`'s, in place (same
        /// buffers, same addresses), so that both classes of a timing test
        /// run through identical memory. Shapes must agree.
        pub fn load_from(&mut self, other: &Fixture) {
            for (t, o) in self.templates.iter_mut().zip(&other.templates) {
                t.values_mut().copy_from_slice(o.values());
            }
            self.probe
                .values_mut()
                .copy_from_slice(other.probe.values());
            self.threshold = other.threshold;
        }

        /// One decision, exactly as `Store::verify` makes it.
        #[inline(never)]
        pub fn decide(&self) -> Decision {
            decide(&self.templates, &self.probe, self.threshold)
        }
    }
}

/// Raw access to an open store's sled trees, for this crate's own
/// hostile-review tests (splicing older record versions back, deleting a
/// pending-shred marker: what anyone with write access to the data files
/// can do, without any key). Compiled only with the `failpoints` feature,
/// which only this crate's test builds switch on. Not an API.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub mod __test {
    use crate::error::{Error, Result};
    use crate::storage::{Table, Writes};
    use crate::Store;

    fn table(t: &str) -> Result<Table> {
        Table::named(t).ok_or_else(|| Error::Config(format!("no table {t}")))
    }

    /// Every key and value of a table ("records", "keys", "meta", "audit").
    pub fn entries(store: &Store, t: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        store.raw_db().scan(table(t)?, &[], None, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Every subject record of an open store, either backend, as
    /// [`crate::forensics::subject_records`] lists a data directory's.
    pub fn subject_records(store: &Store) -> Result<Vec<crate::forensics::RawSubjectRecord>> {
        crate::forensics::subject_records_in(store.raw_db())
    }

    /// A subject's DEK, as the operator's keys open it.
    pub fn dek(store: &Store, subject: &str) -> Result<[u8; 32]> {
        store.test_dek(subject).map(|k| *k)
    }

    /// A split-custody subject's server half (`None` in server custody),
    /// as the operator's keys open it.
    pub fn split_half(store: &Store, subject: &str) -> Result<Option<[u8; 32]>> {
        store.test_split_half(subject)
    }

    /// Write a raw value (`None` removes the key), and flush.
    pub fn put(store: &Store, t: &str, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        let mut w = Writes::default();
        w.put(table(t)?, key, value.map(<[u8]>::to_vec));
        store.raw_db().apply(w, false)?;
        store.raw_db().flush()
    }
}
