//! Store operations at 10k subjects (512 dimensions, 4096 buckets), each
//! against a baseline measured in the same run:
//! - verify (genuine, hot cache) with group commit (the default) against
//!   verify with `Durability::Immediate` (an fdatasync per call), showing
//!   what group-committing the audit log saves;
//! - enroll (durable) against a bare `sled` insert + flush of the same size;
//! - a split-custody subject's verify against a server-custody subject's,
//!   in the same store (`verify_custody`).
//!
//! `cargo bench --bench store`. The peer comparison (SQLCipher) is issue 5.

#[path = "common/mod.rs"]
mod common;
use common::{consent, unit, DIM};

use bioseal::{Durability, Embedding, Purpose, RootKey, Store, StoreConfig, Threshold};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::time::Duration;

const N: usize = 10_000;

fn open(dir: &std::path::Path, durability: Durability) -> Store {
    Store::open(
        StoreConfig::new(dir.join("data"), RootKey::from_bytes([3; 32]))
            .key_dir(dir.join("keys"))
            .model("bench", DIM)
            .threshold(Threshold::cosine(0.5))
            .durability(durability),
    )
    .expect("open")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), Durability::default());
        for i in 0..N {
            store
                .enroll(&format!("s{i}"), Embedding::new(unit(i as u64)), consent())
                .expect("enroll");
        }
    }
    let mut g = c.benchmark_group("verify_10k");
    g.measurement_time(Duration::from_secs(5));
    for (name, d) in [
        ("group_commit", Durability::default()),
        ("immediate", Durability::Immediate),
    ] {
        let store = open(dir.path(), d);
        let probes: Vec<Vec<f32>> = (0..64).map(|i| unit(i as u64)).collect();
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i = (i + 1) % probes.len();
                    (format!("s{i}"), Embedding::from_slice(&probes[i]))
                },
                |(s, e)| {
                    store
                        .verify(&s, &Purpose::IDENTITY_VERIFICATION, e)
                        .expect("verify")
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // Split custody against server custody, in the same store and group:
    // the key derivation, the second open and the separate sections are
    // all a split subject's verify adds.
    let mut g = c.benchmark_group("verify_custody");
    g.measurement_time(Duration::from_secs(5));
    let store = open(dir.path(), Durability::default());
    custody(&mut g, &store);
    g.finish();
    drop(store);

    let mut g = c.benchmark_group("enroll_durable");
    g.measurement_time(Duration::from_secs(5));
    {
        let store = open(dir.path(), Durability::default());
        let mut i = N;
        g.bench_function("bioseal", |b| {
            b.iter_batched(
                || {
                    i += 1;
                    (format!("s{i}"), Embedding::new(unit(i as u64)))
                },
                |(s, e)| store.enroll(&s, e, consent()).expect("enroll"),
                BatchSize::SmallInput,
            )
        });
    }
    let raw_dir = tempfile::tempdir().expect("tempdir");
    let raw = sled::open(raw_dir.path()).expect("sled");
    let value = vec![7u8; 2 * DIM + 200];
    let mut k = 0u64;
    g.bench_function("sled_insert_flush_baseline", |b| {
        b.iter(|| {
            k += 1;
            raw.insert(k.to_be_bytes(), value.as_slice())
                .expect("insert");
            raw.flush().expect("flush");
        })
    });
    g.finish();
}

/// `verify_custody/server` and `verify_custody/split` on one store.
fn custody(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, store: &Store) {
    let key = |i: usize| {
        let mut b = [0u8; 32];
        b[0] = 1;
        b[1] = i as u8;
        b[2..10].copy_from_slice(&(i as u64).to_le_bytes());
        bioseal::UserKey::from_bytes(b).expect("key")
    };
    let keys: Vec<bioseal::UserKey> = (0..64).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        let id = format!("k{i}");
        if let Err(e) = store.enroll_with(&id, Embedding::new(unit(i as u64)), consent(), k) {
            assert!(matches!(e, bioseal::Error::AlreadyEnrolled), "{e}");
        }
    }
    let probes: Vec<Vec<f32>> = (0..64).map(|i| unit(i as u64)).collect();
    for (name, prefix) in [("server", "s"), ("split", "k")] {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i = (i + 1) % probes.len();
                    (i, format!("{prefix}{i}"), Embedding::from_slice(&probes[i]))
                },
                |(i, s, e)| {
                    let d = if prefix == "k" {
                        store.verify_with(&s, &Purpose::IDENTITY_VERIFICATION, e, &keys[i])
                    } else {
                        store.verify(&s, &Purpose::IDENTITY_VERIFICATION, e)
                    };
                    assert_eq!(d.expect("verify"), bioseal::Decision::Match);
                },
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
