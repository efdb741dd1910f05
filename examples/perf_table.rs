//! Prints a table of bioseal's and the SQLCipher peer's latencies (median,
//! p99) and the ratios, every figure from this one run:
//!
//! `cargo run --release --example perf_table`
//!
//! `BIOSEAL_PERF_BACKEND=postgres` runs the shared mode instead: bioseal on
//! PostgreSQL against a PostgreSQL peer (see `perf_shared/mod.rs`).
//!
//! `BIOSEAL_PERF_SUBJECTS` sets the population (default 10,000; the
//! documented long run uses 1,000,000) and `BIOSEAL_PERF_OPS` the operations
//! timed per row (default 2,000); `BIOSEAL_PERF_CACHE_MB` sets sled's cache
//! (`StoreConfig::cache_bytes`, default 1024) and `BIOSEAL_PERF_BUCKETS` the
//! store's bucket count (default 4,096, bioseal's default). Both stores are
//! populated in bulk (bioseal: `Store::enroll_many`, one sync per 10,000; the
//! peer: one transaction per 10,000), with every 100th subject's consent
//! expiring after one day, so that the last row sweeps 1% of the population
//! two days later. Then the key-epoch rows (issue 13): a backup, a restore
//! into an empty directory (replaying the revocation ledger) and an epoch
//! roll, against the peer's `VACUUM INTO`, copy-and-open and `PRAGMA rekey`.

#[path = "../benches/common/mod.rs"]
mod common;
use common::{consent, unit, DIM};

#[path = "../benches/peer/mod.rs"]
mod peer;

mod perf_shared;

use bioseal::{
    Consent, Embedding, Error, FileEpochProvider, ManualClock, Purpose, Store, StoreConfig,
    Threshold, Timestamp,
};
use std::time::{Duration, Instant};

const THRESHOLD: f32 = 0.5;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (median, p99) of per-call durations.
fn stats(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort();
    (d[d.len() / 2], d[(d.len() * 99 / 100).min(d.len() - 1)])
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn row(name: &str, ours: (Duration, Duration), peer: (Duration, Duration)) {
    println!(
        "| {name:<22} | {:>10} | {:>10} | {:>10} | {:>10} | {:>6.1}x |",
        us(ours.0),
        us(ours.1),
        us(peer.0),
        us(peer.1),
        peer.0.as_secs_f64() / ours.0.as_secs_f64()
    );
}

/// Split custody (issue 14) against server custody, same store, same run:
/// `ops` split-custody subjects enrolled with their user keys and verified
/// once (hot), then each loop step times a server-custody verify and a
/// split-custody verify, alternating, so that drift in the machine's speed
/// falls on both alike.
fn split_custody_row(store: &Store, ops: usize) -> Result<(), Error> {
    let key = |i: usize| {
        let mut b = [0u8; 32];
        b[0] = 0xa5;
        b[1..9].copy_from_slice(&(i as u64).to_le_bytes());
        bioseal::UserKey::from_bytes(b)
    };
    let keys = (0..ops).map(key).collect::<Result<Vec<_>, _>>()?;
    for (i, k) in keys.iter().enumerate() {
        store.enroll_with(
            &format!("k{i}"),
            Embedding::new(unit(i as u64)),
            consent(),
            k,
        )?;
        let _ = store.verify_with(
            &format!("k{i}"),
            &Purpose::IDENTITY_VERIFICATION,
            Embedding::new(unit(i as u64)),
            k,
        )?;
    }
    let (mut server, mut split) = (Vec::with_capacity(ops), Vec::with_capacity(ops));
    for (i, k) in keys.iter().enumerate() {
        let (s_id, k_id) = (format!("s{i}"), format!("k{i}"));
        let (a, b) = (
            Embedding::new(unit(i as u64)),
            Embedding::new(unit(i as u64)),
        );
        let t = Instant::now();
        let d = store.verify(&s_id, &Purpose::IDENTITY_VERIFICATION, a);
        server.push(t.elapsed());
        assert!(matches!(d, Ok(bioseal::Decision::Match)), "{d:?}");
        let t = Instant::now();
        let d = store.verify_with(&k_id, &Purpose::IDENTITY_VERIFICATION, b, k);
        split.push(t.elapsed());
        assert!(matches!(d, Ok(bioseal::Decision::Match)), "{d:?}");
    }
    let (server, split) = (stats(server), stats(split));
    println!(
        "| verify (hot, split)    | {:>10} | {:>10} | server custody, interleaved: p50 {}, p99 {}; split - server p50 {:+.2} µs |",
        us(split.0),
        us(split.1),
        us(server.0),
        us(server.1),
        (split.0.as_secs_f64() - server.0.as_secs_f64()) * 1e6
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    if let Ok(kind) = std::env::var("BIOSEAL_PERF_WORKER") {
        return perf_shared::worker(&kind);
    }
    if std::env::var("BIOSEAL_PERF_BACKEND").is_ok_and(|b| b == "postgres") {
        return perf_shared::run();
    }
    let n = env("BIOSEAL_PERF_SUBJECTS", 10_000);
    let buckets = env("BIOSEAL_PERF_BUCKETS", bioseal::DEFAULT_BUCKETS as usize);
    let ops = env("BIOSEAL_PERF_OPS", 2_000).min(n / 2);
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let clock = ManualClock::new(Timestamp::from_unix_secs(start));
    std::fs::create_dir_all(dirs.0.path().join("keys"))?;
    let config = |data: &str| -> Result<StoreConfig, Error> {
        Ok(StoreConfig::new(
            dirs.0.path().join(data),
            FileEpochProvider::open(dirs.0.path().join("keys").join("bioseal.epochs"))?,
        )
        .key_dir(dirs.0.path().join("keys"))
        .model("bench", DIM)
        .threshold(Threshold::cosine(THRESHOLD))
        .cache_bytes(env("BIOSEAL_PERF_CACHE_MB", 1024) as u64 * (1 << 20))
        .buckets(buckets as u32)
        .clock(clock.clone()))
    };
    let store = Store::open(config("data")?)?;
    let peer_path = dirs.1.path().join("peer.db");
    let mut p =
        peer::Peer::open(&peer_path, THRESHOLD).map_err(|e| Error::Config(e.to_string()))?;
    let peer_err = |e: rusqlite::Error| Error::Config(e.to_string());
    // Every 100th subject's consent runs out after a day.
    let expiry = |i: usize| {
        start
            + if i.is_multiple_of(100) {
                86_400
            } else {
                365 * 86_400
            }
    };
    let (mut t_ours, mut t_peer) = (Duration::ZERO, Duration::ZERO);
    for lo in (0..n).step_by(10_000) {
        let ids: Vec<String> = (lo..n.min(lo + 10_000)).map(|i| format!("s{i}")).collect();
        let vecs: Vec<Vec<f32>> = (lo..lo + ids.len()).map(|i| unit(i as u64)).collect();
        let t = Instant::now();
        let results =
            store.enroll_many(ids.iter().zip(&vecs).enumerate().map(|(j, (id, v))| {
                let c = Consent::new([Purpose::IDENTITY_VERIFICATION])
                    .expires_at(Timestamp::from_unix_secs(expiry(lo + j)))
                    .evidence([1; 32]);
                (id, Embedding::from_slice(v), c)
            }))?;
        t_ours += t.elapsed();
        results.into_iter().collect::<Result<(), Error>>()?;
        let items: Vec<(&str, &[f32], i64)> = ids
            .iter()
            .zip(&vecs)
            .enumerate()
            .map(|(j, (id, v))| (id.as_str(), v.as_slice(), expiry(lo + j) as i64))
            .collect();
        let t = Instant::now();
        p.enroll_many(&items).map_err(peer_err)?;
        t_peer += t.elapsed();
    }
    p.checkpoint().map_err(peer_err)?;
    eprintln!(
        "populated {n} subjects: bioseal {:.1} s ({:.1} µs each), peer {:.1} s",
        t_ours.as_secs_f64(),
        t_ours.as_secs_f64() * 1e6 / n as f64,
        t_peer.as_secs_f64()
    );

    // Each closure builds its inputs, then times only the call and returns
    // that duration.
    let time = |f: &mut dyn FnMut(usize) -> Duration| -> (Duration, Duration) {
        stats((0..ops).map(f).collect())
    };
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    println!(
        "{n} subjects, {buckets} buckets, {DIM} dimensions, {ops} operations per row, 2 cores"
    );
    println!("| operation              | bioseal p50 | bioseal p99 | peer p50   | peer p99   | peer/ours |");
    println!("|------------------------|------------:|------------:|-----------:|-----------:|----------:|");
    // Hot cache: every subject the verify rows time is verified once first,
    // in both stores.
    for i in 0..ops {
        let v = unit(i as u64);
        let _ = store.verify(
            &format!("s{i}"),
            &Purpose::IDENTITY_VERIFICATION,
            Embedding::from_slice(&v),
        );
        let _ = p.verify(&format!("s{i}"), &v);
    }
    let v_ours = time(&mut |i| {
        let (id, e) = (format!("s{i}"), Embedding::new(unit(i as u64)));
        let mut e = Some(e);
        timed(&mut || {
            let d = store.verify(
                &id,
                &Purpose::IDENTITY_VERIFICATION,
                e.take().expect("probe"),
            );
            assert!(matches!(d, Ok(bioseal::Decision::Match)));
        })
    });
    let v_peer = time(&mut |i| {
        let (id, v) = (format!("s{i}"), unit(i as u64));
        timed(&mut || assert_eq!(p.verify(&id, &v).ok().flatten(), Some(true)))
    });
    row("verify (hot)", v_ours, v_peer);
    split_custody_row(&store, ops)?;
    // A failed verify (an impostor probe against subjects ops..2*ops, one
    // failure each: bioseal re-keys the subject and rotates its bucket; the
    // peer writes its audit row) and an unknown subject (bioseal's decoy
    // costs what a no-match costs).
    let impostor = unit(u64::MAX / 3);
    let mut impostor_row = |name: &str, id: &dyn Fn(usize) -> String, peer_says: Option<bool>| {
        let ours = time(&mut |i| {
            let (id, mut e) = (id(i), Some(Embedding::from_slice(&impostor)));
            timed(&mut || {
                let d = store.verify(
                    &id,
                    &Purpose::IDENTITY_VERIFICATION,
                    e.take().expect("probe"),
                );
                let want = match peer_says {
                    Some(_) => matches!(d, Ok(bioseal::Decision::NoMatch)),
                    None => matches!(d, Err(Error::NotEnrolled)),
                };
                assert!(want, "{d:?}");
            })
        });
        let peer = time(&mut |i| {
            let id = id(i);
            timed(&mut || assert_eq!(p.verify(&id, &impostor).ok().flatten(), peer_says))
        });
        row(name, ours, peer);
    };
    impostor_row(
        "verify (no match)",
        &|i| format!("s{}", ops + i),
        Some(false),
    );
    impostor_row(
        "verify (unknown subject)",
        &|i| format!("unknown-{i}"),
        None,
    );
    let e_ours = time(&mut |i| {
        let (id, mut e) = (format!("e{i}"), Some(Embedding::new(unit((n + i) as u64))));
        timed(&mut || {
            let _ = store.enroll(&id, e.take().expect("embedding"), consent());
        })
    });
    let e_peer = time(&mut |i| {
        let (id, v) = (format!("e{i}"), unit((n + i) as u64));
        timed(&mut || {
            let _ = p.enroll(&id, &v);
        })
    });
    row("enroll (durable)", e_ours, e_peer);
    let r_ours = time(&mut |i| {
        let id = format!("e{i}");
        timed(&mut || {
            let _ = store.revoke(&id);
        })
    });
    let r_peer = time(&mut |i| {
        let id = format!("e{i}");
        timed(&mut || {
            let _ = p.revoke(&id);
        })
    });
    row("revoke (ours: shredded)", r_ours, r_peer);

    // Verify throughput on 1 and 2 threads (bioseal).
    let store = std::sync::Arc::new(store);
    // Probes built beforehand: only the verify calls are in the timed loop.
    let probes: Vec<Vec<f32>> = (0..n / 2).map(|i| unit(i as u64)).collect();
    let ids: Vec<String> = (0..n / 2).map(|i| format!("s{i}")).collect();
    // Each configuration runs 20x `ops` verifies, three times, alternating
    // 1 and 2 threads; the median of the three is reported (short runs on a
    // shared virtual machine swing widely).
    let run = |threads: usize| -> f64 {
        let per = ops * 20 / threads;
        let t = Instant::now();
        std::thread::scope(|sc| {
            for th in 0..threads {
                let (store, probes, ids) = (&store, &probes, &ids);
                sc.spawn(move || {
                    for j in 0..per {
                        let i = (th * 7919 + j) % (n / 2);
                        let _ = store.verify(
                            &ids[i],
                            &Purpose::IDENTITY_VERIFICATION,
                            Embedding::from_slice(&probes[i]),
                        );
                    }
                });
            }
        });
        (threads * per) as f64 / t.elapsed().as_secs_f64()
    };
    // The peer's throughput, on one thread (one connection), the same way.
    let mut run_peer = || -> Result<f64, Error> {
        let per = ops * 20;
        let t = Instant::now();
        for j in 0..per {
            let i = j % (n / 2);
            p.verify(&ids[i], &probes[i]).map_err(peer_err)?;
        }
        Ok(per as f64 / t.elapsed().as_secs_f64())
    };
    let (mut one, mut two, mut peer_one) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        one.push(run(1));
        two.push(run(2));
        peer_one.push(run_peer()?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[1]
    };
    let per_sec = [median(one), median(two)];
    let peer_per_sec = median(peer_one);
    println!(
        "\nbioseal verify throughput: 1 thread {:.0}/s, 2 threads {:.0}/s ({:.2}x)",
        per_sec[0],
        per_sec[1],
        per_sec[1] / per_sec[0]
    );
    println!(
        "peer verify throughput, 1 thread: {peer_per_sec:.0}/s; bioseal/peer: {:.1}x \
         (from the medians above: {:.1}x)",
        per_sec[0] / peer_per_sec,
        v_peer.0.as_secs_f64() / v_ours.0.as_secs_f64()
    );

    // Sweep: two days on, every 100th subject is past its consent expiry.
    clock.advance(Duration::from_secs(2 * 86_400));
    let report = store.sweep()?;
    let t = Instant::now();
    let peer_swept = p.sweep((start + 2 * 86_400) as i64).map_err(peer_err)?;
    let t_peer = t.elapsed();
    println!(
        "sweep of {} due subjects out of {n}: bioseal {:.3} s ({} buckets rotated), \
         peer {:.3} s ({peer_swept} deleted, not shredded)",
        report.expired,
        report.took.as_secs_f64(),
        report.buckets_rotated,
        t_peer.as_secs_f64()
    );

    // Key epochs: backup, restore, roll (one each; the peer's equivalents
    // in the same run).
    let peer_err2 = |e: rusqlite::Error| Error::Config(e.to_string());
    let t = Instant::now();
    let b = store.backup(dirs.0.path().join("backup"))?;
    let t_backup = t.elapsed();
    let t = Instant::now();
    p.backup_to(&dirs.1.path().join("peer-backup.db"))
        .map_err(peer_err2)?;
    let t_peer_backup = t.elapsed();
    drop(store);
    std::fs::rename(dirs.0.path().join("data"), dirs.0.path().join("lost"))?;
    let t = Instant::now();
    let (store, r) = Store::restore(dirs.0.path().join("backup"), config("data")?)?;
    let t_restore = t.elapsed();
    let t = Instant::now();
    std::fs::copy(
        dirs.1.path().join("peer-backup.db"),
        dirs.1.path().join("peer-restored.db"),
    )?;
    let restored =
        peer::Peer::open(&dirs.1.path().join("peer-restored.db"), THRESHOLD).map_err(peer_err2)?;
    let peer_rows = restored.count().map_err(peer_err2)?;
    let t_peer_restore = t.elapsed();
    let mut rolls = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        store.roll_epoch()?;
        rolls.push(t.elapsed());
    }
    rolls.sort();
    let t = Instant::now();
    p.rekey(0x5e).map_err(peer_err2)?;
    let t_rekey = t.elapsed();
    let mb = |bytes: u64, d: Duration| bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    println!(
        "\nbackup: bioseal {:.3} s ({} rows, {:.1} MiB, {:.0} rows/s, {:.1} MiB/s), \
         peer VACUUM INTO {:.3} s ({:.1}x)",
        t_backup.as_secs_f64(),
        b.rows,
        b.bytes as f64 / (1 << 20) as f64,
        b.rows as f64 / t_backup.as_secs_f64(),
        mb(b.bytes, t_backup),
        t_peer_backup.as_secs_f64(),
        t_backup.as_secs_f64() / t_peer_backup.as_secs_f64()
    );
    println!(
        "restore: bioseal {:.3} s ({} rows, {:.0} rows/s, {} ledger entries replayed), \
         peer copy+open {:.3} s ({peer_rows} rows; {:.1}x)",
        t_restore.as_secs_f64(),
        r.rows,
        r.rows as f64 / t_restore.as_secs_f64(),
        r.replayed,
        t_peer_restore.as_secs_f64(),
        t_restore.as_secs_f64() / t_peer_restore.as_secs_f64()
    );
    println!(
        "epoch roll (re-seals the {} KiB keyring, not the data): bioseal median of 3 {:.1} ms; \
         peer PRAGMA rekey (re-encrypts the whole file) {:.3} s ({:.0}x)",
        (1024 + buckets * 256) / 1024,
        rolls[1].as_secs_f64() * 1e3,
        t_rekey.as_secs_f64(),
        t_rekey.as_secs_f64() / rolls[1].as_secs_f64()
    );
    Ok(())
}
