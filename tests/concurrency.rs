//! `Store` is Send + Sync: concurrent verifies are correct, also while the
//! bucket they read is rotated by concurrent revocations.

mod common;
use bioseal::{Decision, Error};
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn verifies_stay_correct_while_the_bucket_rotates() {
    // One bucket: every revocation rotates the KEK of every subject.
    let f = Fixture::new(1);
    let store = Arc::new(f.open());
    let mut rng = Rng(314);
    let stable: Arc<Vec<Vec<f32>>> = Arc::new((0..40).map(|_| rng.unit(DIM)).collect());
    for (i, v) in stable.iter().enumerate() {
        store
            .enroll(&format!("stable-{i}"), emb(v), consent(f.now(), 30))
            .expect("enroll");
    }
    let gen0 = store.stats().expect("stats").generation_max;
    let done = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicUsize::new(0));

    let verifiers: Vec<_> = (0..4)
        .map(|t| {
            let (store, stable, done, verified) = (
                store.clone(),
                stable.clone(),
                done.clone(),
                verified.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(1000 + t);
                let impostor = rng.unit(DIM);
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) || n < 200 {
                    let i = (rng.next_u64() as usize) % stable.len();
                    let s = format!("stable-{i}");
                    assert_eq!(
                        store.verify(&s, &IDV, emb(&stable[i])).expect("genuine"),
                        Decision::Match
                    );
                    assert_eq!(
                        store.verify(&s, &IDV, emb(&impostor)).expect("impostor"),
                        Decision::NoMatch
                    );
                    n += 1;
                }
                verified.fetch_add(n as usize, Ordering::Relaxed);
            })
        })
        .collect();

    let churn = {
        let store = store.clone();
        let now = f.now();
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            for round in 0..25 {
                let v = rng.unit(DIM);
                let s = format!("churn-{round}");
                store.enroll(&s, emb(&v), consent(now, 30)).expect("enroll");
                store.revoke(&s).expect("revoke");
                assert!(matches!(
                    store.verify(&s, &IDV, emb(&v)),
                    Err(Error::NotEnrolled)
                ));
            }
        })
    };
    churn.join().expect("churn thread");
    done.store(true, Ordering::Relaxed);
    for v in verifiers {
        v.join().expect("verifier thread");
    }
    let s = store.stats().expect("stats");
    // 25 revocations rotated; every impostor probe rotated too.
    assert!(
        s.generation_max >= gen0 + 25,
        "at least 25 rotations happened during the verifies"
    );
    assert_eq!(s.subjects, 40);
    assert!(verified.load(Ordering::Relaxed) >= 800);
    eprintln!(
        "{} concurrent verify pairs across 25 rotations",
        verified.load(Ordering::Relaxed)
    );
}
