//! Promise 4: consent and retention are enforced by code (ManualClock).

mod common;
use bioseal::{Consent, Decision, Error, Purpose, Store, Withdrawal};
use common::*;

fn expiry_at_the_exact_boundary(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let v = Rng(1).unit(DIM);
    let expiry = f.now().saturating_add(DAY * 10);
    store
        .enroll(
            "s",
            emb(&v),
            Consent::new([IDV]).expires_at(expiry).evidence([1; 32]),
        )
        .expect("enroll");
    f.clock
        .set(bioseal::Timestamp::from_unix_secs(expiry.unix_secs() - 1));
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("last second"),
        Decision::Match
    );
    f.clock.set(expiry);
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::ConsentExpired)
    ));
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::NotEnrolled)
    ));
    assert_eq!(store.stats().expect("stats").subjects, 0);
}

fn inactivity_deadline_moves_with_each_match(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = Store::open(f.config().max_inactivity(DAY * 30)).expect("open");
    let v = Rng(2).unit(DIM);
    store
        .enroll("s", emb(&v), consent(f.now(), 365))
        .expect("enroll");
    let st = store.consent_status("s").expect("status");
    assert_eq!(st.last_interaction, f.now());
    assert_eq!(st.deadline, f.now().saturating_add(DAY * 30));

    // A match on day 29 moves the deadline to day 29 + 30.
    f.clock.advance(DAY * 29);
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
    let st = store.consent_status("s").expect("status");
    assert_eq!(st.last_interaction, f.now());
    assert_eq!(st.deadline, f.now().saturating_add(DAY * 30));

    // A failed verify is not an interaction: it does not move the deadline.
    f.clock.advance(DAY * 20);
    let impostor = Rng(3).unit(DIM);
    assert_eq!(
        store.verify("s", &IDV, emb(&impostor)).expect("verify"),
        Decision::NoMatch
    );
    assert_eq!(
        store.consent_status("s").expect("status").deadline,
        st.deadline
    );

    // Exactly at the inactivity deadline the subject is destroyed.
    f.clock.set(st.deadline);
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::RetentionExpired)
    ));
    assert!(matches!(store.consent_status("s"), Err(Error::NotEnrolled)));
}

fn sweep_destroys_exactly_the_due_subjects_and_visits_only_them(k: Kind) {
    let f = Fixture::with(k, 16);
    // The clock moves 55 and 40 days at a time here: allow it.
    let store = Store::open(
        f.config()
            .max_inactivity(DAY * 100)
            .max_clock_jump(DAY * 60),
    )
    .expect("open");
    let mut rng = Rng(4);
    let vecs: Vec<Vec<f32>> = (0..60).map(|_| rng.unit(DIM)).collect();
    for (i, v) in vecs.iter().enumerate() {
        // Subjects 0..10 expire after 5 days, 10..20 after 50, the rest after 200.
        let days = match i {
            0..=9 => 5,
            10..=19 => 50,
            _ => 200,
        };
        store
            .enroll(&format!("s{i}"), emb(v), consent(f.now(), days))
            .expect("enroll");
    }
    // Nothing is due yet: the sweep visits nothing.
    let r = store.sweep().expect("sweep");
    assert_eq!((r.examined, r.expired), (0, 0));

    f.clock.advance(DAY * 5);
    let r = store.sweep().expect("sweep");
    assert_eq!(r.expired, 10);
    assert_eq!(r.examined, 10, "only the due subjects were visited");
    assert!(r.buckets_rotated >= 1 && r.buckets_rotated <= 10);
    assert_eq!(store.stats().expect("stats").subjects, 50);

    // Day 60: consent of 10..20 has expired. Subjects 20.. are inside their
    // consent but matched last on day 0: with 100 days of inactivity allowed
    // they stay. Subject 25 matches now, the others do not.
    f.clock.advance(DAY * 55);
    assert_eq!(
        store.verify("s25", &IDV, emb(&vecs[25])).expect("verify"),
        Decision::Match
    );
    let r = store.sweep().expect("sweep");
    assert_eq!((r.expired, r.examined), (10, 10));
    // Day 100: every subject but 25 has been inactive for 100 days.
    f.clock.advance(DAY * 40);
    let r = store.sweep().expect("sweep");
    assert_eq!((r.expired, r.examined), (39, 39));
    for (i, v) in vecs.iter().enumerate() {
        let res = store.verify(&format!("s{i}"), &IDV, emb(v));
        if i == 25 {
            assert_eq!(res.expect("s25 still verifies"), Decision::Match);
        } else {
            assert!(matches!(res, Err(Error::NotEnrolled)), "s{i}: {res:?}");
        }
    }
    let audit = store.audit().entries().expect("entries");
    let expires = audit
        .iter()
        .filter(|e| e.event == bioseal::AuditEvent::Expire)
        .count();
    let sweeps = audit
        .iter()
        .filter(|e| e.event == bioseal::AuditEvent::Sweep)
        .count();
    assert_eq!((expires, sweeps), (59, 4));
}

fn withdrawing_the_last_purpose_revokes(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let v = Rng(5).unit(DIM);
    let both = Consent::new([IDV, Purpose::IMPERSONATION_CHECK])
        .expires_at(f.now().saturating_add(DAY * 10))
        .evidence([2; 32]);
    store.enroll("s", emb(&v), both).expect("enroll");
    let gen = store.stats().expect("stats").generation_max;

    let w = store.withdraw_purpose("s", &IDV).expect("withdraw");
    // Withdrawing re-keys the subject and rotates its bucket, so that no
    // older record restores the purpose.
    assert_eq!(store.stats().expect("stats").generation_max, gen + 1);
    assert_eq!(w, Withdrawal::Remaining(vec![Purpose::IMPERSONATION_CHECK]));
    assert!(matches!(
        store.verify("s", &IDV, emb(&v)),
        Err(Error::PurposeNotConsented)
    ));
    assert_eq!(
        store
            .verify("s", &Purpose::IMPERSONATION_CHECK, emb(&v))
            .expect("verify"),
        Decision::Match
    );
    assert!(matches!(
        store.withdraw_purpose("s", &IDV),
        Err(Error::PurposeNotConsented)
    ));

    let gen = store.stats().expect("stats").generation_max;
    let w = store
        .withdraw_purpose("s", &Purpose::IMPERSONATION_CHECK)
        .expect("withdraw");
    assert!(
        matches!(w, Withdrawal::Revoked(r) if matches!(r.status, bioseal::ShredStatus::Shredded { .. }))
    );
    let s = store.stats().expect("stats");
    assert!(matches!(
        store.verify("s", &Purpose::IMPERSONATION_CHECK, emb(&v)),
        Err(Error::NotEnrolled)
    ));
    assert_eq!(
        (s.subjects, s.generation_max),
        (0, gen + 1),
        "revoked and shredded"
    );
}

fn renewal_extends_and_status_reports_consent_but_no_template(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let v = Rng(6).unit(DIM);
    store
        .enroll("s", emb(&v), consent(f.now(), 10))
        .expect("enroll");
    f.clock.advance(DAY * 9);
    let new_expiry = f.now().saturating_add(DAY * 300);
    let st = store
        .renew_consent(
            "s",
            Consent::new([IDV])
                .expires_at(new_expiry)
                .evidence([3; 32])
                .policy_version(2),
        )
        .expect("renew");
    assert_eq!(st.expires_at, new_expiry);
    assert_eq!(st.granted_at, Some(f.now()));
    assert_eq!(st.policy_version, 2);
    assert_eq!(st.evidence, Some([3; 32]));
    assert_eq!(st.purposes, vec![IDV]);
    f.clock.advance(DAY * 100);
    assert_eq!(
        store.verify("s", &IDV, emb(&v)).expect("renewed"),
        Decision::Match
    );
    // A renewal must be a valid consent.
    let bad = Consent::new([IDV]).expires_at(f.now());
    assert!(matches!(
        store.renew_consent("s", bad),
        Err(Error::InvalidConsent(_))
    ));
    assert!(matches!(
        store.renew_consent("nobody", consent(f.now(), 5)),
        Err(Error::NotEnrolled)
    ));
    // The status type has no template field; its Debug shows no vector.
    let dbg = format!("{:?}", store.consent_status("s").expect("status"));
    assert!(!dbg.contains(&format!("{}", v[0])), "{dbg}");
}

/// A sweep with more due buckets than one group (256) runs its groups on
/// several threads (as many as the machine offers, up to four): exactly the
/// due subjects go, every other one still matches, each group rotates its
/// own buckets, and the audit chain holds.
fn a_sweep_of_several_groups_destroys_exactly_the_due_subjects(k: Kind) {
    let f = Fixture::with(k, 2048);
    let store = f.open();
    let mut rng = Rng(41);
    let vecs: Vec<Vec<f32>> = (0..1500).map(|_| rng.unit(DIM)).collect();
    let ids: Vec<String> = (0..vecs.len()).map(|i| format!("s{i}")).collect();
    // Even subjects' consent runs out after 5 days, odd ones' after 200.
    let items = vecs.iter().enumerate().map(|(i, v)| {
        let days = if i % 2 == 0 { 5 } else { 200 };
        (ids[i].as_str(), emb(v), consent(f.now(), days))
    });
    for r in store.enroll_many(items).expect("enroll_many") {
        r.expect("enroll");
    }
    f.clock.advance(DAY * 5);
    let r = store.sweep().expect("sweep");
    assert_eq!((r.examined, r.expired), (750, 750));
    // 750 subjects in 2,048 buckets land in ~630: three groups.
    assert!(
        r.buckets_rotated > 256 && r.buckets_rotated <= 750,
        "{}",
        r.buckets_rotated
    );
    assert_eq!(store.stats().expect("stats").subjects, 750);
    store.audit().verify_chain().expect("chain");
    let audit = store.audit().entries().expect("entries");
    let count = |ev| audit.iter().filter(|e| e.event == ev).count();
    assert_eq!(count(bioseal::AuditEvent::Expire), 750);
    assert_eq!(count(bioseal::AuditEvent::KeyRotation), r.buckets_rotated);
    for (i, v) in vecs.iter().enumerate() {
        let res = store.verify(&ids[i], &IDV, emb(v));
        if i % 2 == 0 {
            assert!(matches!(res, Err(Error::NotEnrolled)), "s{i}: {res:?}");
        } else {
            assert_eq!(res.expect("verify"), Decision::Match, "s{i}");
        }
    }
    store.audit().verify_chain().expect("chain");
    let again = store.sweep().expect("second sweep");
    assert_eq!((again.examined, again.expired), (0, 0));
}

/// Issue 11 §8: a clock set far forward must not crypto-shred everyone. A
/// jump of more than the maximum (30 days by default) past the latest time
/// the store has seen pauses destruction by deadline: `sweep` and a touched
/// expired subject answer `ClockJump` and destroy nothing. Reopened with the
/// operator's confirmation (audited), the sweep goes ahead. Steps within
/// the maximum, and the time seen in an earlier process, count as seen.
fn a_forward_clock_jump_pauses_destruction_until_confirmed(k: Kind) {
    let f = Fixture::with(k, 4);
    let mut rng = Rng(61);
    let (a, b) = (rng.unit(DIM), rng.unit(DIM));
    {
        let store = f.open();
        store
            .enroll("a", emb(&a), consent(f.now(), 10))
            .expect("enroll");
        store
            .enroll("b", emb(&b), consent(f.now(), 300))
            .expect("enroll");
        // Small steps are seen; the sweep persists the time seen.
        for _ in 0..5 {
            f.clock.advance(DAY);
            assert_eq!(store.sweep().expect("sweep").expired, 0);
        }
    }
    // Stopped and restarted 25 days later: within the maximum.
    f.clock.advance(DAY * 25);
    {
        let store = f.open();
        assert_eq!(store.sweep().expect("sweep").expired, 1, "a expired");
    }
    // Now the clock jumps a year ahead (b's consent would have run out).
    f.clock.advance(DAY * 365);
    let store = f.open();
    assert!(matches!(store.sweep(), Err(Error::ClockJump { .. })));
    assert!(matches!(
        store.verify("b", &IDV, emb(&b)),
        Err(Error::ClockJump { .. })
    ));
    assert_eq!(
        store.stats().expect("stats").subjects,
        1,
        "nothing destroyed"
    );
    drop(store);
    let store = Store::open(f.config().accept_clock_jump(true)).expect("confirmed");
    let audit = store.audit().entries().expect("entries");
    assert!(audit
        .iter()
        .any(|e| e.event == bioseal::AuditEvent::ClockJumpAccepted));
    assert_eq!(store.sweep().expect("sweep").expired, 1);
    assert_eq!(store.stats().expect("stats").subjects, 0);
}

on_both_backends!(
    expiry_at_the_exact_boundary,
    inactivity_deadline_moves_with_each_match,
    sweep_destroys_exactly_the_due_subjects_and_visits_only_them,
    withdrawing_the_last_purpose_revokes,
    renewal_extends_and_status_reports_consent_but_no_template,
    a_sweep_of_several_groups_destroys_exactly_the_due_subjects,
    a_forward_clock_jump_pauses_destruction_until_confirmed,
);
