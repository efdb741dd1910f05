//! Shared mode: several replica processes (real processes, each with its
//! own `Store` on one PostgreSQL database), every promise intact.
//!
//! Each replica is this test binary run again as a worker
//! (`replica_worker`, active only under `BIOSEAL_REPLICA_URL`): it opens
//! the store and answers one-line commands on stdin. All replicas read the
//! time from one file (`FileClock`), which the test moves.

mod common;
use bioseal::{
    Clock, Decision, Embedding, Error, KeyProvider, Purpose, Store, StoreConfig, Threshold,
    Timestamp,
};
use common::{pg, Rng, DIM, MODEL, T0};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

const IDV: Purpose = Purpose::IDENTITY_VERIFICATION;

/// A clock every replica shares: Unix seconds in a file.
#[derive(Debug, Clone)]
struct FileClock(PathBuf);

impl Clock for FileClock {
    fn now(&self) -> Timestamp {
        let s = std::fs::read_to_string(&self.0).unwrap_or_default();
        Timestamp::from_unix_secs(s.trim().parse().unwrap_or(T0))
    }
}

impl FileClock {
    fn set(&self, secs: u64) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, secs.to_string()).expect("write clock");
        std::fs::rename(&tmp, &self.0).expect("rename clock");
    }
    fn advance(&self, d: Duration) {
        self.set(self.now().unix_secs() + d.as_secs());
    }
}

/// `pad`: attested presentation-attack detection (limits 10 and 100).
/// Every replica's keys: the epoch file beside the shared clock file (one
/// provider that all of them reach, as a network HSM would be).
fn config(url: &str, clock: &FileClock, buckets: u32, pad: bool) -> StoreConfig {
    let epochs = clock.0.with_file_name("bioseal.epochs");
    let provider = bioseal::FileEpochProvider::open(epochs).expect("epoch file");
    StoreConfig::new(url, provider)
        .presentation_attack_detection(pad)
        .model(MODEL, DIM)
        .threshold(Threshold::cosine(0.5))
        .buckets(buckets)
        .clock(clock.clone())
}

/// The template of `seed` (a probe with the same seed is genuine).
fn vector(seed: u64) -> Vec<f32> {
    Rng(seed).unit(DIM)
}

fn consent(now: Timestamp, days: u32) -> bioseal::Consent {
    bioseal::Consent::new([IDV])
        .expires_at(now.saturating_add(Duration::from_secs(86_400) * days))
        .evidence([7; 32])
}

/// An error's variant name (`LockedOut`, `NotEnrolled`, ...).
fn variant(e: &Error) -> String {
    format!("{e:?}")
        .split([' ', '{', '('])
        .next()
        .unwrap_or("")
        .to_owned()
}

fn answer<T>(r: Result<T, Error>, ok: impl FnOnce(T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => format!("err {}", variant(&e)),
    }
}

/// The worker: one replica. Commands (one per line), answers (one line):
/// - `enroll S SEED DAYS` → `ok` | `err Variant`
/// - `verify S SEED` → `Match` | `NoMatch` | `err Variant`
/// - `revoke S` → `ok` | `err Variant`
/// - `burst S SEED N` → N verifies at once: `Match=a NoMatch=b LockedOut=c ...`
/// - `verify_many ROUNDS S:SEED ...` → genuine verifies, round after round:
///   `match=a wrong=b errors=c first=Variant`
/// - `sweep` → `expired N`
#[test]
fn replica_worker() {
    let (Ok(url), Ok(clock)) = (
        std::env::var("BIOSEAL_REPLICA_URL"),
        std::env::var("BIOSEAL_REPLICA_CLOCK"),
    ) else {
        return; // only as a spawned worker
    };
    let buckets = std::env::var("BIOSEAL_REPLICA_BUCKETS")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or(1);
    let clock = FileClock(PathBuf::from(clock));
    let pad = std::env::var("BIOSEAL_REPLICA_PAD").is_ok_and(|v| v == "1");
    let store = Store::open(config(&url, &clock, buckets, pad)).expect("replica opens the store");
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready").expect("stdout");
    out.flush().expect("flush");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            w.get(i)
                .and_then(|x| x.parse::<u64>().ok())
                .expect("number")
        };
        let reply = match w.first().copied() {
            Some("enroll") => answer(
                store.enroll(
                    w[1],
                    Embedding::new(vector(num(2))),
                    consent(clock.now(), num(3) as u32),
                ),
                |_| "ok".into(),
            ),
            Some("verify") => answer(
                store.verify(w[1], &IDV, Embedding::new(vector(num(2)))),
                |d| format!("{d:?}"),
            ),
            Some("revoke") => answer(store.revoke(w[1]), |_| "ok".into()),
            Some("burst") => {
                let mut counts = std::collections::BTreeMap::<String, u32>::new();
                for _ in 0..num(3) {
                    let r = store.verify(w[1], &IDV, Embedding::new(vector(num(2))));
                    let k = match r {
                        Ok(d) => format!("{d:?}"),
                        Err(e) => variant(&e),
                    };
                    *counts.entry(k).or_default() += 1;
                }
                counts
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            }
            Some("verify_many") => {
                let (mut ok, mut wrong, mut errors, mut first) = (0, 0, 0, String::new());
                for _ in 0..num(1) {
                    for sp in &w[2..] {
                        let (s, seed) = sp.split_once(':').expect("S:SEED");
                        let seed: u64 = seed.parse().expect("seed");
                        match store.verify(s, &IDV, Embedding::new(vector(seed))) {
                            Ok(Decision::Match) => ok += 1,
                            Ok(_) => wrong += 1,
                            Err(e) => {
                                errors += 1;
                                if first.is_empty() {
                                    first = format!("{e}");
                                }
                            }
                        }
                    }
                }
                format!("match={ok} wrong={wrong} errors={errors} first={first}")
            }
            Some("sweep") => answer(store.sweep(), |r| format!("expired {}", r.expired)),
            Some("roll") => answer(store.roll_epoch(), |st| format!("epoch {}", st.epoch)),
            Some("churn") => {
                // Enroll and revoke: a rotation (keyring slot writes) each.
                let mut errors = Vec::new();
                for i in 0..num(2) {
                    let name = format!("{}-{i}", w[1]);
                    let r = store
                        .enroll(
                            &name,
                            Embedding::new(vector(10_000 + i)),
                            consent(clock.now(), 30),
                        )
                        .and_then(|()| store.revoke(&name).map(|_| ()));
                    if let Err(e) = r {
                        errors.push(variant(&e));
                    }
                }
                format!("errors={} {}", errors.len(), errors.join(","))
            }
            Some("quit") | None => break,
            Some(other) => format!("unknown command {other}"),
        };
        writeln!(out, "{reply}").expect("stdout");
        out.flush().expect("flush");
    }
}

/// A replica process.
struct Replica {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Replica {
    fn spawn(url: &str, clock: &Path, buckets: u32, env: &[(&str, &str)]) -> Replica {
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.args([
            "--exact",
            "replica_worker",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("BIOSEAL_REPLICA_URL", url)
        .env("BIOSEAL_REPLICA_CLOCK", clock)
        .env("BIOSEAL_REPLICA_BUCKETS", buckets.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn replica");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut r = Replica {
            child,
            stdin,
            stdout,
        };
        assert_eq!(r.read(), "ready");
        r
    }

    /// The next line the worker prints that is an answer (the test
    /// harness's own lines are skipped).
    fn read(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read replica");
            assert!(n > 0, "replica exited");
            let line = line.trim();
            // libtest's own lines; with --nocapture the first answer may
            // follow its "test replica_worker ... " on the same line.
            let line = line
                .strip_prefix("test replica_worker ... ")
                .unwrap_or(line);
            if line.is_empty() || line.starts_with("running ") {
                continue;
            }
            return line.to_owned();
        }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("write replica");
        self.stdin.flush().expect("flush");
    }

    fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.read()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A database, a shared clock file and the first replica (this process),
/// which creates the store.
struct Setup {
    url: String,
    clock: FileClock,
    _dir: tempfile::TempDir,
    store: Store,
    buckets: u32,
    pad: bool,
}

impl Setup {
    fn new(buckets: u32) -> Setup {
        Setup::with_pad(buckets, false)
    }

    fn with_pad(buckets: u32, pad: bool) -> Setup {
        let url = pg::fresh_database();
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = FileClock(dir.path().join("clock"));
        clock.set(T0);
        let store = Store::open(config(&url, &clock, buckets, pad)).expect("create store");
        Setup {
            url,
            clock,
            _dir: dir,
            store,
            buckets,
            pad,
        }
    }

    fn replicas(&self, n: usize) -> Vec<Replica> {
        (0..n)
            .map(|_| {
                let pad = if self.pad { "1" } else { "0" };
                Replica::spawn(
                    &self.url,
                    &self.clock.0,
                    self.buckets,
                    &[("BIOSEAL_REPLICA_PAD", pad)],
                )
            })
            .collect()
    }
}

/// Send `cmd` to every replica at once; their answers.
fn all(replicas: &mut [Replica], cmd: &str) -> Vec<String> {
    for r in replicas.iter_mut() {
        r.send(cmd);
    }
    replicas.iter_mut().map(Replica::read).collect()
}

/// How many answers of a burst were `key`.
fn count(answers: &[String], key: &str) -> u32 {
    answers
        .iter()
        .flat_map(|a| a.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v.parse::<u32>().expect("count"))
        .sum()
}

/// Three replicas send impostor probes to one subject at once: exactly 5
/// comparisons (10 with attested PAD) before the 30 s wait, then exactly
/// one per 30 s, and none after the hard limit (50, 100), whatever the
/// interleaving.
fn exact_limits(pad: bool) {
    let (soft, hard) = if pad { (10u32, 50u32 * 2) } else { (5, 50) };
    let s = Setup::with_pad(4, pad);
    s.store
        .enroll("s", Embedding::new(vector(1)), consent(s.clock.now(), 100))
        .expect("enroll");
    let mut reps = s.replicas(3);
    // Soft limit: 3 x 8 (x 2 with PAD) impostor probes at once.
    let burst = if pad { 16 } else { 8 };
    let a = all(&mut reps, &format!("burst s 999 {burst}"));
    assert_eq!(count(&a, "NoMatch"), soft, "{a:?}");
    assert_eq!(count(&a, "LockedOut"), 3 * burst - soft, "{a:?}");
    // Then one comparison per 30 s, among all replicas.
    for round in 0..3 {
        s.clock.advance(Duration::from_secs(30));
        let a = all(&mut reps, "burst s 999 4");
        assert_eq!(count(&a, "NoMatch"), 1, "round {round}: {a:?}");
        assert_eq!(count(&a, "LockedOut"), 11, "round {round}: {a:?}");
    }
    // On to the hard limit from this replica.
    for _ in soft + 3..hard {
        s.clock.advance(Duration::from_secs(30));
        assert_eq!(
            s.store
                .verify("s", &IDV, Embedding::new(vector(999)))
                .expect("allowed"),
            Decision::NoMatch
        );
    }
    s.clock.advance(Duration::from_secs(86_400));
    // None after it: not the impostor, not the genuine probe.
    let a = all(&mut reps, "burst s 999 3");
    assert_eq!(count(&a, "VerificationDisabled"), 9, "{a:?}");
    let a = all(&mut reps, "burst s 1 3");
    assert_eq!(count(&a, "VerificationDisabled"), 9, "{a:?}");
}

#[test]
fn attempt_limits_are_exact_across_replicas() {
    if pg::skipped("attempt_limits_are_exact_across_replicas") {
        return;
    }
    exact_limits(false);
    exact_limits(true);
}

/// A revoke on one replica is `NotEnrolled` on every other at once (their
/// caches notwithstanding); one subject enrolled from several replicas at
/// once: exactly one wins, the others get `AlreadyEnrolled`.
#[test]
fn revocation_and_enrollment_races_have_one_truth() {
    if pg::skipped("revocation_and_enrollment_races_have_one_truth") {
        return;
    }
    let s = Setup::new(4);
    let mut reps = s.replicas(3);
    for round in 0..5 {
        let name = format!("x{round}");
        let a = all(&mut reps, &format!("enroll {name} {} 30", 10 + round));
        assert_eq!(a.iter().filter(|x| *x == "ok").count(), 1, "{a:?}");
        assert_eq!(
            a.iter().filter(|x| *x == "err AlreadyEnrolled").count(),
            2,
            "{a:?}"
        );
        // Everyone sees it...
        let a = all(&mut reps, &format!("verify {name} {}", 10 + round));
        assert!(a.iter().all(|x| x == "Match"), "{a:?}");
        // ...until one replica revokes it: then no one does.
        assert_eq!(reps[round % 3].ask(&format!("revoke {name}")), "ok");
        let a = all(&mut reps, &format!("verify {name} {}", 10 + round));
        assert!(a.iter().all(|x| x == "err NotEnrolled"), "{a:?}");
        assert!(matches!(
            s.store
                .verify(&name, &IDV, Embedding::new(vector(10 + round as u64))),
            Err(Error::NotEnrolled)
        ));
    }
    s.store
        .audit()
        .verify_chain()
        .expect("one chain for all replicas");
}

/// Rotations on one replica (every revoke rotates the bucket) while two
/// others verify subjects of the same bucket: every decision correct, no
/// error; the others pick up each new KEK from the database.
#[test]
fn rotations_on_one_replica_while_others_verify_the_same_bucket() {
    if pg::skipped("rotations_on_one_replica_while_others_verify_the_same_bucket") {
        return;
    }
    let s = Setup::new(1);
    let mut subjects = Vec::new();
    for i in 0..4u64 {
        s.store
            .enroll(
                &format!("v{i}"),
                Embedding::new(vector(100 + i)),
                consent(s.clock.now(), 30),
            )
            .expect("enroll");
        subjects.push(format!("v{i}:{}", 100 + i));
    }
    let before = s.store.stats().expect("stats").generation_max;
    let mut reps = s.replicas(2);
    let cmd = format!("verify_many 40 {}", subjects.join(" "));
    for r in reps.iter_mut() {
        r.send(&cmd);
    }
    let mut rotations = 0;
    for i in 0..30u64 {
        let name = format!("churn{i}");
        s.store
            .enroll(
                &name,
                Embedding::new(vector(500 + i)),
                consent(s.clock.now(), 30),
            )
            .expect("enroll");
        s.store.revoke(&name).expect("revoke");
        rotations += 1;
    }
    for r in reps.iter_mut() {
        let a = r.read();
        assert!(
            a.starts_with("match=160 wrong=0 errors=0"),
            "a verifying replica saw: {a}"
        );
    }
    let after = s.store.stats().expect("stats").generation_max;
    assert!(after >= before + rotations, "{before} -> {after}");
    s.store.audit().verify_chain().expect("chain");
}

/// Epoch rolls on one replica while others verify and revoke: every verify
/// is right, none fails; the others adopt the new epoch under their locks
/// (their next writes go to the re-sealed keyring); one epoch is left.
#[test]
fn epoch_rolls_on_one_replica_while_others_verify_and_revoke() {
    if pg::skipped("epoch_rolls_on_one_replica_while_others_verify_and_revoke") {
        return;
    }
    let s = Setup::new(4);
    let mut subjects = Vec::new();
    for i in 0..8u64 {
        s.store
            .enroll(
                &format!("e{i}"),
                Embedding::new(vector(700 + i)),
                consent(s.clock.now(), 30),
            )
            .expect("enroll");
        subjects.push(format!("e{i}:{}", 700 + i));
    }
    let mut reps = s.replicas(3);
    let cmd = format!("verify_many 20 {}", subjects.join(" "));
    for r in reps[..2].iter_mut() {
        r.send(&cmd);
    }
    // The third rotates bucket KEKs all along (enroll + revoke).
    reps[2].send("churn c 40");
    let mut epoch = 1;
    for _ in 0..3 {
        epoch = s.store.roll_epoch().expect("roll").epoch;
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(epoch, 4);
    for r in reps[..2].iter_mut() {
        let a = r.read();
        assert!(
            a.starts_with("match=160 wrong=0 errors=0"),
            "a verifying replica saw: {a}"
        );
    }
    let a = reps[2].read();
    assert!(a.starts_with("errors=0"), "the rotating replica saw: {a}");
    // Every bucket's keys open under the final epoch (a KEK slot written
    // under a stale epoch's key would not).
    for i in 0..8u64 {
        assert_eq!(
            s.store
                .verify(&format!("e{i}"), &IDV, Embedding::new(vector(700 + i)))
                .expect("verify"),
            Decision::Match
        );
    }
    assert_eq!(
        reps[2].ask(&format!("verify_many 1 {}", subjects.join(" "))),
        "match=8 wrong=0 errors=0 first="
    );
    // The other replicas write under the adopted epoch: a revoke rotates a
    // KEK slot and writes the state and the ledger.
    assert_eq!(reps[0].ask("revoke e0"), "ok");
    assert_eq!(reps[1].ask("enroll late 900 30"), "ok");
    // A replica rolls; this process adopts it at its next lock.
    assert_eq!(reps[1].ask("roll"), "epoch 5");
    assert_eq!(
        s.store
            .verify("e1", &IDV, Embedding::new(vector(701)))
            .expect("verify after another replica rolled"),
        Decision::Match
    );
    assert!(matches!(
        s.store.verify("e0", &IDV, Embedding::new(vector(700))),
        Err(Error::NotEnrolled)
    ));
    s.store.revoke("e2").expect("revoke after adopting");
    assert_eq!(s.store.epoch_status().expect("status").epoch, 5);
    let provider = bioseal::FileEpochProvider::open(s.clock.0.with_file_name("bioseal.epochs"))
        .expect("epochs");
    assert_eq!(provider.live_epochs().expect("live"), vec![5]);
    assert_eq!(reps[0].ask("verify late 900"), "Match");
    s.store.audit().verify_chain().expect("chain");
}

/// A replica killed with SIGKILL in the middle of a revoke's rotation.
/// Before its data commit nothing of it is visible (one transaction);
/// after it (new KEK and data committed, old KEK not yet zeroed) a live
/// replica, running all along, finishes the rotation the next time it
/// takes the bucket's lock; no restart.
#[test]
fn a_replica_killed_mid_rotation_is_finished_by_a_live_one() {
    if pg::skipped("a_replica_killed_mid_rotation_is_finished_by_a_live_one") {
        return;
    }
    for point in ["rotation:new-slot-synced", "rotation:batch-flushed"] {
        let s = Setup::new(1);
        for i in 0..3u64 {
            s.store
                .enroll(
                    &format!("k{i}"),
                    Embedding::new(vector(200 + i)),
                    consent(s.clock.now(), 30),
                )
                .expect("enroll");
        }
        let mut live = s.replicas(1).remove(0);
        assert_eq!(live.ask("verify k1 201"), "Match");
        let mut doomed = Replica::spawn(
            &s.url,
            &s.clock.0,
            1,
            &[
                ("BIOSEAL_FAILPOINT", point),
                ("BIOSEAL_FAILPOINT_ACTION", "pause"),
            ],
        );
        doomed.send("revoke k0");
        assert_eq!(doomed.read(), format!("paused {point}"));
        doomed.child.kill().expect("SIGKILL");
        doomed.child.wait().expect("reaped");
        // What the dead replica left: bucket 0's two KEK slots are keyring
        // rows 8 and 9. Before its data commit, nothing (the rotation's
        // writes are one transaction); after it, both KEKs: a rotation the
        // next lock holder must finish.
        let live_slots = pg::client(&s.url)
            .query(
                "SELECT count(*) FROM bioseal.keyring WHERE part IN (8, 9) AND v <> decode(repeat('00', 128), 'hex')",
                &[],
            )
            .expect("slots")[0]
            .get::<_, i64>(0);
        let interrupted = point == "rotation:batch-flushed";
        assert_eq!(live_slots, if interrupted { 2 } else { 1 }, "{point}");
        // The live replica verifies through it (and finishes it).
        assert_eq!(live.ask("verify k1 201"), "Match", "at {point}");
        assert_eq!(live.ask("verify k2 202"), "Match", "at {point}");
        let k0 = live.ask("verify k0 200");
        assert_eq!(
            k0,
            if interrupted {
                "err NotEnrolled"
            } else {
                "Match"
            },
            "{point}: the revoke committed whole or not at all"
        );
        let st = s.store.stats().expect("stats");
        assert_eq!(
            st.generation_min, st.generation_max,
            "{point}: one KEK left in the bucket"
        );
        let rotations = s
            .store
            .audit()
            .entries()
            .expect("entries")
            .iter()
            .filter(|e| e.event == bioseal::AuditEvent::KeyRotation)
            .count();
        if interrupted {
            assert!(rotations >= 1, "{point}: the completion is audited");
        }
        s.store.audit().verify_chain().expect("chain");
    }
}

/// Two replicas sweep at once: every due subject is destroyed exactly once
/// (the counts add up to the number due; one expiry entry per subject).
#[test]
fn two_replicas_sweeping_at_once_destroy_each_due_subject_once() {
    if pg::skipped("two_replicas_sweeping_at_once_destroy_each_due_subject_once") {
        return;
    }
    let s = Setup::new(8);
    for i in 0..40u64 {
        let days = if i % 2 == 0 { 2 } else { 60 };
        s.store
            .enroll(
                &format!("w{i}"),
                Embedding::new(vector(300 + i)),
                consent(s.clock.now(), days),
            )
            .expect("enroll");
    }
    s.clock.advance(Duration::from_secs(3 * 86_400));
    let mut reps = s.replicas(2);
    let a = all(&mut reps, "sweep");
    let expired: usize = a
        .iter()
        .map(|x| {
            x.strip_prefix("expired ")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("sweep answered {x}"))
        })
        .sum();
    assert_eq!(expired, 20, "{a:?}");
    assert_eq!(s.store.stats().expect("stats").subjects, 20);
    let expiries = s
        .store
        .audit()
        .entries()
        .expect("entries")
        .iter()
        .filter(|e| e.outcome == Some(bioseal::AuditOutcome::ConsentExpired))
        .count();
    assert_eq!(expiries, 20, "one expiry entry per due subject");
    s.store.audit().verify_chain().expect("chain");
}
