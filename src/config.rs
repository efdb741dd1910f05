//! Store configuration and its policies.

use crate::clock::{Clock, SystemClock};
use crate::crypto::keyring::{MAX_BUCKETS, MAX_MODEL_ID};
use crate::crypto::keys::KeyProvider;
use crate::embedding::MAX_DIMENSION;
use crate::error::{Error, Result};
use crate::matcher::Threshold;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Shared mode: connections per process.
pub const DEFAULT_POOL_SIZE: u32 = 16;
/// sled's default page-cache size.
const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// Default bucket count: a revocation re-wraps about N/4096 live DEKs.
pub const DEFAULT_BUCKETS: u32 = 4096;
/// Default maximum number of templates per subject.
pub const DEFAULT_MAX_TEMPLATES: usize = 5;
/// Default maximum consent lifetime: three years (BIPA §15(a)'s outer limit).
pub const DEFAULT_MAX_CONSENT_LIFETIME: Duration = Duration::from_secs(3 * 365 * 86_400);

/// Default [`StoreConfig::epoch_length`]: 30 days.
pub const DEFAULT_EPOCH_LENGTH: Duration = Duration::from_secs(30 * 86_400);

/// Default [`StoreConfig::max_clock_jump`]: 30 days.
pub const DEFAULT_MAX_CLOCK_JUMP: Duration = Duration::from_secs(30 * 86_400);

/// Default maximum inactivity after the last successful interaction: three
/// years (BIPA §15(a)).
pub const DEFAULT_MAX_INACTIVITY: Duration = Duration::from_secs(3 * 365 * 86_400);

/// Consecutive-failure limits for biometric verification, per NIST SP
/// 800-63B-4: after `soft_limit` consecutive failures each further attempt
/// must wait `wait` after the previous failure; after `hard_limit` biometric
/// verification is disabled until re-enrollment or an operator reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptPolicy {
    /// Failures before the per-attempt wait starts.
    pub soft_limit: u32,
    /// Failures after which verification is disabled.
    pub hard_limit: u32,
    /// Minimum wait after a failure once past `soft_limit`.
    pub wait: Duration,
}

impl AttemptPolicy {
    /// 5 failures, then 30 s between attempts, disabled after 50.
    pub const NIST: AttemptPolicy = AttemptPolicy {
        soft_limit: 5,
        hard_limit: 50,
        wait: Duration::from_secs(30),
    };
    /// With presentation-attack detection attested: 10, 30 s, 100.
    pub const NIST_WITH_PAD: AttemptPolicy = AttemptPolicy {
        soft_limit: 10,
        hard_limit: 100,
        wait: Duration::from_secs(30),
    };
}

/// How soon writes that `verify` makes (audit entries, failure-counter resets,
/// last-interaction days) reach the disk. Enrollments, revocations, consent
/// changes, sweeps and failure-counter increments are always flushed before
/// they return, together with their audit entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every call flushes before it returns (one `fdatasync` per verify).
    Immediate,
    /// bioseal's flusher thread writes them to sled and flushes at least
    /// every `interval`: a crash loses at most that much of verify audit
    /// entries and of counter resets. The default, with 200 ms.
    GroupCommit {
        /// Longest time between flushes.
        interval: Duration,
    },
}

impl Default for Durability {
    fn default() -> Self {
        Durability::GroupCommit {
            interval: Duration::from_millis(200),
        }
    }
}

/// When a revocation's crypto-shred happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShredPolicy {
    /// `revoke` rotates the bucket's KEK before it returns (the default).
    #[default]
    Immediate,
    /// `revoke` removes the records and marks the bucket; the KEK rotation
    /// happens at the next [`crate::Store::shred`]. Until then the revoked
    /// subject is gone for every API, but an old copy of the data files plus
    /// the current keyring could still open it. Use it to coalesce bulk
    /// revocations; call `shred` on a schedule.
    Deferred,
}

/// Configuration of a [`crate::Store`]. Model and threshold must be set.
///
/// ```
/// use bioseal::{RootKey, StoreConfig, Threshold};
/// let cfg = StoreConfig::new("/var/lib/bioseal", RootKey::from_bytes([1; 32]))
///     .model("arcface-r100", 512)
///     .threshold(Threshold::cosine(0.36))
///     .max_templates(3);
/// assert!(format!("{cfg:?}").contains("[REDACTED]"));
/// ```
pub struct StoreConfig {
    pub(crate) dir: PathBuf,
    pub(crate) key_dir: Option<PathBuf>,
    pub(crate) accept_rollback: bool,
    pub(crate) max_clock_jump: Duration,
    pub(crate) accept_clock_jump: bool,
    pub(crate) key: Arc<dyn KeyProvider>,
    pub(crate) model: Option<(String, usize)>,
    pub(crate) threshold: Option<Threshold>,
    pub(crate) max_templates: usize,
    pub(crate) buckets: u32,
    pub(crate) shred: ShredPolicy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) max_consent_lifetime: Duration,
    pub(crate) max_inactivity: Duration,
    pub(crate) pad: bool,
    pub(crate) durability: Durability,
    pub(crate) cache_bytes: u64,
    pub(crate) pool_size: u32,
    pub(crate) epoch_length: Duration,
}

impl StoreConfig {
    /// A configuration for the store in `dir`, whose keyring is sealed by the
    /// root key that `key` supplies. Keep the root key outside `dir`.
    ///
    /// `dir` may instead be a `postgresql://` URL (feature `postgres`):
    /// shared mode, where any number of processes open the same store on
    /// one database. The keyring then lives in the database, sealed under
    /// the root key, and no key directory is needed.
    pub fn new(dir: impl Into<PathBuf>, key: impl KeyProvider + 'static) -> Self {
        StoreConfig {
            dir: dir.into(),
            key_dir: None,
            accept_rollback: false,
            max_clock_jump: DEFAULT_MAX_CLOCK_JUMP,
            accept_clock_jump: false,
            key: Arc::new(key),
            model: None,
            threshold: None,
            max_templates: DEFAULT_MAX_TEMPLATES,
            buckets: DEFAULT_BUCKETS,
            shred: ShredPolicy::Immediate,
            clock: Arc::new(SystemClock),
            max_consent_lifetime: DEFAULT_MAX_CONSENT_LIFETIME,
            max_inactivity: DEFAULT_MAX_INACTIVITY,
            pad: false,
            durability: Durability::default(),
            cache_bytes: DEFAULT_CACHE_BYTES,
            pool_size: DEFAULT_POOL_SIZE,
            epoch_length: DEFAULT_EPOCH_LENGTH,
        }
    }

    /// The key directory: where the keyring lives (file `bioseal.keyring`),
    /// outside the data directory, so that no copy or backup of the data
    /// carries it. Required; refused inside the data directory. Keep the
    /// root key file there too (or in an HSM), never in the data directory.
    pub fn key_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.key_dir = Some(dir.into());
        self
    }

    /// The largest forward jump of the clock past the latest time seen (kept
    /// in the keyring) that destruction by deadline trusts (default 30
    /// days). Past it, `sweep` and a touched expired subject fail with
    /// [`crate::Error::ClockJump`] and destroy nothing, until the operator
    /// confirms the time with [`StoreConfig::accept_clock_jump`]. A service
    /// that was stopped longer than this must confirm too.
    pub fn max_clock_jump(mut self, d: Duration) -> Self {
        self.max_clock_jump = d;
        self
    }

    /// Confirm that the clock's current reading is right even though it is
    /// more than `max_clock_jump` past the latest time seen (audited).
    pub fn accept_clock_jump(mut self, accept: bool) -> Self {
        self.accept_clock_jump = accept;
        self
    }

    /// How long a key epoch runs (default 30 days): `sweep` rolls the
    /// epoch once it is this old, and every [`crate::ShredReceipt`] states
    /// that backups holding the revoked subject are inert by the end of the
    /// current epoch plus the key provider's destruction delay. Shorter
    /// epochs bound erasure in backups more tightly and leave a shorter
    /// window in which a backup can be restored.
    pub fn epoch_length(mut self, d: Duration) -> Self {
        self.epoch_length = d;
        self
    }

    /// Open data that is older than the keyring's high-water mark (a copy
    /// or backup of the data directory put back over the live one), which
    /// [`crate::Store::open`] otherwise refuses with
    /// [`crate::Error::RolledBack`]. The acceptance is audited and the mark
    /// moves past both, so the newer data cannot later come back silently.
    /// Subjects of buckets rotated since the copy was taken answer
    /// `KeyUnavailable`: their keys are gone, by design.
    pub fn accept_rollback(mut self, accept: bool) -> Self {
        self.accept_rollback = accept;
        self
    }

    /// The embedding model's id (1–64 bytes) and dimension (1–4096). Fixed
    /// when the store is created; opening with another model fails.
    pub fn model(mut self, id: impl Into<String>, dimension: usize) -> Self {
        self.model = Some((id.into(), dimension));
        self
    }

    /// The decision threshold, a cosine in (0, 1]. Required to create a
    /// store; it is then kept in the authenticated keyring, and opening
    /// with another value is refused (change it with
    /// [`crate::Store::set_threshold`], audited). Leave it unset to open a
    /// store with the threshold it holds.
    pub fn threshold(mut self, t: Threshold) -> Self {
        self.threshold = Some(t);
        self
    }

    /// Maximum templates per subject (1–64).
    pub fn max_templates(mut self, n: usize) -> Self {
        self.max_templates = n;
        self
    }

    /// Bucket count (1–65536), fixed when the store is created; ignored
    /// when opening an existing store.
    ///
    /// Sizing: a revocation re-wraps its bucket's DEKs and an enrollment
    /// rewrites its bucket's key table, both about N/B entries of 92 bytes;
    /// a sweep rotates every bucket holding a due subject. Aim for N/B of
    /// 16–64 at the population you expect. Measured at a million subjects
    /// (README, Performance): B = 4,096 (the default, ~244 per bucket)
    /// gave enroll 500 µs, revoke 1.7 ms and a 1% sweep 1.8 s; B = 65,536
    /// (~15 per bucket) gave 353 µs, 0.9 ms and 1.25 s. The price of more
    /// buckets is the keyring: 256 bytes of file and ~2 KB of memory per
    /// bucket (16 MiB and ~140 MB at 65,536), and ~0.3 s to open.
    pub fn buckets(mut self, b: u32) -> Self {
        self.buckets = b;
        self
    }

    /// When revocations are shredded.
    pub fn shred_policy(mut self, p: ShredPolicy) -> Self {
        self.shred = p;
        self
    }

    /// The clock (tests use [`crate::ManualClock`]).
    pub fn clock(mut self, c: impl Clock + 'static) -> Self {
        self.clock = Arc::new(c);
        self
    }

    /// Longest consent accepted at enrollment.
    pub fn max_consent_lifetime(mut self, d: Duration) -> Self {
        self.max_consent_lifetime = d;
        self
    }

    /// Longest time a subject is kept after its last successful interaction
    /// (enrollment, consent renewal or match). Default three years.
    pub fn max_inactivity(mut self, d: Duration) -> Self {
        self.max_inactivity = d;
        self
    }

    /// The caller attests that every probe passed presentation-attack
    /// detection, which raises the attempt limits to
    /// [`AttemptPolicy::NIST_WITH_PAD`].
    pub fn presentation_attack_detection(mut self, attested: bool) -> Self {
        self.pad = attested;
        self
    }

    /// Memory for sled's page cache (default 1 GiB, sled's own default).
    /// A store whose records exceed it reads from the operating system's
    /// page cache instead: at a million 512-d subjects (~1.4 GB) verify is
    /// measurably slower with the default.
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Shared mode: the most connections this process keeps open to the
    /// database (default 16). A thread holding bucket locks uses one.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.pool_size = n;
        self
    }

    /// The PostgreSQL URL, when the store location is one.
    pub(crate) fn postgres_url(&self) -> Option<&str> {
        self.dir
            .to_str()
            .filter(|s| s.starts_with("postgresql://") || s.starts_with("postgres://"))
    }

    /// When verify's writes reach the disk.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// The attempt policy in force.
    pub fn attempt_policy(&self) -> AttemptPolicy {
        if self.pad {
            AttemptPolicy::NIST_WITH_PAD
        } else {
            AttemptPolicy::NIST
        }
    }

    /// Check every setting; returns (model id, dimension, threshold).
    pub(crate) fn validate(&self) -> Result<(String, usize, Option<Threshold>)> {
        let (id, dim) = self
            .model
            .clone()
            .ok_or_else(|| Error::Config("no model set (StoreConfig::model)".into()))?;
        if id.is_empty() || id.len() > MAX_MODEL_ID {
            return Err(Error::Config(format!(
                "model id must be 1-{MAX_MODEL_ID} bytes"
            )));
        }
        if !(1..=MAX_DIMENSION).contains(&dim) {
            return Err(Error::Config(format!(
                "dimension must be 1-{MAX_DIMENSION}"
            )));
        }
        if let Some(t) = self.threshold {
            if !t.is_valid() {
                return Err(Error::Config(
                    "threshold must be a finite cosine above 0 and at most 1".into(),
                ));
            }
        }
        if !(1..=64).contains(&self.max_templates) {
            return Err(Error::Config("max_templates must be 1-64".into()));
        }
        if !(1..=MAX_BUCKETS).contains(&self.buckets) {
            return Err(Error::Config(format!("buckets must be 1-{MAX_BUCKETS}")));
        }
        if self.max_consent_lifetime.is_zero() || self.max_inactivity.is_zero() {
            return Err(Error::Config(
                "max_consent_lifetime and max_inactivity must be positive".into(),
            ));
        }
        if let Durability::GroupCommit { interval } = self.durability {
            if interval.is_zero() || interval > Duration::from_secs(60) {
                return Err(Error::Config(
                    "group-commit interval must be 1 ms to 60 s".into(),
                ));
            }
        }
        Ok((id, dim, self.threshold))
    }
}

/// A PostgreSQL URL without its user information and parameters (where a
/// password can be): scheme, host, port, database.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split('?').next().unwrap_or("");
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://[REDACTED]@{host}")
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let location = match self.postgres_url() {
            Some(url) => redact_url(url),
            None => self.dir.display().to_string(),
        };
        f.debug_struct("StoreConfig")
            .field("location", &location)
            .field("key_dir", &self.key_dir)
            .field("accept_rollback", &self.accept_rollback)
            .field("max_clock_jump", &self.max_clock_jump)
            .field("accept_clock_jump", &self.accept_clock_jump)
            .field("key", &format_args!("[REDACTED]"))
            .field("model", &self.model)
            .field("threshold", &self.threshold)
            .field("max_templates", &self.max_templates)
            .field("buckets", &self.buckets)
            .field("shred", &self.shred)
            .field("clock", &self.clock)
            .field("max_consent_lifetime", &self.max_consent_lifetime)
            .field("max_inactivity", &self.max_inactivity)
            .field("presentation_attack_detection", &self.pad)
            .field("durability", &self.durability)
            .finish()
    }
}
