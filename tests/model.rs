//! Model-based property test of the whole store against a small reference
//! model: random sequences of enroll, verify (genuine and impostor), revoke,
//! renew, withdraw, clock advances, sweep, close+reopen, shred (the KEK
//! rotation of deferred revocations) and snapshots of the data directory.
//! Subjects 1 and 3 are in split custody (issue 14): they enroll and verify
//! with their user key, some verifies give a wrong one (counted as failures),
//! and `rekey` changes it; a key given for a server-custody subject is
//! refused.
//!
//! After every step: the store's answer equals the model's (exact error
//! variants), the subject count agrees, and the audit chain verifies. At the
//! end, the deletion property: for every snapshot, every subject destroyed
//! after it cannot be made to Match from the snapshot's files plus today's
//! keyring and the root key, and no 32-byte window of any file (snapshots
//! and today's) opens any sealed record.
//!
//! Cases: `BIOSEAL_MODEL_CASES` (default 24, under a minute here); e.g.
//! `BIOSEAL_MODEL_CASES=2000 cargo test --release --test model` for a long run.

mod common;
use bioseal::forensics::subject_records;
use bioseal::{
    Consent, Decision, Error, ManualClock, Purpose, RootKey, ShredPolicy, Store, StoreConfig,
    Threshold, Timestamp, UserKey, Withdrawal,
};
use common::{copy_dir, read_all_files, Kind, Rng, DAY, DIM, T0};
use proptest::prelude::*;
use std::collections::{BTreeSet, HashSet};
use std::path::Path;

const SUBJECTS: u8 = 5;
const MAX_TEMPLATES: usize = 3;
const INACTIVITY_DAYS: u64 = 10;
const SOFT: u32 = 5;
const HARD: u32 = 50;
const WAIT: u64 = 30;

#[derive(Debug, Clone)]
enum Op {
    Enroll {
        s: u8,
        seed: u8,
        days: u8,
        both_purposes: bool,
    },
    VerifyGenuine {
        s: u8,
        template: u8,
        impersonation: bool,
        wrong_key: bool,
    },
    VerifyImpostor {
        s: u8,
        seed: u8,
        wrong_key: bool,
    },
    AddTemplate {
        s: u8,
        template: u8,
        seed: u8,
        wrong_key: bool,
    },
    /// Change a split-custody subject's user key (with the wrong current
    /// key when `wrong_old`).
    Rekey {
        s: u8,
        wrong_old: bool,
    },
    Revoke {
        s: u8,
    },
    Renew {
        s: u8,
        days: u8,
        both_purposes: bool,
    },
    Withdraw {
        s: u8,
        impersonation: bool,
    },
    Advance {
        secs: u32,
    },
    Sweep,
    Reopen,
    Shred,
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..SUBJECTS;
    prop_oneof![
        4 => (s.clone(), any::<u8>(), 1u8..40, any::<bool>())
            .prop_map(|(s, seed, days, both_purposes)| Op::Enroll { s, seed, days, both_purposes }),
        6 => (s.clone(), 0u8..MAX_TEMPLATES as u8, prop::bool::weighted(0.2), prop::bool::weighted(0.15))
            .prop_map(|(s, template, impersonation, wrong_key)| Op::VerifyGenuine { s, template, impersonation, wrong_key }),
        4 => (s.clone(), any::<u8>(), prop::bool::weighted(0.15))
            .prop_map(|(s, seed, wrong_key)| Op::VerifyImpostor { s, seed, wrong_key }),
        2 => (s.clone(), 0u8..MAX_TEMPLATES as u8, any::<u8>(), prop::bool::weighted(0.15))
            .prop_map(|(s, template, seed, wrong_key)| Op::AddTemplate { s, template, seed, wrong_key }),
        1 => (s.clone(), prop::bool::weighted(0.3)).prop_map(|(s, wrong_old)| Op::Rekey { s, wrong_old }),
        2 => s.clone().prop_map(|s| Op::Revoke { s }),
        1 => (s.clone(), 1u8..40, any::<bool>())
            .prop_map(|(s, days, both_purposes)| Op::Renew { s, days, both_purposes }),
        1 => (s.clone(), any::<bool>()).prop_map(|(s, impersonation)| Op::Withdraw { s, impersonation }),
        3 => prop_oneof![0u32..45, 3_000u32..90_000, 86_400u32..(6 * 86_400)].prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Sweep),
        1 => Just(Op::Reopen),
        1 => Just(Op::Shred),
        1 => Just(Op::Snapshot),
    ]
}

/// What an operation returned, reduced to what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok,
    Match,
    NoMatch,
    Expired(bool), // true: consent expiry, false: inactivity
    NotEnrolled,
    NotConsented,
    LockedOut(u64),
    Disabled,
    TooMany,
    AlreadyEnrolled,
    Revoked,
    Remaining(usize),
    Swept(usize),
    WrongKey,
    NotSplit,
}

fn out<T>(r: Result<T, Error>, ok: impl FnOnce(T) -> Answer) -> Answer {
    match r {
        Ok(v) => ok(v),
        Err(Error::ConsentExpired) => Answer::Expired(true),
        Err(Error::RetentionExpired) => Answer::Expired(false),
        Err(Error::NotEnrolled) => Answer::NotEnrolled,
        Err(Error::PurposeNotConsented) => Answer::NotConsented,
        Err(Error::LockedOut { until }) => Answer::LockedOut(until.unix_secs()),
        Err(Error::VerificationDisabled) => Answer::Disabled,
        Err(Error::TooManyTemplates { .. }) => Answer::TooMany,
        Err(Error::AlreadyEnrolled) => Answer::AlreadyEnrolled,
        Err(Error::WrongUserKey) => Answer::WrongKey,
        Err(Error::NotSplitCustody) => Answer::NotSplit,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[derive(Debug, Clone)]
struct MSub {
    incarnation: usize,
    templates: Vec<u8>,
    purposes: BTreeSet<bool>, // false: identity verification, true: impersonation check
    expiry: u64,
    last_interaction: u64,
    failures: u32,
    last_failure: u64,
    /// Split custody: the version of the current user key (`key(s, v)`).
    key: u8,
}

struct Model {
    now: u64,
    subs: Vec<Option<MSub>>,
    incarnations: usize,
    /// Incarnation -> step at which it was destroyed.
    destroyed: Vec<(usize, usize)>,
}

fn purposes(both: bool) -> BTreeSet<bool> {
    if both {
        [false, true].into()
    } else {
        [false].into()
    }
}

impl Model {
    fn overdue(&self, m: &MSub) -> Option<Answer> {
        if self.now >= m.expiry {
            Some(Answer::Expired(true))
        } else if self.now >= m.last_interaction + INACTIVITY_DAYS * 86_400 {
            Some(Answer::Expired(false))
        } else {
            None
        }
    }
    fn destroy(&mut self, s: usize, step: usize) {
        if let Some(m) = self.subs[s].take() {
            self.destroyed.push((m.incarnation, step));
        }
    }
    /// The subject if stored and live; otherwise the error (destroying an
    /// overdue one, as the store does when touched).
    fn live(&mut self, s: usize, step: usize) -> Result<&mut MSub, Answer> {
        let Some(m) = &self.subs[s] else {
            return Err(Answer::NotEnrolled);
        };
        if let Some(e) = self.overdue(m) {
            self.destroy(s, step);
            return Err(e);
        }
        Ok(self.subs[s].as_mut().expect("present"))
    }
    fn stored(&self) -> usize {
        self.subs.iter().flatten().count()
    }
}

fn vector(seed: u64) -> Vec<f32> {
    Rng(seed).unit(DIM)
}
fn template_vec(s: u8, seed: u8) -> Vec<f32> {
    vector(10_000 + u64::from(s) * 1_000 + u64::from(seed))
}
fn purpose(impersonation: bool) -> Purpose {
    if impersonation {
        Purpose::IMPERSONATION_CHECK
    } else {
        Purpose::IDENTITY_VERIFICATION
    }
}
fn consent(now: u64, days: u8, both: bool) -> Consent {
    Consent::new(purposes(both).into_iter().map(purpose))
        .expires_at(Timestamp::from_unix_secs(now + u64::from(days) * 86_400))
        .evidence([5; 32])
}
fn day(t: u64) -> u64 {
    t / 86_400
}
/// Subjects 1 and 3 are in split custody.
fn split(s: u8) -> bool {
    s % 2 == 1
}
/// Subject `s`'s user key, version `v` (a wrong key is another version).
fn key(s: u8, v: u8) -> UserKey {
    let mut b = [s.wrapping_add(1); 32];
    b[0] = 0xc3;
    b[1] = v;
    UserKey::from_bytes(b).expect("user key")
}

/// A snapshot: its copy, the step it was taken at, and the subjects stored
/// then as (incarnation, subject, first template seed, user key version).
type Snapshot = (tempfile::TempDir, usize, Vec<(usize, u8, u8, u8)>);

struct Harness {
    dir: tempfile::TempDir,
    /// Shared mode: the database (the keyring is in it too).
    url: Option<String>,
    clock: ManualClock,
    policy: ShredPolicy,
    store: Option<Store>,
    snapshots: Vec<Snapshot>,
}

impl Harness {
    /// A store's configuration: data in `dir/data`, keyring in `dir/keys`.
    fn config(&self, dir: &Path) -> StoreConfig {
        let location = match &self.url {
            Some(url) if dir == self.dir.path() => std::path::PathBuf::from(url),
            _ => dir.join("data"),
        };
        StoreConfig::new(location, RootKey::from_bytes([0x77; 32]))
            .key_dir(dir.join("keys"))
            .model("model-test", DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(4)
            .max_templates(MAX_TEMPLATES)
            .max_inactivity(DAY * INACTIVITY_DAYS as u32)
            // Several clock advances in a row are ordinary here, not a
            // jump to refuse (tests/retention.rs covers the jump check).
            .max_clock_jump(DAY * 3650)
            .shred_policy(self.policy)
            .clock(self.clock.clone())
    }
    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }
    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(Store::open(self.config(self.dir.path())).expect("reopen"));
    }
}

/// A verify: genuine (`Some(impersonation purpose?)`) or impostor (`None`,
/// identity-verification purpose); with `add`, an `add_template` of that
/// seed. Returns (store's answer, model's answer).
fn verify_step(
    h: &Harness,
    m: &mut Model,
    step: usize,
    (s, n): (u8, u8),
    genuine: Option<bool>,
    add: Option<u8>,
    wrong_key: bool,
) -> (Answer, Answer) {
    let impersonation = genuine.unwrap_or(false);
    let si = s as usize;
    // Split custody: the right key, or another version. Server custody: no
    // key, or (with `wrong_key`) a key it has no use for.
    let version = m.subs[si].as_ref().map_or(0, |sub| sub.key);
    let k = match (split(s), wrong_key) {
        (true, false) => Some(key(s, version)),
        (true, true) => Some(key(s, version.wrapping_add(100))),
        (false, true) => Some(key(s, 0)),
        (false, false) => None,
    };
    let probe = match (&m.subs[si], genuine) {
        (Some(sub), Some(_)) => {
            let base = template_vec(s, sub.templates[n as usize % sub.templates.len()]);
            Rng(u64::from(n) + 7).noisy(&base, 0.1)
        }
        (None, Some(_)) => template_vec(s, n),
        (_, None) => vector(900_000 + u64::from(n)),
    };
    let id = format!("subj-{s}");
    let p = purpose(impersonation);
    let got = out(
        match (add, &k) {
            (None, None) => h.store().verify(&id, &p, common::emb(&probe)),
            (None, Some(k)) => h.store().verify_with(&id, &p, common::emb(&probe), k),
            (Some(seed), None) => h.store().add_template(
                &id,
                &p,
                common::emb(&probe),
                common::emb(&template_vec(s, seed)),
            ),
            (Some(seed), Some(k)) => h.store().add_template_with(
                &id,
                &p,
                common::emb(&probe),
                common::emb(&template_vec(s, seed)),
                k,
            ),
        },
        |d| {
            if d == Decision::Match {
                Answer::Match
            } else {
                Answer::NoMatch
            }
        },
    );
    let now = m.now;
    let want = match m.live(si, step) {
        Err(e) => e,
        Ok(_) if !split(s) && wrong_key => Answer::NotSplit,
        Ok(sub) if add.is_some() && sub.templates.len() >= MAX_TEMPLATES => Answer::TooMany,
        // The attempt limits come before the purpose.
        Ok(sub) if sub.failures >= HARD => Answer::Disabled,
        Ok(sub) if sub.failures >= SOFT && now < sub.last_failure + WAIT => {
            Answer::LockedOut(sub.last_failure + WAIT)
        }
        Ok(sub) if !sub.purposes.contains(&impersonation) => Answer::NotConsented,
        // A wrong key counts as a failure, whatever the face.
        Ok(sub) if split(s) && wrong_key => {
            sub.failures += 1;
            sub.last_failure = now;
            Answer::WrongKey
        }
        Ok(sub) if genuine.is_some() => {
            sub.templates.extend(add);
            sub.failures = 0;
            if day(now) != day(sub.last_interaction) {
                sub.last_interaction = now;
            }
            Answer::Match
        }
        Ok(sub) => {
            sub.failures += 1;
            sub.last_failure = now;
            Answer::NoMatch
        }
    };
    (got, want)
}

fn run(kind: Kind, ops: &[Op], deferred: bool) -> Result<(), TestCaseError> {
    let mut h = Harness {
        dir: tempfile::tempdir().expect("tempdir"),
        url: (kind == Kind::Postgres).then(common::pg::fresh_database),
        clock: ManualClock::new(Timestamp::from_unix_secs(T0)),
        policy: if deferred {
            ShredPolicy::Deferred
        } else {
            ShredPolicy::Immediate
        },
        store: None,
        snapshots: Vec::new(),
    };
    h.reopen();
    let mut m = Model {
        now: T0,
        subs: vec![None; SUBJECTS as usize],
        incarnations: 0,
        destroyed: Vec::new(),
    };

    for (step, op) in ops.iter().enumerate() {
        let (got, want) = match op.clone() {
            Op::Enroll {
                s,
                seed,
                days,
                both_purposes,
            } => {
                let id = format!("subj-{s}");
                let (e, c) = (
                    common::emb(&template_vec(s, seed)),
                    consent(m.now, days, both_purposes),
                );
                let got = out(
                    if split(s) {
                        h.store().enroll_with(&id, e, c, &key(s, 0))
                    } else {
                        h.store().enroll(&id, e, c)
                    },
                    |_| Answer::Ok,
                );
                let si = s as usize;
                if let Some(sub) = &m.subs[si] {
                    if m.overdue(sub).is_some() {
                        m.destroy(si, step);
                    }
                }
                let want = match &mut m.subs[si] {
                    // Enrolling over a subject changes nothing.
                    Some(_) => Answer::AlreadyEnrolled,
                    None => {
                        m.incarnations += 1;
                        m.subs[si] = Some(MSub {
                            incarnation: m.incarnations,
                            templates: vec![seed],
                            purposes: purposes(both_purposes),
                            expiry: m.now + u64::from(days) * 86_400,
                            last_interaction: m.now,
                            failures: 0,
                            last_failure: 0,
                            key: 0,
                        });
                        Answer::Ok
                    }
                };
                (got, want)
            }
            Op::VerifyGenuine {
                s,
                template,
                impersonation,
                wrong_key,
            } => verify_step(
                &h,
                &mut m,
                step,
                (s, template),
                Some(impersonation),
                None,
                wrong_key,
            ),
            Op::VerifyImpostor { s, seed, wrong_key } => {
                verify_step(&h, &mut m, step, (s, seed), None, None, wrong_key)
            }
            Op::AddTemplate {
                s,
                template,
                seed,
                wrong_key,
            } => verify_step(
                &h,
                &mut m,
                step,
                (s, template),
                Some(false),
                Some(seed),
                wrong_key,
            ),
            Op::Rekey { s, wrong_old } => {
                let version = m.subs[s as usize].as_ref().map_or(0, |sub| sub.key);
                let old = key(s, version.wrapping_add(if wrong_old { 100 } else { 0 }));
                let got = out(
                    h.store()
                        .rekey(&format!("subj-{s}"), &old, &key(s, version.wrapping_add(1))),
                    |_| Answer::Ok,
                );
                let now = m.now;
                let want = match m.live(s as usize, step) {
                    Err(e) => e,
                    Ok(_) if !split(s) => Answer::NotSplit,
                    Ok(sub) if sub.failures >= HARD => Answer::Disabled,
                    Ok(sub) if sub.failures >= SOFT && now < sub.last_failure + WAIT => {
                        Answer::LockedOut(sub.last_failure + WAIT)
                    }
                    Ok(sub) if wrong_old => {
                        sub.failures += 1;
                        sub.last_failure = now;
                        Answer::WrongKey
                    }
                    Ok(sub) => {
                        sub.key = sub.key.wrapping_add(1);
                        sub.last_interaction = now;
                        Answer::Ok
                    }
                };
                (got, want)
            }
            Op::Revoke { s } => {
                let got = out(h.store().revoke(&format!("subj-{s}")), |_| Answer::Ok);
                let want = if m.subs[s as usize].is_some() {
                    m.destroy(s as usize, step);
                    Answer::Ok
                } else {
                    Answer::NotEnrolled
                };
                (got, want)
            }
            Op::Renew {
                s,
                days,
                both_purposes,
            } => {
                let got = out(
                    h.store()
                        .renew_consent(&format!("subj-{s}"), consent(m.now, days, both_purposes)),
                    |_| Answer::Ok,
                );
                let now = m.now;
                let want = match m.live(s as usize, step) {
                    Err(e) => e,
                    Ok(sub) => {
                        sub.purposes = purposes(both_purposes);
                        sub.expiry = now + u64::from(days) * 86_400;
                        sub.last_interaction = now;
                        Answer::Ok
                    }
                };
                (got, want)
            }
            Op::Withdraw { s, impersonation } => {
                let got = out(
                    h.store()
                        .withdraw_purpose(&format!("subj-{s}"), &purpose(impersonation)),
                    |w| match w {
                        Withdrawal::Revoked(_) => Answer::Revoked,
                        Withdrawal::Remaining(p) => Answer::Remaining(p.len()),
                    },
                );
                let want = match m.live(s as usize, step) {
                    Err(e) => e,
                    Ok(sub) => {
                        if !sub.purposes.remove(&impersonation) {
                            Answer::NotConsented
                        } else if sub.purposes.is_empty() {
                            m.destroy(s as usize, step);
                            Answer::Revoked
                        } else {
                            Answer::Remaining(sub.purposes.len())
                        }
                    }
                };
                (got, want)
            }
            Op::Advance { secs } => {
                h.clock
                    .advance(std::time::Duration::from_secs(u64::from(secs)));
                m.now += u64::from(secs);
                (Answer::Ok, Answer::Ok)
            }
            Op::Sweep => {
                let got = out(h.store().sweep(), |r| Answer::Swept(r.expired));
                let due: Vec<usize> = (0..SUBJECTS as usize)
                    .filter(|&s| {
                        m.subs[s]
                            .as_ref()
                            .is_some_and(|sub| m.overdue(sub).is_some())
                    })
                    .collect();
                for &s in &due {
                    m.destroy(s, step);
                }
                (got, Answer::Swept(due.len()))
            }
            Op::Reopen => {
                h.reopen();
                (Answer::Ok, Answer::Ok)
            }
            Op::Shred => {
                h.store().shred().expect("shred");
                prop_assert_eq!(h.store().stats().expect("stats").pending_shreds, 0);
                (Answer::Ok, Answer::Ok)
            }
            Op::Snapshot if h.url.is_some() => {
                // Shared mode: a dump carries the keyring rows, so an old
                // dump plus the root key opens what it held (SECURITY.md,
                // shared mode); the deletion property below is embedded
                // mode's. The step still closes and reopens the store.
                h.reopen();
                (Answer::Ok, Answer::Ok)
            }
            Op::Snapshot => {
                h.store = None;
                let snap = tempfile::tempdir().expect("tempdir");
                copy_dir(&h.dir.path().join("data"), &snap.path().join("data"));
                let alive: Vec<(usize, u8, u8, u8)> = m
                    .subs
                    .iter()
                    .enumerate()
                    .filter_map(|(s, sub)| {
                        sub.as_ref()
                            .map(|x| (x.incarnation, s as u8, x.templates[0], x.key))
                    })
                    .collect();
                h.snapshots.push((snap, step, alive));
                h.reopen();
                (Answer::Ok, Answer::Ok)
            }
        };
        prop_assert_eq!(&got, &want, "step {}: {:?}", step, op);
        let stats = h.store().stats().expect("stats");
        prop_assert_eq!(
            stats.subjects,
            m.stored(),
            "subject count after step {}: {:?}",
            step,
            op
        );
        h.store()
            .audit()
            .verify_chain()
            .map_err(|e| TestCaseError::fail(format!("audit after step {step}: {e}")))?;
    }

    // Deletion property. Complete deferred shreds first: the promise is
    // about a revocation whose shred has completed.
    h.store().shred().expect("shred");
    if h.url.is_some() {
        // Shared mode: tests/forensic.rs scans the server's files.
        return Ok(());
    }
    h.store = None;
    let today_keys = h.dir.path().join("keys");
    let mut windows: HashSet<[u8; 32]> = HashSet::new();
    for dir in std::iter::once(h.dir.path()).chain(h.snapshots.iter().map(|(d, _, _)| d.path())) {
        for (_, data) in read_all_files(dir) {
            for w in data.windows(32) {
                windows.insert(w.try_into().expect("32 bytes"));
            }
        }
    }
    for (snap, at, alive) in &h.snapshots {
        let destroyed_after: Vec<&(usize, u8, u8, u8)> = alive
            .iter()
            .filter(|(inc, _, _, _)| m.destroyed.iter().any(|(d, step)| d == inc && step > at))
            .collect();
        // Old sled files + today's keyring + the root key.
        let mixed = tempfile::tempdir().expect("tempdir");
        copy_dir(
            &snap.path().join("data").join("db"),
            &mixed.path().join("data").join("db"),
        );
        copy_dir(&today_keys, &mixed.path().join("keys"));
        {
            // Older data than the keyring's mark: opened only by accepting
            // the rollback, as an operator restoring it would.
            let store = Store::open(h.config(mixed.path()).accept_rollback(true))
                .expect("mixed store opens");
            for (inc, s, seed, version) in &destroyed_after {
                let (id, probe) = (format!("subj-{s}"), common::emb(&template_vec(*s, *seed)));
                let p = Purpose::IDENTITY_VERIFICATION;
                // A split subject with the key it had then: the DEK is gone
                // before the key is ever tried.
                let r = if split(*s) {
                    store.verify_with(&id, &p, probe, &key(*s, *version))
                } else {
                    store.verify(&id, &p, probe)
                };
                prop_assert!(
                    matches!(r, Err(Error::KeyUnavailable { .. })),
                    "incarnation {} of subj-{} (destroyed after snapshot at step {}) from old files: {:?}",
                    inc, s, at, r
                );
            }
        }
        // No window of any file opens any sealed record of the snapshot.
        let scratch = tempfile::tempdir().expect("tempdir");
        copy_dir(&snap.path().join("data"), scratch.path());
        for rec in subject_records(scratch.path()).expect("records") {
            for k in &windows {
                prop_assert!(
                    !rec.wrapped_dek.opens_with(k)
                        && !rec.payload.opens_with(k)
                        && !rec.templates.as_ref().is_some_and(|t| t.opens_with(k)),
                    "a file window opens a record"
                );
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("BIOSEAL_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "tests/proptest-regressions/model.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_agrees_with_the_model(ops in prop::collection::vec(op(), 1..60), deferred in any::<bool>()) {
        run(Kind::Sled, &ops, deferred)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().div_ceil(2),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "tests/proptest-regressions/model-postgres.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// The same model, the same operations, on PostgreSQL.
    #[test]
    fn store_agrees_with_the_model_on_postgres(ops in prop::collection::vec(op(), 1..60), deferred in any::<bool>()) {
        if !common::pg::skipped("store_agrees_with_the_model_on_postgres") {
            run(Kind::Postgres, &ops, deferred)?;
        }
    }
}

/// A fixed sequence that exercises lockout, expiry, snapshots and deferred
/// shredding together, so the interesting paths run on every CI run.
#[test]
fn fixed_sequence_with_lockout_expiry_and_snapshots() {
    let mut ops = vec![
        Op::Enroll {
            s: 0,
            seed: 1,
            days: 30,
            both_purposes: true,
        },
        Op::Enroll {
            s: 1,
            seed: 2,
            days: 3,
            both_purposes: false,
        },
        Op::Enroll {
            s: 2,
            seed: 3,
            days: 30,
            both_purposes: false,
        },
        Op::Snapshot,
    ];
    for i in 0..6 {
        ops.push(Op::VerifyImpostor {
            s: 0,
            seed: i,
            wrong_key: false,
        });
    }
    // Split custody (subject 1): a wrong key counts, a key change, the old
    // key refused; a key for a server-custody subject refused.
    ops.extend([
        Op::VerifyGenuine {
            s: 1,
            template: 0,
            impersonation: false,
            wrong_key: true,
        },
        Op::Rekey {
            s: 1,
            wrong_old: true,
        },
        Op::Rekey {
            s: 1,
            wrong_old: false,
        },
        Op::VerifyGenuine {
            s: 1,
            template: 0,
            impersonation: false,
            wrong_key: false,
        },
        Op::AddTemplate {
            s: 1,
            template: 0,
            seed: 4,
            wrong_key: false,
        },
        Op::VerifyImpostor {
            s: 2,
            seed: 1,
            wrong_key: true,
        },
    ]);
    ops.extend([
        Op::VerifyGenuine {
            s: 0,
            template: 0,
            impersonation: false,
            wrong_key: false,
        },
        Op::Advance { secs: 31 },
        Op::VerifyGenuine {
            s: 0,
            template: 0,
            impersonation: true,
            wrong_key: false,
        },
        Op::Revoke { s: 2 },
        Op::Advance { secs: 4 * 86_400 },
        Op::Sweep,
        Op::Snapshot,
        Op::Withdraw {
            s: 0,
            impersonation: false,
        },
        Op::Withdraw {
            s: 0,
            impersonation: true,
        },
        Op::Reopen,
        Op::Enroll {
            s: 2,
            seed: 9,
            days: 5,
            both_purposes: false,
        },
        Op::Shred,
    ]);
    for deferred in [false, true] {
        run(Kind::Sled, &ops, deferred).expect("fixed sequence");
        if !common::pg::skipped("fixed_sequence_with_lockout_expiry_and_snapshots") {
            run(Kind::Postgres, &ops, deferred).expect("fixed sequence on PostgreSQL");
        }
    }
}
