//! Bad input gets a typed error: never a panic, never a Match, never a change
//! to stored data.

mod common;
use bioseal::{Consent, ConsentError, Decision, EmbeddingError, Error, Purpose, Timestamp};
use common::*;

#[test]
fn bad_embeddings_are_refused_on_enroll_and_verify() {
    let f = Fixture::new(8);
    let store = f.open();
    let mut rng = Rng(5);
    let good = rng.unit(DIM);
    store
        .enroll("s", emb(&good), consent(f.now(), 10))
        .expect("enroll");

    let mut nan = good.clone();
    nan[17] = f32::NAN;
    let mut inf = good.clone();
    inf[0] = f32::INFINITY;
    let mut ninf = good.clone();
    ninf[DIM - 1] = f32::NEG_INFINITY;
    let cases: Vec<(Vec<f32>, EmbeddingError)> = vec![
        (nan, EmbeddingError::NonFinite),
        (inf, EmbeddingError::NonFinite),
        (ninf, EmbeddingError::NonFinite),
        (vec![0.0; DIM], EmbeddingError::NearZero),
        (vec![1e-30; DIM], EmbeddingError::NearZero),
        (
            vec![],
            EmbeddingError::WrongDimension {
                expected: DIM,
                got: 0,
            },
        ),
        (
            good[..DIM - 1].to_vec(),
            EmbeddingError::WrongDimension {
                expected: DIM,
                got: DIM - 1,
            },
        ),
        (
            [good.clone(), vec![0.0]].concat(),
            EmbeddingError::WrongDimension {
                expected: DIM,
                got: DIM + 1,
            },
        ),
        (
            vec![0.5; 10_000_000],
            EmbeddingError::WrongDimension {
                expected: DIM,
                got: 10_000_000,
            },
        ),
    ];
    for (v, want) in cases {
        let r = store.verify("s", &IDV, emb(&v));
        assert!(
            matches!(r, Err(Error::InvalidEmbedding(ref e)) if *e == want),
            "verify: {r:?}"
        );
        let r = store.enroll("t", emb(&v), consent(f.now(), 10));
        assert!(
            matches!(r, Err(Error::InvalidEmbedding(ref e)) if *e == want),
            "enroll: {r:?}"
        );
        // A bad probe on an unknown subject is refused for the probe, first.
        let r = store.verify("nobody", &IDV, emb(&v));
        assert!(matches!(r, Err(Error::InvalidEmbedding(_))), "{r:?}");
    }
    assert_eq!(
        store.stats().expect("stats").subjects,
        1,
        "nothing was enrolled"
    );
    assert_eq!(
        store.verify("s", &IDV, emb(&good)).expect("verify"),
        Decision::Match
    );
}

#[test]
fn bad_consents_are_refused() {
    let f = Fixture::new(8);
    let store = f.open();
    let v = Rng(6).unit(DIM);
    let now = f.now();
    let later = now.saturating_add(DAY);
    let ev = [0x11u8; 32];
    let cases = vec![
        (
            Consent::new([]).expires_at(later).evidence(ev),
            ConsentError::NoPurpose,
        ),
        (Consent::new([IDV]).evidence(ev), ConsentError::NoExpiry),
        (
            Consent::new([IDV]).expires_at(later),
            ConsentError::NoEvidence,
        ),
        (
            Consent::new([IDV]).expires_at(now).evidence(ev),
            ConsentError::ExpiryNotInFuture,
        ),
        (
            Consent::new([IDV])
                .expires_at(Timestamp::from_unix_secs(1))
                .evidence(ev),
            ConsentError::ExpiryNotInFuture,
        ),
        (
            Consent::new([IDV])
                .expires_at(now.saturating_add(DAY * 3650))
                .evidence(ev),
            ConsentError::LifetimeTooLong {
                max_secs: bioseal::DEFAULT_MAX_CONSENT_LIFETIME.as_secs(),
            },
        ),
    ];
    for (c, want) in cases {
        let r = store.enroll("s", emb(&v), c);
        assert!(
            matches!(r, Err(Error::InvalidConsent(ref e)) if *e == want),
            "{r:?}"
        );
    }
    assert!(Purpose::new("Not Valid").is_err());
    assert_eq!(store.stats().expect("stats").subjects, 0);
}

#[test]
fn bad_subject_ids_are_refused() {
    let f = Fixture::new(8);
    let store = f.open();
    let v = Rng(7).unit(DIM);
    let long = "x".repeat(1025);
    for s in ["", long.as_str()] {
        assert!(matches!(
            store.enroll(s, emb(&v), consent(f.now(), 1)),
            Err(Error::InvalidSubject)
        ));
        assert!(matches!(
            store.verify(s, &IDV, emb(&v)),
            Err(Error::InvalidSubject)
        ));
        assert!(matches!(store.revoke(s), Err(Error::InvalidSubject)));
    }
    // 1024 bytes of any UTF-8 is a valid id.
    let ok = "é".repeat(512);
    store
        .enroll(&ok, emb(&v), consent(f.now(), 1))
        .expect("enroll");
    assert_eq!(
        store.verify(&ok, &IDV, emb(&v)).expect("verify"),
        Decision::Match
    );
}
