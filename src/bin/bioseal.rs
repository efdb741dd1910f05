//! `bioseal`: the operator CLI. See `bioseal --help`.
//!
//! Exit codes: 0 success (and `match`), 1 `no-match`, 2 usage, 3 bad input
//! (missing or malformed file, invalid embedding, consent or subject), 4 not
//! enrolled, 5 consent (purpose not consented, consent or retention expired),
//! 6 locked out or disabled, 7 keys (wrong root key, key unavailable, store or
//! model mismatch), 8 tampering (including a broken audit chain), 9 storage,
//! I/O or anything else. Errors are one line on stderr and never contain
//! template data.
#![forbid(unsafe_code)]

use bioseal::calibrate::{self, Calibration};
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

const SETTINGS_FILE: &str = "bioseal.json";

#[derive(Parser)]
#[command(
    name = "bioseal",
    version,
    about = "Operate a bioseal face-template store"
)]
struct Cli {
    /// Store directory.
    #[arg(long, env = "BIOSEAL_STORE", global = true)]
    store: Option<PathBuf>,
    /// Root key file (32 bytes, mode 0600), kept outside the store directory.
    #[arg(long, env = "BIOSEAL_ROOT_KEY_FILE", global = true)]
    root_key: Option<PathBuf>,
    /// Key directory: where the keyring lives, outside the store directory
    /// (default: the directory that holds the root key file).
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
enum Command {
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
        #[arg(long, conflicts_with_all = ["subject", "embedding"])]
        jsonl: Option<PathBuf>,
    },
    /// Verify a probe: prints `match` (exit 0) or `no-match` (exit 1).
    Verify {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        purpose: String,
        #[arg(long)]
        embedding: PathBuf,
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
    },
}

#[derive(Subcommand)]
enum ConsentCmd {
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
enum AuditCmd {
    /// Verify the MAC chain; prints the entry count and head.
    Verify,
    /// Write the log as JSON lines (stdout, or --out).
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Non-secret settings kept next to the data (`<store>/bioseal.json`).
#[derive(Serialize, Deserialize)]
struct Settings {
    model: String,
    dim: usize,
    threshold: f32,
    buckets: u32,
    /// Target false-match rate the threshold was calibrated for, if any.
    target_fmr: Option<f64>,
    /// The evaluation set it was calibrated on: path and SHA-256.
    calibration_source: Option<String>,
}

/// A CLI failure: exit code and one-line message.
struct Fail(u8, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::InvalidEmbedding(_)
            | Error::InvalidConsent(_)
            | Error::InvalidSubject
            | Error::TooManyTemplates { .. }
            | Error::Config(_) => 3,
            Error::NotEnrolled => 4,
            Error::AlreadyEnrolled | Error::BucketFull { .. } => 3,
            Error::PurposeNotConsented | Error::ConsentExpired | Error::RetentionExpired => 5,
            Error::LockedOut { .. } | Error::VerificationDisabled => 6,
            Error::WrongRootKey
            | Error::KeyUnavailable { .. }
            | Error::InvalidRootKey(_)
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

fn input(msg: impl Into<String>) -> Fail {
    Fail(3, msg.into())
}

type R<T> = Result<T, Fail>;

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

fn store_dir(cli: &Cli) -> R<&Path> {
    cli.store
        .as_deref()
        .ok_or_else(|| input("no store: pass --store DIR or set BIOSEAL_STORE"))
}

fn key_path(cli: &Cli) -> R<&Path> {
    cli.root_key
        .as_deref()
        .ok_or_else(|| input("no root key: pass --root-key FILE or set BIOSEAL_ROOT_KEY_FILE"))
}

/// The key directory: `--keys`, or the directory of the root key file.
/// Neither the key directory nor the root key file may be inside the store.
fn key_dir(cli: &Cli) -> R<PathBuf> {
    let key = key_path(cli)?;
    let dir = match &cli.keys {
        Some(d) => d.clone(),
        None => match key.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let store = store_dir(cli)?;
    let inside = |p: &Path| {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let (p, s) = (abs(p), abs(store));
        p.canonicalize()
            .unwrap_or(p)
            .starts_with(s.canonicalize().unwrap_or(s))
    };
    if inside(key) {
        return Err(input(format!(
            "the root key {} is inside the store directory {}: keep it elsewhere (every copy of the store would carry it)",
            key.display(),
            store.display()
        )));
    }
    if inside(&dir) {
        return Err(input(format!(
            "the key directory {} is inside the store directory {}: pass --keys DIR outside it",
            dir.display(),
            store.display()
        )));
    }
    Ok(dir)
}

fn read_settings(dir: &Path) -> R<Settings> {
    let path = dir.join(SETTINGS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        input(format!(
            "cannot read {}: {e} (is this a store?)",
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| input(format!("malformed {}: {e}", path.display())))
}

fn write_settings(dir: &Path, s: &Settings) -> R<()> {
    let text = serde_json::to_string_pretty(s).map_err(|e| Fail(9, e.to_string()))?;
    let path = dir.join(SETTINGS_FILE);
    std::fs::write(&path, text + "\n").map_err(|e| Fail(9, e.to_string()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Fail(9, e.to_string()))
}

fn open(cli: &Cli) -> R<(Store, Settings)> {
    let settings = read_settings(store_dir(cli)?)?;
    open_with(cli, settings)
}

/// Open the store with settings already read (so that input can be checked
/// against them first: bad input never opens the store).
fn open_with(cli: &Cli, settings: Settings) -> R<(Store, Settings)> {
    let dir = store_dir(cli)?;
    let keys = key_dir(cli)?;
    let key = RootKey::from_file(key_path(cli)?)?;
    // The threshold is the keyring's (authenticated); bioseal.json only
    // mirrors it, so editing that file changes nothing.
    let store = Store::open(
        StoreConfig::new(dir, key)
            .key_dir(keys)
            .model(&settings.model, settings.dim)
            .buckets(settings.buckets)
            .accept_rollback(cli.accept_rollback)
            .accept_clock_jump(cli.accept_clock_jump),
    )?;
    Ok((store, settings))
}

fn run(cli: Cli) -> R<u8> {
    match &cli.command {
        Command::Init {
            model,
            dim,
            threshold,
            buckets,
        } => {
            let dir = store_dir(&cli)?;
            let key_file = key_path(&cli)?;
            if key_file.exists() {
                return Err(input(format!(
                    "{} exists: refusing to overwrite a root key",
                    key_file.display()
                )));
            }
            if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
                return Err(input(format!(
                    "{} is not empty: refusing to create a store there",
                    dir.display()
                )));
            }
            let keys = key_dir(&cli)?;
            let key = RootKey::generate()?;
            key.write_new_file(key_file)?;
            let store = Store::open(
                StoreConfig::new(dir, key)
                    .key_dir(keys)
                    .model(model, *dim)
                    .threshold(Threshold::cosine(*threshold))
                    .buckets(*buckets),
            )?;
            drop(store);
            write_settings(
                dir,
                &Settings {
                    model: model.clone(),
                    dim: *dim,
                    threshold: *threshold,
                    buckets: *buckets,
                    target_fmr: None,
                    calibration_source: None,
                },
            )?;
            println!(
                "created store {} (model {model}, {dim} dimensions, {buckets} buckets); root key {}",
                dir.display(),
                key_file.display()
            );
            Ok(0)
        }
        Command::Enroll {
            subject,
            embedding,
            purposes,
            expires,
            evidence,
            jsonl,
        } => {
            if let Some(path) = jsonl {
                return bulk_enroll(&cli, path);
            }
            let (Some(subject), Some(embedding), Some(expires), Some(evidence)) =
                (subject, embedding, expires, evidence)
            else {
                return Err(Fail(2, "missing arguments".into()));
            };
            let settings = read_settings(store_dir(&cli)?)?;
            let emb = read_embedding(embedding, settings.dim)?;
            let consent = consent_from(purposes, expires, &sha256_file(evidence)?)?;
            let (store, _) = open_with(&cli, settings)?;
            store.enroll(subject, emb, consent)?;
            println!("enrolled {subject}");
            Ok(0)
        }
        Command::Verify {
            subject,
            purpose,
            embedding,
        } => {
            let settings = read_settings(store_dir(&cli)?)?;
            let probe = read_embedding(embedding, settings.dim)?;
            let purpose = Purpose::new(purpose.clone()).map_err(|e| input(e.to_string()))?;
            let (store, _) = open_with(&cli, settings)?;
            match store.verify(subject, &purpose, probe)? {
                Decision::Match => {
                    println!("match");
                    Ok(0)
                }
                Decision::NoMatch => {
                    println!("no-match");
                    Ok(1)
                }
            }
        }
        Command::AddTemplate {
            subject,
            purpose,
            probe,
            embedding,
        } => {
            let settings = read_settings(store_dir(&cli)?)?;
            let probe = read_embedding(probe, settings.dim)?;
            let new = read_embedding(embedding, settings.dim)?;
            let purpose = Purpose::new(purpose.clone()).map_err(|e| input(e.to_string()))?;
            let (store, _) = open_with(&cli, settings)?;
            match store.add_template(subject, &purpose, probe, new)? {
                Decision::Match => {
                    println!("added");
                    Ok(0)
                }
                Decision::NoMatch => {
                    println!("no-match");
                    Ok(1)
                }
            }
        }
        Command::ResetAttempts { subject } => {
            let (store, _) = open(&cli)?;
            store.reset_attempts(subject)?;
            println!("reset the failed attempts of {subject}");
            Ok(0)
        }
        Command::Revoke { subject } => {
            let (store, _) = open(&cli)?;
            let r = store.revoke(subject)?;
            match r.status {
                ShredStatus::Shredded { at } => {
                    println!("revoked {subject}; shredded at {}", when(at))
                }
                ShredStatus::Pending => println!("revoked {subject}; shred pending"),
            }
            Ok(0)
        }
        Command::Sweep { dry_run } => {
            let (store, _) = open(&cli)?;
            let spinner = spinner("sweeping");
            if *dry_run {
                let n = store.due()?;
                spinner.finish_and_clear();
                println!("{n} subjects are due; nothing was destroyed (dry run)");
            } else {
                let r = store.sweep()?;
                spinner.finish_and_clear();
                println!(
                    "destroyed {} subjects ({} index entries examined, {} buckets rotated) in {:.3} s",
                    r.expired,
                    r.examined,
                    r.buckets_rotated,
                    r.took.as_secs_f64()
                );
            }
            Ok(0)
        }
        Command::Consent { action } => consent_cmd(&cli, action),
        Command::Audit { action } => {
            let (store, _) = open(&cli)?;
            match action {
                AuditCmd::Verify => {
                    let head = store.audit().verify_chain()?;
                    println!(
                        "audit chain intact: {} entries, head {}",
                        head.entries,
                        hex(&head.last_mac)
                    );
                }
                AuditCmd::Export { out } => {
                    let n = match out {
                        Some(path) => {
                            let mut o = std::fs::OpenOptions::new();
                            o.write(true).create(true).truncate(true);
                            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
                            let f = o
                                .open(path)
                                .map_err(|e| input(format!("{}: {e}", path.display())))?;
                            // An existing file keeps its mode on open: set it.
                            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                                .map_err(|e| input(format!("{}: {e}", path.display())))?;
                            store.audit().export(std::io::BufWriter::new(f))?
                        }
                        None => match store.audit().export(std::io::stdout().lock()) {
                            Ok(n) => n,
                            // `bioseal audit export | head`: the reader is
                            // gone; stop quietly.
                            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                                return Ok(0)
                            }
                            Err(e) => return Err(e.into()),
                        },
                    };
                    eprintln!("exported {n} entries");
                }
            }
            Ok(0)
        }
        Command::Stats => {
            let (store, settings) = open(&cli)?;
            let s = store.stats()?;
            println!("subjects          {}", s.subjects);
            println!("buckets           {}", s.buckets);
            println!("pending shreds    {}", s.pending_shreds);
            println!(
                "key generations   {}..={}",
                s.generation_min, s.generation_max
            );
            println!(
                "model             {} ({} dimensions)",
                settings.model, settings.dim
            );
            println!(
                "threshold         {} (cosine, from the keyring)",
                store.threshold().as_cosine()
            );
            if let Some(fmr) = settings.target_fmr {
                println!("target FMR        {fmr:e}");
            }
            if let Some(src) = &settings.calibration_source {
                println!("calibrated from   {src}");
            }
            println!("disk use          {} bytes", disk_use(store.dir()));
            Ok(0)
        }
        Command::Calibrate {
            pairs,
            target_fmr,
            apply,
        } => calibrate_cmd(&cli, pairs, *target_fmr, *apply),
    }
}

fn consent_cmd(cli: &Cli, action: &ConsentCmd) -> R<u8> {
    let (store, _) = open(cli)?;
    match action {
        ConsentCmd::Show { subject } => {
            let s = store.consent_status(subject)?;
            let purposes: Vec<&str> = s.purposes.iter().map(Purpose::as_str).collect();
            println!("purposes          {}", purposes.join(", "));
            if let Some(g) = s.granted_at {
                println!("granted           {}", when(g));
            }
            println!("expires           {}", when(s.expires_at));
            println!("last interaction  {}", when(s.last_interaction));
            println!("deadline          {}", when(s.deadline));
            println!("policy version    {}", s.policy_version);
            if let Some(e) = s.evidence {
                println!("evidence sha256   {}", hex(&e));
            }
        }
        ConsentCmd::Renew {
            subject,
            purposes,
            expires,
            evidence,
        } => {
            let consent = consent_from(purposes, expires, &sha256_file(evidence)?)?;
            let s = store.renew_consent(subject, consent)?;
            println!("renewed {subject}; deadline {}", when(s.deadline));
        }
        ConsentCmd::Withdraw { subject, purpose } => {
            let purpose = Purpose::new(purpose.clone()).map_err(|e| input(e.to_string()))?;
            match store.withdraw_purpose(subject, &purpose)? {
                Withdrawal::Remaining(rest) => {
                    let rest: Vec<&str> = rest.iter().map(Purpose::as_str).collect();
                    println!(
                        "withdrew {}; remaining: {}",
                        purpose.as_str(),
                        rest.join(", ")
                    );
                }
                Withdrawal::Revoked(_) => {
                    println!("withdrew the last purpose; {subject} revoked and shredded")
                }
            }
        }
    }
    Ok(0)
}

#[derive(Deserialize)]
struct BulkLine {
    subject: String,
    embedding: Vec<f32>,
    purposes: Vec<String>,
    expires: String,
    evidence_sha256: String,
}

fn bulk_enroll(cli: &Cli, path: &Path) -> R<u8> {
    let (store, _) = open(cli)?;
    let lines = read_lines(path)?;
    let bar = progress(lines.len() as u64, "enrolling");
    let (mut ok, mut failed) = (0usize, 0usize);
    for chunk in lines.chunks(1000).enumerate() {
        let (c, chunk) = chunk;
        let mut items = Vec::new();
        let mut line_nos = Vec::new();
        for (i, text) in chunk.iter().enumerate() {
            let n = c * 1000 + i + 1;
            let parsed = serde_json::from_str::<BulkLine>(text)
                .map_err(|e| input(format!("malformed JSON: {e}")))
                .and_then(|l| {
                    let digest = parse_hex32(&l.evidence_sha256)?;
                    let consent = consent_from(&l.purposes, &l.expires, &digest)?;
                    Ok((l.subject, Embedding::new(l.embedding), consent))
                });
            match parsed {
                Ok(item) => {
                    items.push(item);
                    line_nos.push(n);
                }
                Err(Fail(_, msg)) => {
                    eprintln!("line {n}: {msg}");
                    failed += 1;
                }
            }
        }
        for (n, r) in line_nos.iter().zip(store.enroll_many(items)?) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    eprintln!("line {n}: {e}");
                    failed += 1;
                }
            }
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!("enrolled {ok} subjects; {failed} lines failed");
    Ok(if failed > 0 { 3 } else { 0 })
}

#[derive(Deserialize)]
struct PairLine {
    identity: String,
    embedding: Vec<f32>,
}

fn calibrate_cmd(cli: &Cli, pairs: &Path, target_fmr: f64, apply: bool) -> R<u8> {
    let lines = read_lines(pairs)?;
    let bar = progress(lines.len() as u64, "reading");
    let mut samples = Vec::with_capacity(lines.len());
    for (i, text) in lines.iter().enumerate() {
        let l: PairLine = serde_json::from_str(text).map_err(|e| {
            input(format!(
                "{} line {}: malformed JSON: {e}",
                pairs.display(),
                i + 1
            ))
        })?;
        samples.push((l.identity, Embedding::new(l.embedding)));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let dim = samples
        .first()
        .map(|(_, e)| e.dimension())
        .ok_or_else(|| input(format!("{} holds no samples", pairs.display())))?;
    let spinner = spinner("scoring pairs");
    let c: Calibration = calibrate::calibrate(samples, dim, target_fmr)?;
    spinner.finish_and_clear();
    println!("genuine pairs     {}", c.genuine_pairs);
    println!("impostor pairs    {}", c.impostor_pairs);
    println!("target FMR        {:e}", c.target_fmr);
    println!("threshold         {} (cosine)", c.threshold.as_cosine());
    println!("FMR at threshold  {:.3e}", c.fmr);
    println!("FNMR at threshold {:.6}", c.fnmr);
    println!(
        "EER               {:.6} (at cosine {})",
        c.eer,
        c.eer_threshold.as_cosine()
    );
    if !c.met {
        eprintln!(
            "warning: no threshold up to cosine 1 reaches FMR <= {target_fmr:e}: impostor pairs score at the top of the scale"
        );
    }
    if !c.sufficient {
        eprintln!(
            "warning: {} impostor pairs cannot support FMR <= {:e}: at least {:.0} (3/FMR) are needed",
            c.impostor_pairs,
            target_fmr,
            (3.0 / target_fmr).ceil()
        );
    }
    if apply {
        let dir = store_dir(cli)?;
        let mut s = read_settings(dir)?;
        if s.dim != dim {
            return Err(input(format!(
                "the evaluation set has dimension {dim}, the store {}",
                s.dim
            )));
        }
        let (store, _) = open_with(cli, read_settings(dir)?)?;
        store.set_threshold(c.threshold)?;
        drop(store);
        s.threshold = c.threshold.as_cosine();
        s.target_fmr = Some(target_fmr);
        s.calibration_source = Some(format!(
            "{} (sha256 {})",
            pairs.display(),
            hex(&sha256_file(pairs)?)
        ));
        write_settings(dir, &s)?;
        println!(
            "applied to the keyring (audited); mirrored in {}",
            dir.join(SETTINGS_FILE).display()
        );
    }
    Ok(0)
}

fn progress(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(what);
    if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} ({eta})") {
        bar.set_style(style);
    }
    bar
}

fn spinner(what: &'static str) -> ProgressBar {
    let s = ProgressBar::new_spinner().with_message(what);
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

fn read_lines(path: &Path) -> R<Vec<String>> {
    let f = std::fs::File::open(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| input(format!("{}: {e}", path.display())))?;
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    Ok(out)
}

/// An embedding from a JSON array of numbers or a float32/float64 `.npy`,
/// checked against the store's dimension.
fn read_embedding(path: &Path, dim: usize) -> R<Embedding> {
    let bytes = std::fs::read(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let values = if bytes.starts_with(b"\x93NUMPY") {
        parse_npy(&bytes).map_err(|e| input(format!("{}: {e}", path.display())))?
    } else {
        serde_json::from_slice::<Vec<f32>>(&bytes).map_err(|e| {
            input(format!(
                "{}: malformed JSON (expected an array of numbers): {e}",
                path.display()
            ))
        })?
    };
    let e = Embedding::new(values);
    e.check(dim)
        .map_err(|err| input(format!("{}: invalid embedding: {err}", path.display())))?;
    Ok(e)
}

/// A one-dimensional (or 1 x n) little-endian float32 or float64 array in
/// NumPy's .npy format, versions 1 to 3.
fn parse_npy(b: &[u8]) -> Result<Vec<f32>, String> {
    let bad = |m: &str| format!("not a supported .npy file: {m}");
    let major = *b.get(6).ok_or_else(|| bad("truncated"))?;
    let (len, start): (usize, usize) = match major {
        1 => (
            usize::from(u16::from_le_bytes([
                *b.get(8).ok_or_else(|| bad("truncated"))?,
                *b.get(9).ok_or_else(|| bad("truncated"))?,
            ])),
            10,
        ),
        2 | 3 => {
            let h: [u8; 4] = b
                .get(8..12)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| bad("truncated"))?;
            (u32::from_le_bytes(h) as usize, 12)
        }
        _ => return Err(bad("unknown version")),
    };
    let header = b
        .get(start..start.saturating_add(len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("bad header"))?;
    let compact: String = header.chars().filter(|c| !c.is_whitespace()).collect();
    let width = if compact.contains("'descr':'<f4'") {
        4
    } else if compact.contains("'descr':'<f8'") {
        8
    } else {
        return Err(bad("dtype must be little-endian float32 or float64"));
    };
    if compact.contains("'fortran_order':True") {
        return Err(bad("Fortran order"));
    }
    let shape = compact
        .split("'shape':(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| bad("bad shape")))
        .collect::<Result<_, _>>()?;
    let n = match dims.as_slice() {
        [n] | [1, n] => *n,
        _ => return Err(bad("expected one vector (shape (n,) or (1, n))")),
    };
    let data = &b[start + len..];
    if Some(data.len()) != n.checked_mul(width) {
        return Err(bad("data length does not match the shape"));
    }
    Ok(if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect()
    })
}

fn consent_from(purposes: &[String], expires: &str, evidence: &[u8; 32]) -> R<Consent> {
    let purposes = purposes
        .iter()
        .map(|p| Purpose::new(p.clone()).map_err(|e| input(e.to_string())))
        .collect::<R<Vec<_>>>()?;
    Ok(Consent::new(purposes)
        .expires_at(parse_expiry(expires)?)
        .evidence(*evidence))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `YYYY-MM-DD` (midnight UTC) or a duration from now: `90d`, `12w`, `1y`
/// (365 days), `36h`.
fn parse_expiry(s: &str) -> R<Timestamp> {
    let bad = || {
        input(format!(
            "bad --expires {s:?}: use a date (2027-06-01) or 90d, 12w, 1y, 36h, 30m, 90s"
        ))
    };
    if let Some((num, unit)) = s.char_indices().last().map(|(i, c)| (&s[..i], c)) {
        if let (Ok(n), Some(secs)) = (
            num.parse::<u64>(),
            match unit {
                's' => Some(1),
                'm' => Some(60),
                'h' => Some(3_600),
                'd' => Some(86_400),
                'w' => Some(7 * 86_400),
                'y' => Some(365 * 86_400),
                _ => None,
            },
        ) {
            let d = n.checked_mul(secs).ok_or_else(bad)?;
            return Ok(Timestamp::from_unix_secs(now_secs().saturating_add(d)));
        }
    }
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if days_to_civil(days) != (y, m, d) {
        return Err(bad());
    }
    Ok(Timestamp::from_unix_secs(days as u64 * 86_400))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_to_civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A timestamp as `YYYY-MM-DD HH:MM:SS UTC`.
fn when(t: Timestamp) -> String {
    let secs = t.unix_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let (y, m, d) = days_to_civil(days);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn sha256_file(path: &Path) -> R<[u8; 32]> {
    let bytes = std::fs::read(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Ok(out)
}

fn parse_hex32(s: &str) -> R<[u8; 32]> {
    let bad = || input(format!("evidence_sha256 must be 64 hex digits, got {s:?}"));
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += disk_use(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        assert_eq!(
            parse_expiry("2027-06-01").ok(),
            Some(Timestamp::from_unix_secs(1_811_808_000))
        );
        assert_eq!(days_from_civil(2000, 2, 29), 11_016);
        assert_eq!(days_to_civil(11_016), (2000, 2, 29));
        for bad in [
            "2027-02-29",
            "2027-13-01",
            "2027-00-10",
            "27-1-1x",
            "",
            "d",
            "-5d",
            "1x",
        ] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
        let now = now_secs();
        let t = parse_expiry("90d").ok().map(|t| t.unix_secs());
        assert!(t.is_some_and(|t| t >= now + 90 * 86_400 && t <= now + 90 * 86_400 + 5));
    }

    #[test]
    fn npy_versions_and_shapes() {
        let body: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let file = |header: &str| {
            let mut b = b"\x93NUMPY\x01\x00".to_vec();
            b.extend_from_slice(&(header.len() as u16).to_le_bytes());
            b.extend_from_slice(header.as_bytes());
            b.extend_from_slice(&body);
            b
        };
        let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
        assert_eq!(parse_npy(&file(ok)), Ok(vec![1.5, -2.0]));
        let row = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        assert_eq!(parse_npy(&file(row)), Ok(vec![1.5, -2.0]));
        for bad in [
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
            // Shapes whose byte count overflows (a debug build panicked).
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2305843009213693952,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4611686018427387905), }",
        ] {
            assert!(parse_npy(&file(bad)).is_err(), "{bad}");
        }
        assert!(parse_npy(b"\x93NUMPY\x01").is_err());
    }

    #[test]
    fn timestamps_print_as_utc_dates() {
        assert_eq!(
            when(Timestamp::from_unix_secs(0)),
            "1970-01-01 00:00:00 UTC"
        );
        assert_eq!(
            when(Timestamp::from_unix_secs(1_811_808_000 + 3_723)),
            "2027-06-01 01:02:03 UTC"
        );
    }
}
