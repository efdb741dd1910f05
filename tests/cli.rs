//! The `bioseal` binary, run as a subprocess: every subcommand, and bad
//! input (missing file, malformed JSON, NaN, wrong dimension, wrong root
//! key) giving a one-line message, a non-zero exit code and an unchanged
//! store.

mod common;
use common::{read_all_files, Kind, Rng};
use std::path::{Path, PathBuf};
use std::process::Command;

const DIM: usize = 16;

struct Cli {
    _tmp: tempfile::TempDir,
    store: PathBuf,
    key: PathBuf,
    files: PathBuf,
    /// `key` is an epoch file (`--epochs`), not a root key.
    epochs: bool,
    /// The keys are in a PKCS#11 token (these variables name it).
    hsm: Option<Vec<(String, String)>>,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn new() -> Cli {
        Cli::with(Kind::Sled)
    }

    /// A CLI on a store directory, or on a fresh PostgreSQL database.
    fn with(kind: Kind) -> Cli {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (store, key, files) = (
            match kind {
                Kind::Sled => tmp.path().join("store"),
                Kind::Postgres => PathBuf::from(common::pg::fresh_database()),
            },
            tmp.path().join("root.key"),
            tmp.path().join("files"),
        );
        std::fs::create_dir(&files).expect("mkdir");
        Cli {
            _tmp: tmp,
            store,
            key,
            files,
            epochs: false,
            hsm: None,
        }
    }

    /// A CLI on a store directory whose epoch keys are in SoftHSM2.
    fn with_hsm(prefix: &str) -> (Cli, Vec<(String, String)>) {
        let mut cli = Cli::new();
        cli.epochs = false;
        let _ = common::hsm::token_dir();
        let env = vec![
            (
                "BIOSEAL_PKCS11_MODULE".to_owned(),
                common::hsm::MODULE.to_owned(),
            ),
            (
                "BIOSEAL_PKCS11_TOKEN".to_owned(),
                common::hsm::TOKEN.to_owned(),
            ),
            ("BIOSEAL_PKCS11_PREFIX".to_owned(), prefix.to_owned()),
            ("BIOSEAL_PKCS11_PIN".to_owned(), common::hsm::PIN.to_owned()),
        ];
        cli.hsm = Some(env.clone());
        (cli, env)
    }

    /// A CLI on a store directory whose keys are an epoch file.
    fn with_epochs() -> Cli {
        let mut cli = Cli::new();
        cli.key = cli.key.with_file_name("bioseal.epochs");
        cli.epochs = true;
        cli
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with_key(&self.key, args)
    }

    fn run_with_key(&self, key: &Path, args: &[&str]) -> Out {
        self.run_with_key_kind(key, self.epochs, args)
    }

    /// With `key` as an epoch file (`epochs`) or a root key file.
    fn run_with_key_kind(&self, key: &Path, epochs: bool, args: &[&str]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bioseal"));
        cmd.arg("--store").arg(&self.store);
        match &self.hsm {
            Some(env) => {
                cmd.envs(env.iter().map(|(k, v)| (k, v)));
            }
            None => {
                cmd.arg(if epochs { "--epochs" } else { "--root-key" })
                    .arg(key);
            }
        }
        let out = cmd
            // The keyring beside the real root key, whichever key is passed.
            .arg("--keys")
            .arg(self.key.parent().expect("key dir"))
            .args(args)
            .env_remove("BIOSEAL_STORE")
            .env_remove("BIOSEAL_ROOT_KEY_FILE")
            .env_remove("BIOSEAL_EPOCHS_FILE")
            .env_remove(if self.hsm.is_some() {
                "BIOSEAL_UNUSED"
            } else {
                "BIOSEAL_PKCS11_MODULE"
            })
            .env_remove("BIOSEAL_KEYS")
            .output()
            .expect("run bioseal");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.files.join(name);
        std::fs::write(&p, bytes).expect("write");
        p.to_string_lossy().into_owned()
    }

    fn json(&self, name: &str, v: &[f32]) -> String {
        self.file(name, serde_json::to_string(v).expect("json").as_bytes())
    }

    fn init(&self) {
        let o = self.run(&[
            "init",
            "--model",
            "m1",
            "--dim",
            &DIM.to_string(),
            "--threshold",
            "0.5",
            "--buckets",
            "16",
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
    }
}

/// A float32 .npy file of `v` (format version 1).
fn npy(v: &[f32]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        v.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn assert_error(o: &Out, code: i32, needle: &str) {
    assert_eq!(o.code, code, "stdout {:?} stderr {:?}", o.stdout, o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "one line: {:?}", o.stderr);
    assert!(o.stderr.starts_with("error: "), "{:?}", o.stderr);
    assert!(o.stderr.contains(needle), "{needle:?} in {:?}", o.stderr);
}

impl Cli {
    /// `bioseal verify`.
    fn verify(&self, subject: &str, purpose: &str, embedding: &str) -> Out {
        self.run(&[
            "verify",
            "--subject",
            subject,
            "--purpose",
            purpose,
            "--embedding",
            embedding,
        ])
    }

    /// `bioseal enroll` for `subject` with one purpose.
    fn enroll(
        &self,
        subject: &str,
        embedding: &str,
        purpose: &str,
        expires: &str,
        evidence: &str,
    ) -> Out {
        self.run(&[
            "enroll",
            "--subject",
            subject,
            "--embedding",
            embedding,
            "--purpose",
            purpose,
            "--expires",
            expires,
            "--evidence",
            evidence,
        ])
    }
}

fn enroll_alice(cli: &Cli, v: &[f32]) {
    let e = cli.json("alice.json", v);
    let ev = cli.file("release.pdf", b"signed consent release");
    let o = cli.run(&[
        "enroll",
        "--subject",
        "alice",
        "--embedding",
        &e,
        "--purpose",
        "identity-verification",
        "--purpose",
        "impersonation-check",
        "--expires",
        "365d",
        "--evidence",
        &ev,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "enrolled alice");
}

#[test]
fn init_writes_a_0600_key_and_refuses_to_overwrite() {
    let cli = Cli::new();
    cli.init();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&cli.key).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read(&cli.key).expect("read");
    let o = cli.run(&["init", "--model", "m", "--dim", "4", "--threshold", "0.5"]);
    assert_error(&o, 3, "refusing to overwrite");
    assert_eq!(std::fs::read(&cli.key).expect("read"), key);
}

fn enroll_verify_consent_revoke_stats_and_audit(k: Kind) {
    let cli = Cli::with(k);
    cli.init();
    let mut rng = Rng(77);
    let alice = rng.unit(DIM);
    enroll_alice(&cli, &alice);

    let genuine = cli.file("probe.npy", &npy(&rng.noisy(&alice, 0.2)));
    let o = cli.verify("alice", "identity-verification", &genuine);
    assert_eq!((o.code, o.stdout.trim()), (0, "match"), "{}", o.stderr);
    let impostor = cli.json("impostor.json", &rng.unit(DIM));
    let o = cli.verify("alice", "identity-verification", &impostor);
    assert_eq!((o.code, o.stdout.trim()), (1, "no-match"), "{}", o.stderr);
    let o = cli.verify("alice", "marketing", &genuine);
    assert_error(&o, 5, "purpose");

    let o = cli.run(&["consent", "show", "--subject", "alice"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o
        .stdout
        .contains("identity-verification, impersonation-check"));
    assert!(o.stdout.contains("evidence sha256"));
    let o = cli.run(&[
        "consent",
        "withdraw",
        "--subject",
        "alice",
        "--purpose",
        "impersonation-check",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("remaining: identity-verification"));
    let ev = cli.file("release2.pdf", b"second release");
    let o = cli.run(&[
        "consent",
        "renew",
        "--subject",
        "alice",
        "--purpose",
        "identity-verification",
        "--expires",
        "700d",
        "--evidence",
        &ev,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);

    let o = cli.run(&["sweep", "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("0 subjects are due"), "{}", o.stdout);
    let o = cli.run(&["sweep"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("destroyed 0 subjects"), "{}", o.stdout);

    let o = cli.run(&["stats"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("subjects          1"), "{}", o.stdout);
    assert_eq!(o.stdout.contains("disk use"), k == Kind::Sled);

    let o = cli.run(&["audit", "verify"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("audit chain intact"), "{}", o.stdout);
    let export = cli.files.join("audit.jsonl");
    let o = cli.run(&["audit", "export", "--out", &export.to_string_lossy()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let text = std::fs::read_to_string(&export).expect("export");
    // enroll, three verifies, withdraw, renew, sweep (a dry run logs
    // nothing), and a key rotation for each of the no-match, the refused
    // purpose, the withdrawal and the renewal.
    assert_eq!(text.lines().count(), 11, "{text}");
    assert_eq!(
        text.matches("\"event\":\"key-rotation\"").count(),
        4,
        "{text}"
    );
    assert!(
        text.contains("\"outcome\":\"purpose-not-consented\""),
        "{text}"
    );
    assert!(!text.contains("alice"));
    let first = format!("{}", alice[0]);
    assert!(!text.contains(&first[..first.len().min(8)]));

    let o = cli.run(&["revoke", "--subject", "alice"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("shredded"), "{}", o.stdout);
    let o = cli.verify("alice", "identity-verification", &genuine);
    assert_error(&o, 4, "not enrolled");
    let o = cli.run(&["revoke", "--subject", "alice"]);
    assert_error(&o, 4, "not enrolled");
}

/// Bad input: a one-line error, the documented exit code, and not one byte
/// of the store changed.
#[test]
fn bad_input_is_refused_and_leaves_the_store_unchanged() {
    let cli = Cli::new();
    cli.init();
    let mut rng = Rng(78);
    let alice = rng.unit(DIM);
    enroll_alice(&cli, &alice);
    let before = read_all_files(&cli.store);
    let mut nan = alice.clone();
    nan[3] = f32::NAN;
    let cases: Vec<(String, i32, &str)> = vec![
        (
            cli.files.join("nope.json").to_string_lossy().into(),
            3,
            "No such file",
        ),
        (cli.file("bad.json", b"[0.1, 0.2,"), 3, "malformed JSON"),
        (cli.file("obj.json", b"{\"x\": 1}"), 3, "malformed JSON"),
        (cli.file("nan.npy", &npy(&nan)), 3, "NaN"),
        (
            cli.json("short.json", &alice[..DIM - 1]),
            3,
            "wrong dimension",
        ),
        (
            cli.file("zero.json", b"[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]"),
            3,
            "zero",
        ),
        (cli.file("trunc.npy", &npy(&alice)[..100]), 3, ".npy"),
    ];
    for (file, code, needle) in &cases {
        for cmd in ["verify", "enroll"] {
            let o = if cmd == "verify" {
                cli.verify("alice", "identity-verification", file)
            } else {
                let ev = cli.file("ev.pdf", b"release");
                cli.enroll("bob", file, "identity-verification", "30d", &ev)
            };
            assert_error(&o, *code, needle);
        }
    }
    // Wrong root key.
    let wrong = cli.files.join("wrong.key");
    bioseal::RootKey::from_bytes([0x11; 32])
        .write_new_file(&wrong)
        .expect("key");
    let probe = cli.json("alice2.json", &alice);
    let o = cli.run_with_key(
        &wrong,
        &[
            "verify",
            "--subject",
            "alice",
            "--purpose",
            "identity-verification",
            "--embedding",
            &probe,
        ],
    );
    assert_error(&o, 7, "root key");
    // Missing evidence file, bad expiry.
    let o = cli.enroll("bob", &probe, "p", "30d", "/nonexistent/release.pdf");
    assert_error(&o, 3, "release.pdf");
    let ev = cli.file("ev2.pdf", b"release");
    let o = cli.enroll("bob", &probe, "p", "2027-02-30", &ev);
    assert_error(&o, 3, "--expires");
    assert!(read_all_files(&cli.store) == before, "the store changed");
    // A missing argument is a usage error (clap, exit 2).
    let o = cli.run(&["verify", "--subject", "alice"]);
    assert_eq!(o.code, 2);
}

#[test]
fn bulk_enroll_reports_bad_lines_and_enrolls_the_rest() {
    let cli = Cli::new();
    cli.init();
    let mut rng = Rng(79);
    let mut lines = Vec::new();
    for i in 0..20 {
        let v = if i == 5 {
            rng.unit(DIM - 2)
        } else {
            rng.unit(DIM)
        };
        lines.push(
            serde_json::json!({
                "subject": format!("s{i}"),
                "embedding": v,
                "purposes": ["identity-verification"],
                "expires": "90d",
                "evidence_sha256": "ab".repeat(32),
            })
            .to_string(),
        );
    }
    lines.insert(9, "{not json".into());
    let f = cli.file("bulk.jsonl", lines.join("\n").as_bytes());
    let o = cli.run(&["enroll", "--jsonl", &f]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stdout.contains("enrolled 19 subjects; 2 lines failed"),
        "{}",
        o.stdout
    );
    assert!(o.stderr.contains("line 6: ") && o.stderr.contains("wrong dimension"));
    assert!(o.stderr.contains("line 10: malformed JSON"), "{}", o.stderr);
    let o = cli.run(&["stats"]);
    assert!(o.stdout.contains("subjects          19"), "{}", o.stdout);
}

#[test]
fn calibrate_prints_rates_warns_on_small_sets_and_applies() {
    let cli = Cli::new();
    cli.init();
    let mut rng = Rng(80);
    let mut lines = Vec::new();
    for id in 0..40 {
        let base = rng.unit(DIM);
        for _ in 0..3 {
            lines.push(
                serde_json::json!({"identity": format!("p{id}"), "embedding": rng.noisy(&base, 0.3)})
                    .to_string(),
            );
        }
    }
    let pairs = cli.file("pairs.jsonl", lines.join("\n").as_bytes());
    let o = cli.run(&["calibrate", "--pairs", &pairs, "--target-fmr", "1e-4"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // 120 samples: 120 genuine pairs, 7020 impostor pairs < 3 / 1e-4.
    assert!(o.stdout.contains("genuine pairs     120"), "{}", o.stdout);
    assert!(o.stdout.contains("impostor pairs    7020"), "{}", o.stdout);
    assert!(
        o.stderr
            .contains("warning: 7020 impostor pairs cannot support"),
        "{}",
        o.stderr
    );
    let o = cli.run(&[
        "calibrate",
        "--pairs",
        &pairs,
        "--target-fmr",
        "0.01",
        "--apply",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stderr.contains("warning"), "{}", o.stderr);
    let settings = std::fs::read_to_string(cli.store.join("bioseal.json")).expect("settings");
    assert!(settings.contains("\"target_fmr\": 0.01"), "{settings}");
    assert!(settings.contains("pairs.jsonl (sha256 "), "{settings}");
    let o = cli.run(&["stats"]);
    assert!(o.stdout.contains("target FMR        1e-2"), "{}", o.stdout);
    let bad = cli.file("bad.jsonl", b"{\"identity\": \"a\"}\n");
    let o = cli.run(&["calibrate", "--pairs", &bad]);
    assert_error(&o, 3, "line 1: malformed JSON");
}

/// Issue 11 §2, §3, §7 through the CLI: `add-template` needs a match first;
/// the threshold is the keyring's, so editing `bioseal.json` changes no
/// decision; a restored copy of the store is refused with exit 10 and opens
/// with `--accept-rollback`; a root key or key directory inside the store
/// is refused.
#[test]
fn add_template_threshold_mirror_rollback_and_key_placement() {
    let cli = Cli::new();
    cli.init();
    let mut rng = Rng(91);
    let (alice, other, impostor) = (rng.unit(DIM), rng.unit(DIM), rng.unit(DIM));
    enroll_alice(&cli, &alice);
    let (a, b, x) = (
        cli.json("a.json", &alice),
        cli.json("b.json", &other),
        cli.json("x.json", &impostor),
    );
    let add = |probe: &str, new: &str| {
        cli.run(&[
            "add-template",
            "--subject",
            "alice",
            "--purpose",
            "identity-verification",
            "--probe",
            probe,
            "--embedding",
            new,
        ])
    };
    let o = add(&x, &b);
    assert_eq!((o.code, o.stdout.trim()), (1, "no-match"), "{}", o.stderr);
    assert_eq!(cli.verify("alice", "identity-verification", &b).code, 1);
    let o = add(&a, &b);
    assert_eq!((o.code, o.stdout.trim()), (0, "added"), "{}", o.stderr);
    assert_eq!(cli.verify("alice", "identity-verification", &b).code, 0);
    // Enrolling over alice is refused.
    let ev = cli.file("release2.pdf", b"another release");
    let o = cli.enroll("alice", &x, "identity-verification", "30d", &ev);
    assert_error(&o, 3, "already enrolled");

    // The mirror: a threshold of 0.01 in bioseal.json would match anyone.
    let settings = cli.store.join("bioseal.json");
    let text = std::fs::read_to_string(&settings).expect("settings");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut v = v;
    v["threshold"] = serde_json::json!(0.01);
    std::fs::write(&settings, v.to_string()).expect("edit");
    assert_eq!(
        cli.verify("alice", "identity-verification", &x).code,
        1,
        "the edited mirror changed a decision"
    );
    let o = cli.run(&["stats"]);
    assert!(
        o.stdout
            .contains("threshold         0.5 (cosine, from the keyring)"),
        "{}",
        o.stdout
    );

    // Roll the store directory back to a copy taken before a revocation.
    let copy = cli.files.join("store-copy");
    common::copy_dir(&cli.store, &copy);
    assert_eq!(cli.run(&["revoke", "--subject", "alice"]).code, 0);
    std::fs::remove_dir_all(&cli.store).expect("rm");
    common::copy_dir(&copy, &cli.store);
    let o = cli.verify("alice", "identity-verification", &a);
    assert_error(&o, 10, "rolled back");
    let o = cli.run(&["--accept-rollback", "audit", "verify"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // alice's bucket was rotated by the revocation: her old copy is dead.
    let o = cli.verify("alice", "identity-verification", &a);
    assert_error(&o, 7, "key unavailable");

    // Keys inside the store are refused.
    let inside = cli.store.join("root.key");
    std::fs::copy(&cli.key, &inside).expect("copy");
    let o = cli.run_with_key(&inside, &["stats"]);
    assert_error(&o, 3, "inside the store directory");
    std::fs::remove_file(&inside).expect("rm");
    let out = Command::new(env!("CARGO_BIN_EXE_bioseal"))
        .arg("--store")
        .arg(&cli.store)
        .arg("--root-key")
        .arg(&cli.key)
        .arg("--keys")
        .arg(cli.store.join("keys"))
        .arg("stats")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inside the store directory"));
}

/// Issue 11 §8: whatever the umask (0 here) and an existing directory's
/// mode (0755 here), every file bioseal creates is 0600 and every directory
/// 0700, the audit export included; a closed pipe ends `audit export`
/// quietly; `--expires` takes seconds and minutes.
#[test]
fn private_modes_under_umask_0_closed_pipe_and_short_expiries() {
    use std::os::unix::fs::PermissionsExt;
    let cli = Cli::new();
    std::fs::create_dir(&cli.store).expect("mkdir");
    std::fs::set_permissions(&cli.store, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sh = |args: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 000; exec \"$BIOSEAL\" --store \"$STORE\" --root-key \"$KEY\" {args}"
            ))
            .env("BIOSEAL", env!("CARGO_BIN_EXE_bioseal"))
            .env("STORE", &cli.store)
            .env("KEY", &cli.key)
            .env_remove("BIOSEAL_KEYS")
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sh(&format!("init --model m1 --dim {DIM} --threshold 0.5"));
    let mut rng = Rng(5);
    let e = cli.json("e.json", &rng.unit(DIM));
    let ev = cli.file("ev.pdf", b"release");
    for (i, expires) in ["90s", "30m"].iter().enumerate() {
        sh(&format!(
            "enroll --subject s{i} --embedding {e} --purpose identity-verification --expires {expires} --evidence {ev}"
        ));
    }
    let export = cli.files.join("audit.jsonl");
    std::fs::write(&export, b"").expect("pre-existing");
    std::fs::set_permissions(&export, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    sh(&format!("audit export --out {}", export.display()));
    let keys = cli.key.parent().expect("key dir").to_path_buf();
    let mut checked = 0;
    let mut check = |p: &Path| {
        let m = std::fs::metadata(p).expect("meta");
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.permissions().mode() & 0o777, want, "{}", p.display());
        checked += 1;
    };
    fn walk(p: &Path, f: &mut dyn FnMut(&Path)) {
        f(p);
        if p.is_dir() {
            for e in std::fs::read_dir(p).expect("readdir") {
                walk(&e.expect("entry").path(), f);
            }
        }
    }
    walk(&cli.store, &mut check);
    check(&keys.join("bioseal.keyring"));
    check(&cli.key);
    check(&export);
    assert!(checked >= 8, "{checked}");

    // A reader that goes away after one line, while the log is far larger
    // than a pipe's buffer: no error, exit 0.
    let lines: Vec<String> = (0..800)
        .map(|i| {
            serde_json::json!({
                "subject": format!("bulk-{i}"),
                "embedding": rng.unit(DIM),
                "purposes": ["identity-verification"],
                "expires": "90d",
                "evidence_sha256": "ab".repeat(32),
            })
            .to_string()
        })
        .collect();
    let bulk = cli.file("bulk.jsonl", (lines.join("\n") + "\n").as_bytes());
    sh(&format!("enroll --jsonl {bulk}"));
    let out = Command::new("bash")
        .arg("-c")
        .arg("\"$BIOSEAL\" --store \"$STORE\" --root-key \"$KEY\" audit export | head -n 1 >/dev/null; exit ${PIPESTATUS[0]}")
        .env("BIOSEAL", env!("CARGO_BIN_EXE_bioseal"))
        .env("STORE", &cli.store)
        .env("KEY", &cli.key)
        .output()
        .expect("sh");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("error"),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

on_both_backends!(enroll_verify_consent_revoke_stats_and_audit);

#[test]
fn epochs_backup_revoke_restore_and_roll() {
    let cli = Cli::with_epochs();
    cli.init();
    let mode = std::fs::metadata(&cli.key)
        .expect("epoch file")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let mut rng = Rng(21);
    let (va, vb) = (rng.unit(DIM), rng.unit(DIM));
    enroll_alice(&cli, &va);
    let (eb, ev) = (cli.json("bob.json", &vb), cli.file("ev", b"release"));
    let o = cli.enroll("bob", &eb, "identity-verification", "365d", &ev);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = cli.run(&["epoch", "status"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("epoch              1"), "{}", o.stdout);
    assert!(o.stdout.contains("destruction delay  0 s"), "{}", o.stdout);
    let backup = cli.files.join("backup");
    let o = cli.run(&["backup", "--out", backup.to_str().expect("utf-8")]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("epoch 1"), "{}", o.stdout);
    let o = cli.run(&["revoke", "--subject", "alice"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("shredded at"), "{}", o.stdout);
    assert!(o.stdout.contains("backups inert by"), "{}", o.stdout);
    // The store directory is lost; the key directory survives.
    std::fs::remove_dir_all(&cli.store).expect("lose the store");
    let o = cli.run(&["restore", "--from", backup.to_str().expect("utf-8")]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("1 revocation-ledger entries replayed"),
        "{}",
        o.stdout
    );
    let (ea, eb) = (cli.json("a.json", &va), cli.json("b.json", &vb));
    assert_error(
        &cli.verify("alice", "identity-verification", &ea),
        4,
        "not enrolled",
    );
    assert_eq!(cli.verify("bob", "identity-verification", &eb).code, 0);
    let o = cli.run(&["epoch", "roll"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("rolled to epoch 2"), "{}", o.stdout);
    std::fs::remove_dir_all(&cli.store).expect("lose the store again");
    assert_error(
        &cli.run(&["restore", "--from", backup.to_str().expect("utf-8")]),
        7,
        "epoch 1 has been destroyed",
    );
}

#[test]
fn epochs_in_an_hsm_from_the_cli() {
    if common::hsm::skipped("epochs_in_an_hsm_from_the_cli") {
        return;
    }
    let _token = common::hsm::exclusive();
    let (cli, _) = Cli::with_hsm("cli-test");
    cli.init();
    let mut rng = Rng(31);
    let v = rng.unit(DIM);
    enroll_alice(&cli, &v);
    let o = cli.run(&["epoch", "roll"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("rolled to epoch 2"), "{}", o.stdout);
    let e = cli.json("a.json", &v);
    assert_eq!(cli.verify("alice", "identity-verification", &e).code, 0);
    let o = cli.run(&["revoke", "--subject", "alice"]);
    assert!(o.stdout.contains("backups inert by"), "{}", o.stdout);
    // Without the PIN: one line, exit 3, nothing opened.
    let out = Command::new(env!("CARGO_BIN_EXE_bioseal"))
        .args(["--store", cli.store.to_str().expect("utf-8"), "stats"])
        .env("BIOSEAL_PKCS11_MODULE", common::hsm::MODULE)
        .env("BIOSEAL_PKCS11_TOKEN", common::hsm::TOKEN)
        .env("BIOSEAL_KEYS", cli.key.parent().expect("dir"))
        .env_remove("BIOSEAL_PKCS11_PIN")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BIOSEAL_PKCS11_PIN"));
}

#[test]
fn a_root_key_store_moves_to_epoch_keys_from_the_cli() {
    let mut cli = Cli::new();
    cli.init();
    let v = Rng(41).unit(DIM);
    enroll_alice(&cli, &v);
    let root = cli.key.clone();
    cli.epochs = true;
    cli.key = root.with_file_name("bioseal.epochs");
    let o = cli.run(&[
        "epoch",
        "import",
        "--root-key-file",
        root.to_str().expect("utf-8"),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("as epoch 0"), "{}", o.stdout);
    let o = cli.run(&["epoch", "roll"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("rolled to epoch 1"), "{}", o.stdout);
    let e = cli.json("a.json", &v);
    assert_eq!(cli.verify("alice", "identity-verification", &e).code, 0);
    // The old root key no longer opens the store: the keyring is sealed
    // under epoch 1, which a fixed key (epoch 0) does not have.
    let o = cli.run_with_key_kind(&root, false, &["stats"]);
    assert_error(&o, 7, "key unavailable");
}

/// Split custody from the CLI: `--user-key FILE` (32 raw bytes or 64 hex
/// digits) on enroll, verify and add-template; `rekey`; a missing or wrong
/// key exits 12, a malformed key file 3.
#[test]
fn split_custody_from_the_cli() {
    let cli = Cli::new();
    cli.init();
    let mut rng = Rng(78);
    let v = rng.unit(DIM);
    let e = cli.json("alice.json", &v);
    let close = cli.json("close.json", &rng.noisy(&v, 0.2));
    let ev = cli.file("release.pdf", b"signed consent release");
    let raw: Vec<u8> = (0u8..32)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let key_raw = cli.file("user.key", &raw);
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let key_hex = cli.file("user.hex", format!("{hex}\n").as_bytes());
    let wrong = cli.file(
        "wrong.key",
        &[7u8; 31].iter().chain(&[8u8]).copied().collect::<Vec<_>>(),
    );
    let new = cli.file("new.hex", format!("{}cd", "ab".repeat(31)).as_bytes());
    let o = cli.run(&[
        "enroll",
        "--subject",
        "alice",
        "--embedding",
        &e,
        "--purpose",
        "identity-verification",
        "--expires",
        "365d",
        "--evidence",
        &ev,
        "--user-key",
        &key_raw,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("split custody"), "{}", o.stdout);
    let verify_as = |subject: &str, embedding: &str, key: Option<&str>| {
        let mut args = vec![
            "verify",
            "--subject",
            subject,
            "--purpose",
            "identity-verification",
            "--embedding",
            embedding,
        ];
        if let Some(k) = key {
            args.extend(["--user-key", k]);
        }
        cli.run(&args)
    };
    let verify = |key: Option<&str>| verify_as("alice", &close, key);
    // The same key as raw bytes and as hex.
    for k in [&key_raw, &key_hex] {
        let o = verify(Some(k));
        assert_eq!((o.code, o.stdout.trim()), (0, "match"), "{}", o.stderr);
    }
    assert_error(&verify(None), 12, "wrong or missing user key");
    assert_error(&verify(Some(&wrong)), 12, "wrong or missing user key");
    let bad = cli.file("bad.key", b"not a key");
    assert_error(&verify(Some(&bad)), 3, "invalid user key");
    // A template added with the key.
    let added = cli.json("added.json", &rng.noisy(&v, 0.3));
    let o = cli.run(&[
        "add-template",
        "--subject",
        "alice",
        "--purpose",
        "identity-verification",
        "--probe",
        &close,
        "--embedding",
        &added,
        "--user-key",
        &key_hex,
    ]);
    assert_eq!((o.code, o.stdout.trim()), (0, "added"), "{}", o.stderr);
    // Rekey: a wrong current key is refused, then the change; the old key
    // no longer opens.
    let o = cli.run(&[
        "rekey",
        "--subject",
        "alice",
        "--user-key",
        &wrong,
        "--new-user-key",
        &new,
    ]);
    assert_error(&o, 12, "wrong or missing user key");
    let o = cli.run(&[
        "rekey",
        "--subject",
        "alice",
        "--user-key",
        &key_raw,
        "--new-user-key",
        &new,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_error(&verify(Some(&key_raw)), 12, "wrong or missing user key");
    let o = verify(Some(&new));
    assert_eq!((o.code, o.stdout.trim()), (0, "match"), "{}", o.stderr);
    // A server-custody subject moved to split custody.
    let b = cli.json("bob.json", &rng.unit(DIM));
    let o = cli.run(&[
        "enroll",
        "--subject",
        "bob",
        "--embedding",
        &b,
        "--purpose",
        "identity-verification",
        "--expires",
        "365d",
        "--evidence",
        &ev,
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = cli.run(&["move-to-split", "--subject", "bob", "--user-key", &key_hex]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let bob = |key: Option<&str>| verify_as("bob", &b, key);
    assert_error(&bob(None), 12, "wrong or missing user key");
    let o = bob(Some(&key_raw));
    assert_eq!((o.code, o.stdout.trim()), (0, "match"), "{}", o.stderr);
    let o = cli.run(&["move-to-split", "--subject", "bob", "--user-key", &key_hex]);
    assert_error(&o, 3, "already in split custody");
    // Consent and revoke need no key.
    let o = cli.run(&["consent", "show", "--subject", "alice"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("custody           split"), "{}", o.stdout);
    let o = cli.run(&["revoke", "--subject", "alice"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_error(&verify(Some(&new)), 4, "not enrolled");
}

/// `calibrate --plot FILE.png`: a 1400x600 PNG that decodes and is not
/// blank (impostor red, genuine blue, the threshold in black); a warning
/// when FNMR at the target FMR exceeds 5% (a model too noisy for it), and
/// none when it does not.
#[test]
fn calibrate_draws_a_plot_and_warns_when_fnmr_exceeds_five_percent() {
    let cli = Cli::new();
    let pairs_of = |sigma: f32, seed: u64| {
        let mut rng = Rng(seed);
        let mut lines = Vec::new();
        for id in 0..60 {
            let base = rng.unit(DIM);
            for _ in 0..3 {
                lines.push(
                    serde_json::json!({"identity": format!("p{id}"), "embedding": rng.noisy(&base, sigma)})
                        .to_string(),
                );
            }
        }
        lines.join("\n")
    };
    let noisy = cli.file("noisy.jsonl", pairs_of(1.2, 81).as_bytes());
    let png_path = cli.files.join("det.png");
    let o = cli.run(&[
        "calibrate",
        "--pairs",
        &noisy,
        "--target-fmr",
        "1e-3",
        "--plot",
        &png_path.to_string_lossy(),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("exceeds 5% (NIST SP 800-63B-4)"),
        "{}",
        o.stderr
    );
    let decoder = png::Decoder::new(std::fs::File::open(&png_path).expect("the plot"));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!((info.width, info.height), (1400, 600));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(3).collect();
    let share =
        |f: &dyn Fn(&[u8]) -> bool| px.iter().filter(|p| f(p)).count() as f64 / px.len() as f64;
    let non_white = share(&|p| p != [255, 255, 255]);
    let reddish = share(&|p| p[0] > 200 && p[1] < 180 && p[2] < 180);
    let bluish = share(&|p| p[2] > 200 && p[0] < 180 && p[1] < 180);
    let dark = share(&|p| p.iter().all(|&c| c < 60));
    assert!(non_white > 0.05, "blank plot: {non_white}");
    assert!(
        reddish > 0.002 && bluish > 0.002 && dark > 0.001,
        "{reddish} {bluish} {dark}"
    );
    // A clean set: no FNMR warning.
    let clean = cli.file("clean.jsonl", pairs_of(0.3, 82).as_bytes());
    let o = cli.run(&["calibrate", "--pairs", &clean, "--target-fmr", "1e-3"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stderr.contains("exceeds 5%"), "{}", o.stderr);
    // A font that is not one: a clear error, exit 3, and no file.
    let bad_font = cli.file("font.ttf", b"not a font");
    let out = cli.files.join("none.png");
    let o = Command::new(env!("CARGO_BIN_EXE_bioseal"))
        .args([
            "--store",
            "/nonexistent",
            "calibrate",
            "--pairs",
            &clean,
            "--plot",
        ])
        .arg(&out)
        .env("BIOSEAL_PLOT_FONT", &bad_font)
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("font"));
    assert!(!out.exists());
}
