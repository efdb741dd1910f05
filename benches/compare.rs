//! bioseal against the SQLCipher peer (benches/peer), measured side by side
//! in the same run at 10k subjects, 512 dimensions:
//! - verify 1:1, hot cache;
//! - enroll, durable;
//! - revoke (bioseal: until shredded; the peer only deletes);
//! - verify throughput on 2 threads against 1 thread (bioseal and peer).
//!
//! `cargo bench --bench compare`. Ratios: peer time / bioseal time. The 1M
//! subject runs are issue 5's remaining work.

#[path = "common/mod.rs"]
mod common;
use common::{consent, unit, DIM};

#[path = "peer/mod.rs"]
mod peer;

use bioseal::{Embedding, Purpose, RootKey, Store, StoreConfig, Threshold};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 10_000;
const THRESHOLD: f32 = 0.5;

struct Setup {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    store: Arc<Store>,
    peer_path: std::path::PathBuf,
}

fn setup() -> Setup {
    let (a, b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let store = Store::open(
        StoreConfig::new(a.path().join("data"), RootKey::from_bytes([3; 32]))
            .key_dir(a.path().join("keys"))
            .model("bench", DIM)
            .threshold(Threshold::cosine(THRESHOLD)),
    )
    .expect("open");
    let peer_path = b.path().join("peer.db");
    let mut p = peer::Peer::open(&peer_path, THRESHOLD).expect("peer");
    for i in 0..N {
        let v = unit(i as u64);
        store
            .enroll(&format!("s{i}"), Embedding::from_slice(&v), consent())
            .expect("enroll");
        p.enroll(&format!("s{i}"), &v).expect("peer enroll");
    }
    Setup {
        _dirs: (a, b),
        store: Arc::new(store),
        peer_path,
    }
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let probes: Vec<Vec<f32>> = (0..256).map(|i| unit(i as u64)).collect();

    let mut g = c.benchmark_group("verify_10k");
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    g.bench_function("bioseal", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % probes.len();
                (format!("s{i}"), Embedding::from_slice(&probes[i]))
            },
            |(id, e)| {
                assert!(s
                    .store
                    .verify(&id, &Purpose::IDENTITY_VERIFICATION, e)
                    .expect("verify")
                    .is_match())
            },
            BatchSize::SmallInput,
        )
    });
    let mut p = peer::Peer::open(&s.peer_path, THRESHOLD).expect("peer");
    g.bench_function("sqlcipher_peer", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % probes.len();
                (format!("s{i}"), &probes[i])
            },
            |(id, v)| assert_eq!(p.verify(&id, v).expect("verify"), Some(true)),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("enroll_durable");
    g.measurement_time(Duration::from_secs(5));
    let mut k = N;
    g.bench_function("bioseal", |b| {
        b.iter_batched(
            || {
                k += 1;
                (format!("s{k}"), Embedding::new(unit(k as u64)))
            },
            |(id, e)| s.store.enroll(&id, e, consent()).expect("enroll"),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("sqlcipher_peer", |b| {
        b.iter_batched(
            || {
                k += 1;
                (format!("s{k}"), unit(k as u64))
            },
            |(id, v)| p.enroll(&id, &v).expect("enroll"),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // Revoke: each iteration's untimed setup enrolls a fresh subject, so the
    // population stays at ~10k however many iterations criterion runs.
    let mut g = c.benchmark_group("revoke_10k");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    g.bench_function("bioseal_until_shredded", |b| {
        b.iter_batched(
            || {
                k += 1;
                let id = format!("r{k}");
                s.store
                    .enroll(&id, Embedding::new(unit(k as u64)), consent())
                    .expect("enroll");
                id
            },
            |id| s.store.revoke(&id).expect("revoke"),
            BatchSize::PerIteration,
        )
    });
    // Setup and routine both need the peer's connection.
    let p = std::cell::RefCell::new(p);
    g.bench_function("sqlcipher_peer_delete", |b| {
        b.iter_batched(
            || {
                k += 1;
                let id = format!("r{k}");
                p.borrow_mut().enroll(&id, &unit(k as u64)).expect("enroll");
                id
            },
            |id| assert!(p.borrow_mut().revoke(&id).expect("revoke")),
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // Throughput: total time for `n` verifies split over `threads` threads.
    let mut g = c.benchmark_group("verify_throughput");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    for threads in [1usize, 2] {
        let store = s.store.clone();
        g.bench_function(format!("bioseal_{threads}_threads"), |b| {
            b.iter_custom(|n| {
                let per = (n as usize).div_ceil(threads);
                let start = Instant::now();
                std::thread::scope(|sc| {
                    for t in 0..threads {
                        let store = &store;
                        sc.spawn(move || {
                            for j in 0..per {
                                let i = (t * 7919 + j) % (N / 2);
                                let v = unit(i as u64);
                                let _ = store.verify(
                                    &format!("s{i}"),
                                    &Purpose::IDENTITY_VERIFICATION,
                                    Embedding::new(v),
                                );
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
        let path = s.peer_path.clone();
        g.bench_function(format!("sqlcipher_peer_{threads}_threads"), |b| {
            b.iter_custom(|n| {
                let per = (n as usize).div_ceil(threads);
                let mut peers: Vec<peer::Peer> = (0..threads)
                    .map(|_| peer::Peer::open(&path, THRESHOLD).expect("peer"))
                    .collect();
                let start = Instant::now();
                std::thread::scope(|sc| {
                    for (t, p) in peers.iter_mut().enumerate() {
                        sc.spawn(move || {
                            for j in 0..per {
                                let i = (t * 7919 + j) % (N / 2);
                                let v = unit(i as u64);
                                // SQLITE_BUSY under write contention counts as a
                                // failed attempt, as a service would see it.
                                let _ = p.verify(&format!("s{i}"), &v);
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
