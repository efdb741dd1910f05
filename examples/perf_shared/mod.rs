//! `perf_table`'s shared mode (`BIOSEAL_PERF_BACKEND=postgres`): bioseal on
//! PostgreSQL against the PostgreSQL peer (`benches/pgpeer`), both on the
//! same loopback server (a throwaway one started here, Unix socket, fsync
//! on; or `BIOSEAL_TEST_PG_HOST`), every figure from this one run:
//! verify (match and no match), enroll, revoke → shredded, and verify
//! throughput with 1 and 2 replica processes.

#[path = "../../tests/common/pg.rs"]
#[allow(dead_code)]
mod pg;

#[path = "../../benches/pgpeer/mod.rs"]
mod pgpeer;

use super::common::{consent, unit, DIM};
use super::{env, row, stats, THRESHOLD};
use bioseal::{Embedding, Error, Purpose, RootKey, Store, StoreConfig, Threshold};
use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IDV: Purpose = Purpose::IDENTITY_VERIFICATION;

fn config(url: &str, buckets: u32) -> StoreConfig {
    StoreConfig::new(url, RootKey::from_bytes([3; 32]))
        .model("bench", DIM)
        .threshold(Threshold::cosine(THRESHOLD))
        .buckets(buckets)
}

fn perr(e: postgres::Error) -> Error {
    Error::Config(e.to_string())
}

/// A worker process (one replica): verifies genuine probes of subjects
/// `0..n` until the parent closes stdin or `secs` pass; prints the count.
pub fn worker(kind: &str) -> Result<(), Error> {
    let url = std::env::var("BIOSEAL_PERF_URL").map_err(|_| Error::Config("url".into()))?;
    let n = env("BIOSEAL_PERF_SUBJECTS", 10_000);
    let secs = env("BIOSEAL_PERF_SECS", 5) as u64;
    let seed = env("BIOSEAL_PERF_SEED", 0);
    let probes: Vec<Vec<f32>> = (0..n.min(2_000)).map(|i| unit(i as u64)).collect();
    let mut verify: Box<dyn FnMut(usize)> = if kind == "bioseal" {
        let store = Store::open(config(&url, env("BIOSEAL_PERF_BUCKETS", 4096) as u32))?;
        Box::new(move |i| {
            let _ = store.verify(&format!("s{i}"), &IDV, Embedding::from_slice(&probes[i]));
        })
    } else {
        let mut p = pgpeer::PgPeer::open(&url, THRESHOLD).map_err(perr)?;
        Box::new(move |i| {
            let _ = p.verify(&format!("s{i}"), &probes[i]);
        })
    };
    println!("ready");
    std::io::stdout().flush()?;
    let mut go = String::new();
    std::io::stdin().lock().read_line(&mut go)?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut count = 0usize;
    let mut i = seed * 7919;
    while Instant::now() < deadline {
        verify(i % n.min(2_000));
        i += 1;
        count += 1;
    }
    println!("{count}");
    Ok(())
}

/// Verifies per second over `procs` worker processes started together.
fn throughput(kind: &str, url: &str, n: usize, procs: usize, secs: u64) -> Result<f64, Error> {
    let mut children = Vec::new();
    for p in 0..procs {
        let mut c = Command::new(std::env::current_exe()?)
            .env("BIOSEAL_PERF_WORKER", kind)
            .env("BIOSEAL_PERF_URL", url)
            .env("BIOSEAL_PERF_SUBJECTS", n.to_string())
            .env("BIOSEAL_PERF_SECS", secs.to_string())
            .env("BIOSEAL_PERF_SEED", p.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out =
            std::io::BufReader::new(c.stdout.take().ok_or(Error::Config("stdout".into()))?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(Error::Config(format!("worker: {line}")));
        }
        children.push((c, out));
    }
    for (c, _) in children.iter_mut() {
        if let Some(stdin) = c.stdin.as_mut() {
            writeln!(stdin, "go")?;
        }
    }
    let mut total = 0usize;
    for (mut c, mut out) in children {
        let mut line = String::new();
        out.read_line(&mut line)?;
        total += line
            .trim()
            .parse::<usize>()
            .map_err(|_| Error::Config(format!("worker said {line}")))?;
        c.wait()?;
    }
    Ok(total as f64 / secs as f64)
}

pub fn run() -> Result<(), Error> {
    let n = env("BIOSEAL_PERF_SUBJECTS", 10_000);
    let ops = env("BIOSEAL_PERF_OPS", 1_000).min(n / 4);
    let buckets = env("BIOSEAL_PERF_BUCKETS", 4096) as u32;
    let server;
    let (url_ours, url_peer) = match std::env::var_os("BIOSEAL_TEST_PG_HOST") {
        Some(_) => (pg::fresh_database(), pg::fresh_database()),
        None => {
            server = pg::Server::start();
            (
                server.fresh_database("perf_bioseal"),
                server.fresh_database("perf_peer"),
            )
        }
    };
    let store = Store::open(config(&url_ours, buckets))?;
    let mut p = pgpeer::PgPeer::open(&url_peer, THRESHOLD).map_err(perr)?;
    let (mut t_ours, mut t_peer) = (Duration::ZERO, Duration::ZERO);
    for lo in (0..n).step_by(1_000) {
        let ids: Vec<String> = (lo..n.min(lo + 1_000)).map(|i| format!("s{i}")).collect();
        let vecs: Vec<Vec<f32>> = (lo..lo + ids.len()).map(|i| unit(i as u64)).collect();
        let t = Instant::now();
        let results = store.enroll_many(
            ids.iter()
                .zip(&vecs)
                .map(|(id, v)| (id, Embedding::from_slice(v), consent())),
        )?;
        t_ours += t.elapsed();
        results.into_iter().collect::<Result<(), Error>>()?;
        let items: Vec<(&str, &[f32])> = ids
            .iter()
            .zip(&vecs)
            .map(|(id, v)| (id.as_str(), v.as_slice()))
            .collect();
        let t = Instant::now();
        p.enroll_many(&items).map_err(perr)?;
        t_peer += t.elapsed();
    }
    eprintln!(
        "populated {n} subjects on PostgreSQL: bioseal {:.1} s ({:.0} µs each), peer {:.1} s",
        t_ours.as_secs_f64(),
        t_ours.as_secs_f64() * 1e6 / n as f64,
        t_peer.as_secs_f64()
    );
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    println!(
        "shared mode: PostgreSQL over a Unix socket on this machine, {n} subjects, {buckets} buckets, \
         {DIM} dimensions, {ops} operations per row, 2 cores"
    );
    println!("| operation              | bioseal p50 | bioseal p99 | peer p50   | peer p99   | peer/ours |");
    println!("|------------------------|------------:|------------:|-----------:|-----------:|----------:|");
    let v_ours = stats(
        (0..ops)
            .map(|i| {
                let (id, mut e) = (format!("s{i}"), Some(Embedding::new(unit(i as u64))));
                timed(&mut || {
                    let d = store.verify(&id, &IDV, e.take().expect("probe"));
                    assert!(matches!(d, Ok(bioseal::Decision::Match)), "{d:?}");
                })
            })
            .collect(),
    );
    let v_peer = stats(
        (0..ops)
            .map(|i| {
                let (id, v) = (format!("s{i}"), unit(i as u64));
                timed(&mut || assert_eq!(p.verify(&id, &v).ok().flatten(), Some(true)))
            })
            .collect(),
    );
    row("verify", v_ours, v_peer);
    let impostor = unit(u64::MAX / 3);
    let f_ours = stats(
        (0..ops)
            .map(|i| {
                let (id, mut e) = (
                    format!("s{}", ops + i),
                    Some(Embedding::from_slice(&impostor)),
                );
                timed(&mut || {
                    let d = store.verify(&id, &IDV, e.take().expect("probe"));
                    assert!(matches!(d, Ok(bioseal::Decision::NoMatch)), "{d:?}");
                })
            })
            .collect(),
    );
    let f_peer = stats(
        (0..ops)
            .map(|i| {
                let id = format!("s{}", ops + i);
                timed(&mut || assert_eq!(p.verify(&id, &impostor).ok().flatten(), Some(false)))
            })
            .collect(),
    );
    row("verify (no match)", f_ours, f_peer);
    let e_ours = stats(
        (0..ops)
            .map(|i| {
                let (id, mut e) = (format!("e{i}"), Some(Embedding::new(unit((n + i) as u64))));
                timed(&mut || {
                    store
                        .enroll(&id, e.take().expect("embedding"), consent())
                        .expect("enroll");
                })
            })
            .collect(),
    );
    let e_peer = stats(
        (0..ops)
            .map(|i| {
                let (id, v) = (format!("e{i}"), unit((n + i) as u64));
                timed(&mut || p.enroll(&id, &v).expect("enroll"))
            })
            .collect(),
    );
    row("enroll", e_ours, e_peer);
    let r_ours = stats(
        (0..ops)
            .map(|i| {
                let id = format!("e{i}");
                timed(&mut || {
                    let r = store.revoke(&id).expect("revoke");
                    assert!(matches!(r.status, bioseal::ShredStatus::Shredded { .. }));
                })
            })
            .collect(),
    );
    let r_peer = stats(
        (0..ops)
            .map(|i| {
                let id = format!("e{i}");
                timed(&mut || assert!(p.revoke(&id).expect("revoke")))
            })
            .collect(),
    );
    row("revoke (ours: shredded)", r_ours, r_peer);
    drop(store);
    drop(p);
    let secs = env("BIOSEAL_PERF_SECS", 5) as u64;
    let mut lines = Vec::new();
    for (kind, url) in [("bioseal", &url_ours), ("peer", &url_peer)] {
        let one = throughput(kind, url, n / 2, 1, secs)?;
        let two = throughput(kind, url, n / 2, 2, secs)?;
        lines.push(format!(
            "verify throughput, {kind:<7}: 1 replica {one:>7.0}/s, 2 replicas {two:>7.0}/s ({:.2}x)",
            two / one
        ));
    }
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
