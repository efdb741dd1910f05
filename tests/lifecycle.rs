//! Promise 2 and 4 in the life of one subject: enroll, verify genuine and
//! impostor probes, purpose and expiry checks, revoke, re-enroll, reopen.

mod common;
use bioseal::{
    AuditEvent, Consent, ConsentError, Decision, EmbeddingError, Error, Purpose, RootKey,
    ShredStatus, Store, StoreConfig, Threshold,
};
use common::*;

fn genuine_matches_impostor_does_not(k: Kind) {
    let f = Fixture::with(k, 16);
    let store = f.open();
    let mut rng = Rng(1);
    let alice = rng.unit(DIM);
    store
        .enroll("alice", emb(&alice), consent(f.now(), 365))
        .expect("enroll");
    for _ in 0..20 {
        let probe = rng.noisy(&alice, 0.3);
        assert_eq!(
            store.verify("alice", &IDV, emb(&probe)).expect("verify"),
            Decision::Match
        );
    }
    // Impostors in runs of 4 (below the lockout limit of 5), each run
    // followed by a genuine probe, which resets the failure count.
    for i in 0..20 {
        let impostor = rng.unit(DIM);
        assert_eq!(
            store.verify("alice", &IDV, emb(&impostor)).expect("verify"),
            Decision::NoMatch
        );
        if i % 4 == 3 {
            let probe = rng.noisy(&alice, 0.3);
            assert_eq!(
                store.verify("alice", &IDV, emb(&probe)).expect("verify"),
                Decision::Match
            );
        }
    }
}

fn typed_errors_for_purpose_expiry_unknown_and_revoked(k: Kind) {
    let f = Fixture::with(k, 16);
    let store = f.open();
    let mut rng = Rng(2);
    let alice = rng.unit(DIM);
    store
        .enroll("alice", emb(&alice), consent(f.now(), 30))
        .expect("enroll");

    assert!(matches!(
        store.verify("alice", &Purpose::IMPERSONATION_CHECK, emb(&alice)),
        Err(Error::PurposeNotConsented)
    ));
    assert!(matches!(
        store.verify("bob", &IDV, emb(&alice)),
        Err(Error::NotEnrolled)
    ));
    assert!(matches!(store.revoke("bob"), Err(Error::NotEnrolled)));

    // One second before expiry it still verifies; at expiry it is refused
    // and the subject is revoked there and then.
    f.clock
        .advance(DAY * 30 - std::time::Duration::from_secs(1));
    assert_eq!(
        store.verify("alice", &IDV, emb(&alice)).expect("verify"),
        Decision::Match
    );
    f.clock.advance(std::time::Duration::from_secs(1));
    let before = store.stats().expect("stats");
    assert!(matches!(
        store.verify("alice", &IDV, emb(&alice)),
        Err(Error::ConsentExpired)
    ));
    let after = store.stats().expect("stats");
    assert_eq!(after.subjects, 0, "expired subject was removed");
    assert_eq!(
        after.generation_max,
        before.generation_max + 1,
        "and its bucket key rotated"
    );
    assert!(matches!(
        store.verify("alice", &IDV, emb(&alice)),
        Err(Error::NotEnrolled)
    ));

    // Revocation of a live subject.
    let bob = rng.unit(DIM);
    store
        .enroll("bob", emb(&bob), consent(f.now(), 30))
        .expect("enroll");
    let receipt = store.revoke("bob").expect("revoke");
    assert!(matches!(receipt.status, ShredStatus::Shredded { .. }));
    assert_eq!(receipt.revoked_at, f.now());
    assert!(matches!(
        store.verify("bob", &IDV, emb(&bob)),
        Err(Error::NotEnrolled)
    ));
    assert!(matches!(store.revoke("bob"), Err(Error::NotEnrolled)));

    // Re-enrolling after revocation works like a first enrollment.
    store
        .enroll("bob", emb(&bob), consent(f.now(), 30))
        .expect("re-enroll");
    assert_eq!(
        store.verify("bob", &IDV, emb(&bob)).expect("verify"),
        Decision::Match
    );
}

fn several_templates_up_to_the_maximum(k: Kind) {
    let f = Fixture::with(k, 16);
    let store = Store::open(f.config().max_templates(2)).expect("open");
    let mut rng = Rng(3);
    let (a, b, c) = (rng.unit(DIM), rng.unit(DIM), rng.unit(DIM));
    store
        .enroll("s", emb(&a), consent(f.now(), 10))
        .expect("first");
    assert_eq!(
        store.verify("s", &IDV, emb(&b)).expect("verify"),
        Decision::NoMatch
    );
    // A second template only after a fresh match.
    assert_eq!(
        store
            .add_template("s", &IDV, emb(&c), emb(&b))
            .expect("add"),
        Decision::NoMatch,
        "an impostor probe adds nothing"
    );
    assert_eq!(
        store.verify("s", &IDV, emb(&b)).expect("verify"),
        Decision::NoMatch
    );
    assert_eq!(
        store
            .add_template("s", &IDV, emb(&a), emb(&b))
            .expect("add"),
        Decision::Match
    );
    // Either template matches (OR across templates).
    assert_eq!(
        store.verify("s", &IDV, emb(&a)).expect("verify"),
        Decision::Match
    );
    assert_eq!(
        store.verify("s", &IDV, emb(&b)).expect("verify"),
        Decision::Match
    );
    assert_eq!(
        store.verify("s", &IDV, emb(&c)).expect("verify"),
        Decision::NoMatch
    );
    assert!(matches!(
        store.add_template("s", &IDV, emb(&a), emb(&c)),
        Err(Error::TooManyTemplates { max: 2 })
    ));
    assert_eq!(
        store.verify("s", &IDV, emb(&c)).expect("verify"),
        Decision::NoMatch
    );
}

/// `enroll` over an enrolled subject is refused and changes nothing: not
/// the templates, not the consent, not the failure counter (issue 11 §3:
/// it used to append any face, replace the consent and reset the counter).
fn enroll_over_an_enrolled_subject_is_refused_and_changes_nothing(k: Kind) {
    let f = Fixture::with(k, 16);
    let store = f.open();
    let mut rng = Rng(4);
    let (a, mallory) = (rng.unit(DIM), rng.unit(DIM));
    store
        .enroll("s", emb(&a), consent(f.now(), 10))
        .expect("enroll");
    for _ in 0..5 {
        assert_eq!(
            store.verify("s", &IDV, emb(&mallory)).expect("verify"),
            Decision::NoMatch
        );
    }
    let before = store.consent_status("s").expect("status");
    let takeover = bioseal::Consent::new([Purpose::IMPERSONATION_CHECK])
        .expires_at(f.now().saturating_add(DAY * 20))
        .evidence([1; 32]);
    assert!(matches!(
        store.enroll("s", emb(&mallory), takeover),
        Err(Error::AlreadyEnrolled)
    ));
    let items = vec![("s", emb(&mallory), consent(f.now(), 10))];
    let r = store.enroll_many(items).expect("bulk");
    assert!(matches!(r[..], [Err(Error::AlreadyEnrolled)]));
    assert_eq!(store.consent_status("s").expect("status"), before);
    // Still locked out: the counter was not reset.
    assert!(matches!(
        store.verify("s", &IDV, emb(&a)),
        Err(Error::LockedOut { .. })
    ));
    f.clock.advance(std::time::Duration::from_secs(30));
    assert_eq!(
        store.verify("s", &IDV, emb(&mallory)).expect("verify"),
        Decision::NoMatch,
        "mallory's face was not added"
    );
    f.clock.advance(std::time::Duration::from_secs(30));
    assert_eq!(
        store.verify("s", &IDV, emb(&a)).expect("verify"),
        Decision::Match
    );
}

fn enrollments_survive_reopen_and_revocations_stay_revoked(k: Kind) {
    let f = Fixture::with(k, 16);
    let mut rng = Rng(5);
    let vecs: Vec<Vec<f32>> = (0..40).map(|_| rng.unit(DIM)).collect();
    {
        let store = f.open();
        for (i, v) in vecs.iter().enumerate() {
            store
                .enroll(&format!("s{i}"), emb(v), consent(f.now(), 10))
                .expect("enroll");
        }
        for i in (0..40).step_by(3) {
            store.revoke(&format!("s{i}")).expect("revoke");
        }
    }
    let store = f.open();
    assert_eq!(store.stats().expect("stats").subjects, 40 - 14);
    for (i, v) in vecs.iter().enumerate() {
        let r = store.verify(&format!("s{i}"), &IDV, emb(v));
        if i % 3 == 0 {
            assert!(matches!(r, Err(Error::NotEnrolled)), "s{i}: {r:?}");
        } else {
            assert_eq!(r.expect("verify"), Decision::Match, "s{i}");
        }
    }
}

fn deferred_shred_completes_on_shred(k: Kind) {
    let f = Fixture::with(k, 4);
    let store = Store::open(f.config().shred_policy(bioseal::ShredPolicy::Deferred)).expect("open");
    let mut rng = Rng(6);
    let a = rng.unit(DIM);
    store
        .enroll("a", emb(&a), consent(f.now(), 10))
        .expect("enroll");
    let gen = store.stats().expect("stats").generation_max;
    let r = store.revoke("a").expect("revoke");
    assert_eq!(r.status, ShredStatus::Pending);
    let s = store.stats().expect("stats");
    assert_eq!((s.pending_shreds, s.generation_max), (1, gen));
    assert_eq!(store.shred().expect("shred"), 1);
    let s = store.stats().expect("stats");
    assert_eq!((s.pending_shreds, s.generation_max), (0, gen + 1));
    assert_eq!(store.shred().expect("shred"), 0);
    assert!(matches!(
        store.verify("a", &IDV, emb(&a)),
        Err(Error::NotEnrolled)
    ));
}

#[test]
fn reopen_with_wrong_key_or_model_fails_typed_and_touches_nothing() {
    let f = Fixture::new(8);
    let mut rng = Rng(7);
    let a = rng.unit(DIM);
    {
        let store = f.open();
        store
            .enroll("a", emb(&a), consent(f.now(), 10))
            .expect("enroll");
    }
    let before = read_all_files(f.data.path());
    let wrong = StoreConfig::new(f.data.path(), RootKey::from_bytes([0x11; 32]))
        .key_dir(f.secrets.path())
        .model(MODEL, DIM)
        .threshold(Threshold::cosine(0.5));
    assert!(matches!(Store::open(wrong), Err(Error::WrongRootKey)));
    assert_eq!(
        read_all_files(f.data.path()),
        before,
        "wrong key must not touch the files"
    );

    let other_model = Store::open(f.config().model("another-model", DIM));
    assert!(
        matches!(other_model, Err(Error::ModelMismatch { .. })),
        "{other_model:?}"
    );
    let other_dim = Store::open(f.config().model(MODEL, DIM * 2));
    assert!(
        matches!(other_dim, Err(Error::ModelMismatch { .. })),
        "{other_dim:?}"
    );

    let store = f.open();
    assert_eq!(
        store.verify("a", &IDV, emb(&a)).expect("verify"),
        Decision::Match
    );
}

#[test]
fn missing_keyring_is_refused_not_recreated() {
    let f = Fixture::new(8);
    {
        let store = f.open();
        store
            .enroll("a", emb(&Rng(8).unit(DIM)), consent(f.now(), 10))
            .expect("enroll");
    }
    let ring = f.secrets.path().join("bioseal.keyring");
    let saved = std::fs::read(&ring).expect("read");
    std::fs::remove_file(&ring).expect("rm");
    assert!(matches!(
        Store::open(f.config()),
        Err(Error::KeyUnavailable { .. })
    ));
    assert!(
        !ring.exists(),
        "no new keyring was written over existing data"
    );
    std::fs::write(&ring, saved).expect("restore");
    f.open();
}

#[test]
fn sled_data_of_another_store_is_refused() {
    let f = Fixture::new(8);
    let g = Fixture::new(8);
    drop(f.open());
    drop(g.open());
    // Put g's database next to f's keyring.
    std::fs::remove_dir_all(f.data.path().join("db")).expect("rm");
    copy_dir(&g.data.path().join("db"), &f.data.path().join("db"));
    assert!(matches!(Store::open(f.config()), Err(Error::StoreMismatch)));
}

#[test]
fn config_is_validated() {
    let f = Fixture::new(8);
    let base =
        || StoreConfig::new(f.data.path(), RootKey::from_bytes([1; 32])).key_dir(f.secrets.path());
    for cfg in [
        // A threshold at or below 0 lets a random face match about half the time.
        base().model(MODEL, DIM).threshold(Threshold::cosine(0.0)),
        base().model(MODEL, DIM).threshold(Threshold::cosine(-0.3)),
        // No key directory, or one inside the data directory.
        StoreConfig::new(f.data.path(), RootKey::from_bytes([1; 32]))
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5)),
        base()
            .key_dir(f.data.path().join("keys"))
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5)),
        base()
            .key_dir(f.data.path())
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5)),
        base().threshold(Threshold::cosine(0.5)),
        base().model(MODEL, DIM),
        base().model(MODEL, 0).threshold(Threshold::cosine(0.5)),
        base()
            .model(MODEL, bioseal::MAX_DIMENSION + 1)
            .threshold(Threshold::cosine(0.5)),
        base().model("", DIM).threshold(Threshold::cosine(0.5)),
        base()
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(f32::NAN)),
        base().model(MODEL, DIM).threshold(Threshold::cosine(1.5)),
        base()
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5))
            .max_templates(0),
        base()
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(0),
        base()
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(bioseal::MAX_BUCKETS + 1),
    ] {
        assert!(matches!(Store::open(cfg), Err(Error::Config(_))));
    }
    assert!(
        std::fs::read_dir(f.data.path())
            .expect("readdir")
            .next()
            .is_none(),
        "nothing created"
    );
}

#[test]
fn reopening_right_after_drop_works_and_a_store_open_elsewhere_is_refused() {
    let f = Fixture::new(8);
    let v = Rng(9).unit(DIM);
    f.open()
        .enroll("a", emb(&v), consent(f.now(), 10))
        .expect("enroll");
    // Repeated immediate reopens work. (sled lets go of its file lock a
    // moment after a handle is dropped; Store::open retries a lock conflict
    // for up to a second. This loop did not reproduce that race here; a CI
    // run hit it once, in a raw sled open of tests/tamper.rs.)
    for i in 0..200 {
        let store = Store::open(f.config()).unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        assert_eq!(
            store.verify("a", &IDV, emb(&v)).expect("verify"),
            Decision::Match
        );
    }
    // But a store that really is open still cannot be opened twice.
    let held = f.open();
    let started = std::time::Instant::now();
    assert!(matches!(Store::open(f.config()), Err(Error::Storage(_))));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(held);
}

/// Bulk enrollment: a bad item gets its own typed error and the others are
/// enrolled; every `Ok` item is durable when the call returns (checked by
/// reopening) and audited.
fn enroll_many_reports_per_item_and_is_durable(k: Kind) {
    let f = Fixture::with(k, 8);
    let mut rng = Rng(41);
    let vecs: Vec<Vec<f32>> = (0..30).map(|_| rng.unit(DIM)).collect();
    let results = {
        let store = f.open();
        let items = vecs.iter().enumerate().map(|(i, v)| {
            let e = match i {
                7 => emb(&v[..DIM - 1]),
                11 => emb(&vec![0.0; DIM]),
                _ => emb(v),
            };
            let c = if i == 13 {
                Consent::new([IDV]).expires_at(f.now().saturating_add(DAY))
            } else {
                consent(f.now(), 10)
            };
            (format!("s{i}"), e, c)
        });
        store.enroll_many(items).expect("bulk enroll")
    };
    assert_eq!(results.len(), 30);
    assert!(matches!(
        results[7],
        Err(Error::InvalidEmbedding(
            EmbeddingError::WrongDimension { .. }
        ))
    ));
    assert!(matches!(
        results[11],
        Err(Error::InvalidEmbedding(EmbeddingError::NearZero))
    ));
    assert!(matches!(
        results[13],
        Err(Error::InvalidConsent(ConsentError::NoEvidence))
    ));
    let store = f.open();
    assert_eq!(store.stats().expect("stats").subjects, 27);
    for (i, v) in vecs.iter().enumerate() {
        let r = store.verify(&format!("s{i}"), &IDV, emb(v));
        if [7, 11, 13].contains(&i) {
            assert!(matches!(r, Err(Error::NotEnrolled)), "s{i}: {r:?}");
        } else {
            assert_eq!(r.expect("verify"), Decision::Match, "s{i}");
        }
    }
    let enrolls = store
        .audit()
        .entries()
        .expect("entries")
        .iter()
        .filter(|e| e.event == AuditEvent::Enroll)
        .count();
    assert_eq!(enrolls, 27);
}

on_both_backends!(
    genuine_matches_impostor_does_not,
    typed_errors_for_purpose_expiry_unknown_and_revoked,
    several_templates_up_to_the_maximum,
    enroll_over_an_enrolled_subject_is_refused_and_changes_nothing,
    enrollments_survive_reopen_and_revocations_stay_revoked,
    deferred_shred_completes_on_shred,
    enroll_many_reports_per_item_and_is_durable,
);
