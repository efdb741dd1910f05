//! Typed errors. No variant carries template values, similarity scores,
//! key material or subject identifiers.

use crate::clock::Timestamp;

/// Result alias used throughout bioseal.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an embedding was refused. Carries sizes only, never values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingError {
    /// The vector does not have the store's dimension.
    #[error("wrong dimension: the store expects {expected}, got {got}")]
    WrongDimension {
        /// Dimension fixed when the store was created.
        expected: usize,
        /// Length of the vector that was passed.
        got: usize,
    },
    /// A component is NaN or infinite.
    #[error("a component is NaN or infinite")]
    NonFinite,
    /// The vector's L2 norm is (close to) zero, so it has no direction.
    #[error("the vector is zero or too close to zero to normalise")]
    NearZero,
}

/// Why a consent was refused at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsentError {
    /// The consent names no purpose.
    #[error("consent names no purpose")]
    NoPurpose,
    /// The consent has no expiry.
    #[error("consent has no expiry")]
    NoExpiry,
    /// The expiry is not after the current time.
    #[error("consent expiry is not in the future")]
    ExpiryNotInFuture,
    /// No evidence digest (SHA-256 of the signed written release) was given.
    #[error("consent has no evidence digest of the signed release")]
    NoEvidence,
    /// The expiry is further away than the store's maximum consent lifetime.
    #[error("consent lifetime exceeds the store's maximum of {max_secs} s")]
    LifetimeTooLong {
        /// The configured maximum, in seconds.
        max_secs: u64,
    },
    /// A purpose name is empty, too long, or uses characters outside `[a-z0-9._-]`.
    #[error("invalid purpose name (1-64 characters of a-z 0-9 . _ -)")]
    InvalidPurpose,
}

/// Every error bioseal returns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The subject is not enrolled (never was, or was revoked or expired).
    #[error("subject is not enrolled")]
    NotEnrolled,
    /// `enroll` for a subject that is already enrolled; nothing was changed.
    #[error("subject is already enrolled; add templates with add_template, change consent with renew/withdraw")]
    AlreadyEnrolled,
    /// The subject's consent has expired; the subject has been revoked and shredded.
    #[error("consent has expired; the subject was revoked")]
    ConsentExpired,
    /// The subject was inactive longer than the retention policy allows; it
    /// has been revoked and shredded.
    #[error("retention period after the last interaction has passed; the subject was revoked")]
    RetentionExpired,
    /// The purpose of the request is not among the consented purposes.
    #[error("purpose is not consented")]
    PurposeNotConsented,
    /// Too many consecutive failed verifications.
    #[error("subject is locked out until {until}")]
    LockedOut {
        /// Earliest time of the next accepted attempt.
        until: Timestamp,
    },
    /// Too many consecutive failures: biometric verification is disabled for
    /// this subject until it is enrolled again or an operator resets it.
    #[error("biometric verification is disabled for this subject after too many failures")]
    VerificationDisabled,
    /// The audit log fails verification at this sequence number.
    #[error("audit log broken at sequence number {seq}")]
    AuditChainBroken {
        /// First entry that fails (edited, missing, moved or inserted).
        seq: u64,
    },
    /// The store was created for another embedding model or dimension.
    #[error("model mismatch: store holds `{stored}`, configuration asks for `{configured}`")]
    ModelMismatch {
        /// Model id and dimension recorded in the store.
        stored: String,
        /// Model id and dimension of the configuration.
        configured: String,
    },
    /// The embedding was refused.
    #[error("invalid embedding: {0}")]
    InvalidEmbedding(#[from] EmbeddingError),
    /// The consent was refused.
    #[error("invalid consent: {0}")]
    InvalidConsent(#[from] ConsentError),
    /// The subject identifier is empty or longer than 1024 bytes.
    #[error("invalid subject identifier (1-1024 bytes)")]
    InvalidSubject,
    /// A split-custody subject's user key is missing or wrong. Counted
    /// as a failed attempt under the attempt limits and audited; it says
    /// nothing about whether the face would have matched (the templates
    /// were never opened).
    #[error("wrong or missing user key for a split-custody subject")]
    WrongUserKey,
    /// A user key was given for a subject held in server custody (or a
    /// user-key change asked for one); nothing was changed and no attempt
    /// was spent.
    #[error("the subject is held in server custody: it has no user key")]
    NotSplitCustody,
    /// A move to split custody for a subject already in it (its key
    /// changes with `Store::rekey`); nothing was changed.
    #[error("the subject is already in split custody: change its key with rekey")]
    AlreadySplitCustody,
    /// A user key is malformed: not 32 raw bytes or 64 hexadecimal digits,
    /// or all its bytes are equal.
    #[error("invalid user key: {0}")]
    InvalidUserKey(&'static str),
    /// The subject already holds the configured maximum number of templates.
    #[error("subject already holds the maximum of {max} templates")]
    TooManyTemplates {
        /// The configured maximum.
        max: usize,
    },
    /// The subject's bucket holds the most subjects one bucket may (so that
    /// no bucket key wraps more than 2^16 data keys); create the store with
    /// more buckets.
    #[error("bucket full ({max} subjects): create the store with more buckets")]
    BucketFull {
        /// The limit.
        max: usize,
    },
    /// Stored data failed authentication or is structurally invalid.
    #[error("tampered or corrupted data: {what}")]
    Tampered {
        /// Which structure failed (never its content).
        what: &'static str,
    },
    /// The root key does not open this store.
    #[error("wrong root key for this store")]
    WrongRootKey,
    /// A key needed to open a record does not exist (it was shredded, or the
    /// keyring is missing).
    #[error("key unavailable: {what}")]
    KeyUnavailable {
        /// Which key is missing.
        what: &'static str,
    },
    /// The backup (or keyring) was sealed under a key epoch whose root key
    /// has been destroyed (or is older than the store's current epoch,
    /// whose roll destroys it): it can never be opened again, by design.
    #[error("key epoch {epoch} has been destroyed: what it sealed can never be opened again")]
    EpochDestroyed {
        /// The destroyed epoch.
        epoch: u64,
    },
    /// The key provider failed or cannot do what was asked (an HSM error,
    /// a provider that holds one fixed root key asked to roll an epoch).
    /// The message names the provider and the operation, never key bytes
    /// or a PIN.
    #[error("key provider: {0}")]
    KeyProvider(String),
    /// A root key file is readable by group or others, or is malformed.
    #[error("invalid root key: {0}")]
    InvalidRootKey(String),
    /// The sled data and the keyring belong to different stores.
    #[error("the data directory and the keyring belong to different stores")]
    StoreMismatch,
    /// The data is older than the high-water mark the keyring recorded at
    /// the last security-relevant event: a copy of the data directory (or a
    /// backup) was put back over the live one. Opening it anyway takes
    /// `StoreConfig::accept_rollback` (audited).
    #[error("the data is older than the keyring's high-water mark ({data} < {keyring}): it was rolled back to an older copy; open with accept-rollback only if that was intended")]
    RolledBack {
        /// The data's high-water mark.
        data: u64,
        /// The keyring's.
        keyring: u64,
    },
    /// The clock reads more than the configured maximum past the latest
    /// time the store has seen: destruction by deadline is paused (nothing
    /// was destroyed) until the operator confirms the time
    /// (`StoreConfig::accept_clock_jump`).
    #[error("the clock jumped forward from {last_seen} to {now}; nothing is destroyed by deadline until the time is confirmed (accept-clock-jump)")]
    ClockJump {
        /// The latest time seen before the jump.
        last_seen: Timestamp,
        /// The clock's reading.
        now: Timestamp,
    },
    /// A store in a layout this version does not open; the message says
    /// what to do.
    #[error("old store layout: {0}")]
    LegacyLayout(String),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An I/O error on the keyring or a key file.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The database's schema is newer than this version of bioseal knows.
    #[error("the database has bioseal schema version {found}; this version knows up to {supported}: upgrade bioseal")]
    SchemaVersion {
        /// The version in the database.
        found: i32,
        /// The newest version this code knows.
        supported: i32,
    },
    /// An error from the storage backend (sled, or PostgreSQL: the message
    /// names the host and port, never a password).
    #[error("storage error: {0}")]
    Storage(String),
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl Error {
    pub(crate) fn tampered(what: &'static str) -> Self {
        Error::Tampered { what }
    }
}
