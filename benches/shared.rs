//! Shared mode against its peer, same run, same loopback PostgreSQL server
//! (a throwaway one started here, Unix socket, fsync on; or
//! `BIOSEAL_TEST_PG_HOST`): verify (genuine), enroll, and revoke (bioseal:
//! until the subject is crypto-shredded), at `BIOSEAL_SHARED_SUBJECTS`
//! subjects (default 10,000). The peer (`benches/pgpeer`): one row per
//! subject with an AES-256-GCM-sealed f32 blob, cosine in the application,
//! the counter UPDATE and an audit INSERT in one transaction.
//!
//! `cargo bench --bench shared`; `examples/perf_table.rs`
//! (`BIOSEAL_PERF_BACKEND=postgres`) prints p50/p99, the ratios and the
//! replica throughput.

#[path = "../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

mod common;
use common::{consent, unit, DIM};

mod pgpeer;

use bioseal::{Embedding, Purpose, RootKey, Store, StoreConfig, Threshold};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::time::Duration;

const IDV: Purpose = Purpose::IDENTITY_VERIFICATION;

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("BIOSEAL_SHARED_SUBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let server;
    let (ours, peer) = match std::env::var_os("BIOSEAL_TEST_PG_HOST") {
        Some(_) => (pg::fresh_database(), pg::fresh_database()),
        None => {
            server = pg::Server::start();
            (
                server.fresh_database("bench_bioseal"),
                server.fresh_database("bench_peer"),
            )
        }
    };
    let store = Store::open(
        StoreConfig::new(&ours, RootKey::from_bytes([3; 32]))
            .model("bench", DIM)
            .threshold(Threshold::cosine(0.5)),
    )
    .expect("open");
    let mut p = pgpeer::PgPeer::open(&peer, 0.5).expect("peer");
    for lo in (0..n).step_by(1_000) {
        let ids: Vec<String> = (lo..n.min(lo + 1_000)).map(|i| format!("s{i}")).collect();
        let vecs: Vec<Vec<f32>> = (lo..lo + ids.len()).map(|i| unit(i as u64)).collect();
        let r = store
            .enroll_many(
                ids.iter()
                    .zip(&vecs)
                    .map(|(id, v)| (id, Embedding::from_slice(v), consent())),
            )
            .expect("enroll_many");
        assert!(r.iter().all(Result::is_ok));
        let items: Vec<(&str, &[f32])> = ids
            .iter()
            .zip(&vecs)
            .map(|(id, v)| (id.as_str(), v.as_slice()))
            .collect();
        p.enroll_many(&items).expect("peer enroll");
    }
    let probes: Vec<Vec<f32>> = (0..256).map(|i| unit(i as u64)).collect();
    let p = std::cell::RefCell::new(p);

    let mut g = c.benchmark_group(format!("shared_verify_{n}"));
    g.measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    g.bench_function("bioseal", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % probes.len();
                (format!("s{i}"), Embedding::from_slice(&probes[i]))
            },
            |(s, e)| {
                assert_eq!(
                    store.verify(&s, &IDV, e).expect("verify"),
                    bioseal::Decision::Match
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("peer", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % probes.len();
                (format!("s{i}"), i)
            },
            |(s, j)| {
                assert_eq!(
                    p.borrow_mut().verify(&s, &probes[j]).expect("verify"),
                    Some(true)
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group(format!("shared_enroll_revoke_{n}"));
    g.measurement_time(Duration::from_secs(5));
    let mut k = n;
    g.bench_function("bioseal_enroll", |b| {
        b.iter_batched(
            || {
                k += 1;
                (format!("e{k}"), Embedding::new(unit(k as u64)))
            },
            |(s, e)| store.enroll(&s, e, consent()).expect("enroll"),
            BatchSize::SmallInput,
        )
    });
    let mut k2 = n;
    g.bench_function("peer_enroll", |b| {
        b.iter_batched(
            || {
                k2 += 1;
                (format!("e{k2}"), unit(k2 as u64))
            },
            |(s, v)| p.borrow_mut().enroll(&s, &v).expect("enroll"),
            BatchSize::SmallInput,
        )
    });
    // Revoke what the enroll rows enrolled (each revoke until shredded).
    let mut r = n;
    g.bench_function("bioseal_revoke_shredded", |b| {
        b.iter_batched(
            || {
                r += 1;
                if r > k {
                    // Past what the enroll row enrolled: enroll it here
                    // (setup, not timed).
                    store
                        .enroll(&format!("e{r}"), Embedding::new(unit(r as u64)), consent())
                        .expect("enroll");
                }
                format!("e{r}")
            },
            |s| {
                let receipt = store.revoke(&s).expect("revoke");
                assert!(matches!(
                    receipt.status,
                    bioseal::ShredStatus::Shredded { .. }
                ));
            },
            BatchSize::SmallInput,
        )
    });
    let mut r2 = n;
    g.bench_function("peer_revoke", |b| {
        b.iter_batched(
            || {
                r2 += 1;
                if r2 > k2 {
                    p.borrow_mut()
                        .enroll(&format!("e{r2}"), &unit(r2 as u64))
                        .expect("enroll");
                }
                format!("e{r2}")
            },
            |s| assert!(p.borrow_mut().revoke(&s).expect("revoke")),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
