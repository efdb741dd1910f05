//! `bioseal`: the operator CLI. See `bioseal --help`.
//!
//! Exit codes: 0 success (and `match`), 1 `no-match`, 2 usage, 3 bad input
//! (missing or malformed file, invalid embedding, consent or subject), 4 not
//! enrolled, 5 consent (purpose not consented, consent or retention expired),
//! 6 locked out or disabled, 7 keys (wrong root key, key unavailable, store or
//! model mismatch, old layout, destroyed epoch, key provider), 8 tampering (including a broken audit
//! chain), 9 storage, I/O or anything else, 10 rolled back (the store is
//! older than the keyring's high-water mark), 11 clock jump. Errors are one
//! line on stderr and never contain template data.
//!
//! One file per command group: `subjects.rs` (init, enroll, verify,
//! add-template, reset-attempts, revoke, consent), `maintenance.rs` (sweep,
//! audit, stats, epoch, backup, restore), `calibrate.rs`, `store.rs` (opening the store and the
//! settings mirror), `input.rs` (embeddings, dates, digests).
#![forbid(unsafe_code)]

use bioseal::{
    Consent, Decision, Embedding, Error, Purpose, RootKey, ShredStatus, Store, StoreConfig,
    Threshold, Timestamp, Withdrawal,
};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod calibrate;
mod input;
mod maintenance;
mod plot;
mod store;
mod subjects;
use input::*;
use store::*;

#[derive(Parser)]
#[command(
    name = "bioseal",
    version,
    about = "Operate a bioseal face-template store"
)]
pub(crate) struct Cli {
    /// Store directory, or a postgresql:// URL (shared mode: the keyring is
    /// in the database, bioseal.json in the key directory).
    #[arg(long, env = "BIOSEAL_STORE", global = true)]
    store: Option<PathBuf>,
    /// Root key file (32 bytes, mode 0600), kept outside the store
    /// directory: one fixed key, so backups never become inert (prefer
    /// --epochs).
    #[arg(
        long,
        env = "BIOSEAL_ROOT_KEY_FILE",
        global = true,
        conflicts_with = "epochs"
    )]
    root_key: Option<PathBuf>,
    /// Epoch key file (mode 0600, outside the store directory): the
    /// store's epoch root keys, each destroyed when the epoch rolls (`epoch
    /// roll`, or `sweep` once an epoch is 30 days old), so that backups of
    /// revoked subjects become inert.
    #[arg(long, env = "BIOSEAL_EPOCHS_FILE", global = true)]
    epochs: Option<PathBuf>,
    /// Epoch keys in a PKCS#11 token (an HSM): the module's path. Needs
    /// --pkcs11-token, the user PIN in $BIOSEAL_PKCS11_PIN, and --keys.
    #[arg(long, env = "BIOSEAL_PKCS11_MODULE", global = true, conflicts_with_all = ["epochs", "root_key"])]
    pkcs11: Option<PathBuf>,
    /// The PKCS#11 token's label.
    #[arg(long, env = "BIOSEAL_PKCS11_TOKEN", global = true)]
    pkcs11_token: Option<String>,
    /// The label prefix of this store's epoch keys in the token (one per
    /// store).
    #[arg(
        long,
        env = "BIOSEAL_PKCS11_PREFIX",
        global = true,
        default_value = "bioseal"
    )]
    pkcs11_prefix: String,
    /// Key directory: where the keyring lives, outside the store directory
    /// (default: the directory that holds the root key or epoch file).
    #[arg(long, env = "BIOSEAL_KEYS", global = true)]
    keys: Option<PathBuf>,
    /// Open data older than the keyring's high-water mark (a restored copy
    /// of the store directory). Audited; without it such data is refused
    /// (exit 10).
    #[arg(long, global = true)]
    accept_rollback: bool,
    /// Confirm the clock after it jumped forward more than 30 days past the
    /// latest time the store saw (audited); until then nothing is destroyed
    /// by deadline (exit 11).
    #[arg(long, global = true)]
    accept_clock_jump: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Create a new store and a new root key file (refuses to overwrite either).
    Init {
        /// Embedding model id.
        #[arg(long)]
        model: String,
        /// Embedding dimension.
        #[arg(long)]
        dim: usize,
        /// Match threshold as a cosine similarity (see `calibrate`).
        #[arg(long)]
        threshold: f32,
        /// Bucket count (fixed at creation).
        #[arg(long, default_value_t = 4096)]
        buckets: u32,
    },
    /// Enroll one subject, or many from a JSON-lines file (--jsonl).
    Enroll {
        #[arg(long, required_unless_present = "jsonl")]
        subject: Option<String>,
        /// Embedding file: a JSON array of numbers, or a float32 .npy.
        #[arg(long, required_unless_present = "jsonl")]
        embedding: Option<PathBuf>,
        /// Consented purpose (repeat for several).
        #[arg(long = "purpose", required_unless_present = "jsonl")]
        purposes: Vec<String>,
        /// Consent expiry: a date (2027-06-01, UTC) or a duration from now
        /// (90d, 12w, 1y, 36h).
        #[arg(long, required_unless_present = "jsonl")]
        expires: Option<String>,
        /// The signed consent release; its SHA-256 is stored as evidence.
        #[arg(long, required_unless_present = "jsonl")]
        evidence: Option<PathBuf>,
        /// Bulk enrollment: one JSON object per line with `subject`,
        /// `embedding`, `purposes`, `expires` and `evidence_sha256` (hex).
        #[arg(long, conflicts_with_all = ["subject", "embedding", "user_key"])]
        jsonl: Option<PathBuf>,
        /// Enroll in split custody: the templates open only with this user
        /// key (a file of 32 raw bytes or 64 hexadecimal digits), which
        /// bioseal never stores (SECURITY.md §17).
        #[arg(long = "user-key", value_name = "FILE")]
        user_key: Option<PathBuf>,
    },
    /// Verify a probe: prints `match` (exit 0) or `no-match` (exit 1).
    Verify {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        purpose: String,
        #[arg(long)]
        embedding: PathBuf,
        /// Split custody: the person's user key, a file of 32 raw bytes or
        /// 64 hexadecimal digits (see SECURITY.md §17).
        #[arg(long = "user-key", value_name = "FILE")]
        user_key: Option<PathBuf>,
    },
    /// Add a template to an enrolled subject, only after a fresh probe
    /// matches (the attempt counts under the lockout): prints `added`
    /// (exit 0) or `no-match` (exit 1, nothing added).
    AddTemplate {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        purpose: String,
        /// A fresh capture that must match first.
        #[arg(long)]
        probe: PathBuf,
        /// The template to add.
        #[arg(long)]
        embedding: PathBuf,
        /// Split custody: the person's user key, a file of 32 raw bytes or
        /// 64 hexadecimal digits (see SECURITY.md §17).
        #[arg(long = "user-key", value_name = "FILE")]
        user_key: Option<PathBuf>,
    },
    /// Change a split-custody subject's user key (a wrong current key counts
    /// as a failed attempt).
    Rekey {
        #[arg(long)]
        subject: String,
        /// The current user key (32 raw bytes or 64 hexadecimal digits).
        #[arg(long = "user-key", value_name = "FILE")]
        user_key: PathBuf,
        /// The new user key.
        #[arg(long = "new-user-key", value_name = "FILE")]
        new_user_key: PathBuf,
    },
    /// Move a server-custody subject to split custody under the person's
    /// user key (the migration of existing users; audited, irreversible).
    MoveToSplit {
        #[arg(long)]
        subject: String,
        /// The person's user key (32 raw bytes or 64 hexadecimal digits).
        #[arg(long = "user-key", value_name = "FILE")]
        user_key: PathBuf,
    },
    /// Re-enable a subject disabled after too many failures (audited).
    ResetAttempts {
        #[arg(long)]
        subject: String,
    },
    /// Revoke a subject and shred it.
    Revoke {
        #[arg(long)]
        subject: String,
    },
    /// Destroy every subject past its deadline.
    Sweep {
        /// Only count the subjects a sweep would destroy.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show, renew or withdraw a subject's consent.
    Consent {
        #[command(subcommand)]
        action: ConsentCmd,
    },
    /// Check or export the audit log.
    Audit {
        #[command(subcommand)]
        action: AuditCmd,
    },
    /// Counts, key generations and disk use. Never template data.
    Stats,
    /// Show or roll the key epoch.
    Epoch {
        #[command(subcommand)]
        action: EpochCmd,
    },
    /// Write a backup (data and keyring, sealed under the current epoch) to
    /// a new directory.
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty store directory (the key directory
    /// must hold the store's keyring: its revocation ledger is replayed).
    Restore {
        #[arg(long)]
        from: PathBuf,
    },
    /// Choose a threshold for a target false-match rate from labelled
    /// evaluation embeddings (JSON lines: `identity`, `embedding`).
    Calibrate {
        #[arg(long)]
        pairs: PathBuf,
        /// Target false-match rate (NIST SP 800-63B-4 requires <= 1e-4).
        #[arg(long, default_value_t = 1e-4)]
        target_fmr: f64,
        /// Record the threshold, target and source in the store's settings.
        #[arg(long)]
        apply: bool,
        /// Draw the genuine and impostor score histograms and the DET curve
        /// (FNMR against FMR, log scales), with the threshold and the NIST
        /// SP 800-63B-4 limits, into this PNG file.
        #[arg(long, value_name = "FILE.png")]
        plot: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConsentCmd {
    /// Print purposes, dates, evidence digest and deadline.
    Show {
        #[arg(long)]
        subject: String,
    },
    /// Replace the consent (new purposes, expiry and evidence).
    Renew {
        #[arg(long)]
        subject: String,
        #[arg(long = "purpose", required = true)]
        purposes: Vec<String>,
        #[arg(long)]
        expires: String,
        #[arg(long)]
        evidence: PathBuf,
    },
    /// Withdraw one purpose (the last one revokes the subject).
    Withdraw {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        purpose: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum EpochCmd {
    /// The current epoch, its age, when it is due, the oldest restorable backup.
    Status,
    /// Create the next epoch's key, re-seal the keyring, destroy the old key.
    Roll,
    /// Move a store opened with --root-key to epoch keys: record that root
    /// key as epoch 0 in the (new, empty) --epochs file. Then use --epochs,
    /// run `epoch roll`, and destroy the old root key file.
    Import {
        /// The store's root key file.
        #[arg(long)]
        root_key_file: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Verify the MAC chain; prints the entry count and head.
    Verify,
    /// Write the log as JSON lines (stdout, or --out).
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// A CLI failure: exit code and one-line message.
pub(crate) struct Fail(u8, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::InvalidEmbedding(_)
            | Error::InvalidConsent(_)
            | Error::InvalidSubject
            | Error::TooManyTemplates { .. }
            | Error::NotSplitCustody
            | Error::AlreadySplitCustody
            | Error::InvalidUserKey(_)
            | Error::Config(_) => 3,
            Error::WrongUserKey => 12,
            Error::NotEnrolled => 4,
            Error::AlreadyEnrolled | Error::BucketFull { .. } => 3,
            Error::PurposeNotConsented | Error::ConsentExpired | Error::RetentionExpired => 5,
            Error::LockedOut { .. } | Error::VerificationDisabled => 6,
            Error::WrongRootKey
            | Error::KeyUnavailable { .. }
            | Error::InvalidRootKey(_)
            | Error::EpochDestroyed { .. }
            | Error::KeyProvider(_)
            | Error::StoreMismatch
            | Error::LegacyLayout(_)
            | Error::ModelMismatch { .. } => 7,
            Error::RolledBack { .. } => 10,
            Error::ClockJump { .. } => 11,
            Error::Tampered { .. } | Error::AuditChainBroken { .. } => 8,
            _ => 9,
        };
        Fail(code, e.to_string())
    }
}

pub(crate) fn input(msg: impl Into<String>) -> Fail {
    Fail(3, msg.into())
}

pub(crate) type R<T> = Result<T, Fail>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(code, msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Run one command: each command group lives in its own file.
fn run(cli: Cli) -> R<u8> {
    let c = &cli;
    match &cli.command {
        Command::Init {
            model,
            dim,
            threshold,
            buckets,
        } => subjects::init(c, model, dim, threshold, buckets),
        Command::Enroll {
            subject,
            embedding,
            purposes,
            expires,
            evidence,
            jsonl,
            user_key,
        } => subjects::enroll(
            c, subject, embedding, purposes, expires, evidence, jsonl, user_key,
        ),
        Command::Verify {
            subject,
            purpose,
            embedding,
            user_key,
        } => subjects::verify(c, subject, purpose, embedding, user_key),
        Command::AddTemplate {
            subject,
            purpose,
            probe,
            embedding,
            user_key,
        } => subjects::add_template(c, subject, purpose, probe, embedding, user_key),
        Command::Rekey {
            subject,
            user_key,
            new_user_key,
        } => subjects::rekey(c, subject, user_key, new_user_key),
        Command::MoveToSplit { subject, user_key } => subjects::move_to_split(c, subject, user_key),
        Command::ResetAttempts { subject } => subjects::reset_attempts(c, subject),
        Command::Revoke { subject } => subjects::revoke(c, subject),
        Command::Consent { action } => subjects::consent_cmd(c, action),
        Command::Sweep { dry_run } => maintenance::sweep(c, dry_run),
        Command::Audit { action } => maintenance::audit(c, action),
        Command::Stats => maintenance::stats(c),
        Command::Epoch { action } => maintenance::epoch(c, action),
        Command::Backup { out } => maintenance::backup(c, out),
        Command::Restore { from } => maintenance::restore(c, from),
        Command::Calibrate {
            pairs,
            target_fmr,
            apply,
            plot,
        } => calibrate::calibrate_cmd(c, pairs, *target_fmr, *apply, plot.as_deref()),
    }
}
