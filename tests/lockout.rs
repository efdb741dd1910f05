//! Attempt limits with the exact NIST SP 800-63B-4 numbers: 5 (10 with PAD)
//! consecutive failures, then at least 30 s between attempts, disabled after
//! 50 (100); a match resets; counters survive a restart.

mod common;
use bioseal::{Decision, Error, Store};
use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const SEC: Duration = Duration::from_secs(1);

fn fail(store: &Store, f: &Fixture, impostor: &[f32]) {
    assert_eq!(
        store
            .verify("s", &IDV, emb(impostor))
            .expect("attempt allowed"),
        Decision::NoMatch,
        "at {}",
        f.now()
    );
}

/// Drive a subject to the hard limit and check every step on the way.
fn check_limits(k: Kind, pad: bool, soft: u32, hard: u32) {
    let f = Fixture::with(k, 8);
    let store = Store::open(f.config().presentation_attack_detection(pad)).expect("open");
    let mut rng = Rng(11);
    let v = rng.unit(DIM);
    let impostor = rng.unit(DIM);
    store
        .enroll("s", emb(&v), consent(f.now(), 100))
        .expect("enroll");

    // `soft` failures in a row are allowed without waiting.
    for _ in 0..soft {
        fail(&store, &f, &impostor);
    }
    // The next attempt within 30 s of the last failure is refused, whatever
    // the probe, and refused attempts do not count.
    let until = f.now().saturating_add(WAIT);
    for probe in [&v, &impostor] {
        match store.verify("s", &IDV, emb(probe)) {
            Err(Error::LockedOut { until: u }) => assert_eq!(u, until),
            other => panic!("expected lockout, got {other:?}"),
        }
    }
    f.clock.advance(WAIT - SEC);
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::LockedOut { .. })
    ));
    f.clock.advance(SEC);
    // At exactly 30 s an attempt is allowed again; each further failure
    // restarts the 30 s wait.
    for _ in soft..hard {
        fail(&store, &f, &impostor);
        assert!(matches!(
            store.verify("s", &IDV, emb(&v)),
            Err(Error::LockedOut { .. } | Error::VerificationDisabled)
        ));
        f.clock.advance(WAIT);
    }
    // Hard limit reached: disabled, even for the genuine probe, after any wait.
    f.clock.advance(DAY);
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::VerificationDisabled)
    ));

    // Survives a restart.
    drop(store);
    let store = Store::open(f.config().presentation_attack_detection(pad)).expect("reopen");
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::VerificationDisabled)
    ));

    // An operator reset re-enables it.
    store.reset_attempts("s").expect("reset");
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
    let resets = store
        .audit()
        .entries()
        .expect("entries")
        .iter()
        .filter(|e| e.event == bioseal::AuditEvent::AttemptsReset)
        .count();
    assert_eq!(resets, 1);
}

fn nist_limits_without_pad(k: Kind) {
    check_limits(k, false, 5, 50);
}

fn nist_limits_with_pad(k: Kind) {
    check_limits(k, true, 10, 100);
}

fn a_match_resets_the_count_and_counters_survive_reopen(k: Kind) {
    let f = Fixture::with(k, 8);
    let mut rng = Rng(12);
    let v = rng.unit(DIM);
    let impostor = rng.unit(DIM);
    {
        let store = f.open();
        store
            .enroll("s", emb(&v), consent(f.now(), 100))
            .expect("enroll");
        for _ in 0..4 {
            fail(&store, &f, &impostor);
        }
        assert_eq!(
            store.verify("s", &IDV, emb(&v)).expect("verify"),
            Decision::Match
        );
        // Count restarted: 5 more failures are allowed at once.
        for _ in 0..5 {
            fail(&store, &f, &impostor);
        }
        assert!(matches!(
            store.verify("s", &IDV, emb(&v)),
            Err(Error::LockedOut { .. })
        ));
    }
    // After a restart, still locked; the wait still counts from the last failure.
    let store = f.open();
    let until = f.now().saturating_add(WAIT);
    assert!(
        matches!(store.verify("s", &IDV, emb(&v)), Err(Error::LockedOut { until: u }) if u == until)
    );
    f.clock.advance(WAIT);
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
    // Counters are per subject: another subject is unaffected by s's failures.
    let w = rng.unit(DIM);
    store
        .enroll("t", emb(&w), consent(f.now(), 100))
        .expect("enroll");
    assert_eq!(
        store.verify("t", &IDV, emb(&w)).expect("verify"),
        Decision::Match
    );
}

/// Only an audited operator reset, or revoke and a new enrollment, bring a
/// disabled subject back; enrolling over it is refused.
fn a_disabled_subject_comes_back_only_by_reset_or_revoke(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let mut rng = Rng(13);
    let v = rng.unit(DIM);
    let impostor = rng.unit(DIM);
    store
        .enroll("s", emb(&v), consent(f.now(), 100))
        .expect("enroll");
    for _ in 0..50 {
        fail(&store, &f, &impostor);
        f.clock.advance(WAIT);
    }
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::VerificationDisabled)
    ));
    assert!(matches!(
        store.enroll("s", emb(&v), consent(f.now(), 100)),
        Err(Error::AlreadyEnrolled)
    ));
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::VerificationDisabled)
    ));
    store.reset_attempts("s").expect("reset");
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
    for _ in 0..50 {
        fail(&store, &f, &impostor);
        f.clock.advance(WAIT);
    }
    store.revoke("s").expect("revoke");
    store
        .enroll("s", emb(&v), consent(f.now(), 100))
        .expect("re-enroll");
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
}

/// The lockout is checked before the purpose: a locked-out subject answers
/// `LockedOut` (or `VerificationDisabled`) for every purpose, consented or
/// not, so the purpose answer cannot be probed while locked.
fn the_lockout_is_checked_before_the_purpose(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let mut rng = Rng(14);
    let (v, impostor) = (rng.unit(DIM), rng.unit(DIM));
    store
        .enroll("s", emb(&v), consent(f.now(), 100))
        .expect("enroll");
    for _ in 0..5 {
        fail(&store, &f, &impostor);
    }
    assert!(matches!(
        store.verify("s", &bioseal::Purpose::IMPERSONATION_CHECK, emb(&v)),
        Err(Error::LockedOut { .. })
    ));
    for _ in 0..45 {
        f.clock.advance(WAIT);
        fail(&store, &f, &impostor);
    }
    assert!(matches!(
        store.verify("s", &bioseal::Purpose::IMPERSONATION_CHECK, emb(&v)),
        Err(Error::VerificationDisabled)
    ));
}

on_both_backends!(nist_limits_without_pad, nist_limits_with_pad);

on_both_backends!(
    a_match_resets_the_count_and_counters_survive_reopen,
    a_disabled_subject_comes_back_only_by_reset_or_revoke,
    the_lockout_is_checked_before_the_purpose,
);
