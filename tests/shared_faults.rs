//! Shared mode, bad input and faults: an unreachable database, a wrong
//! root key, another store's database, a newer schema, and a server
//! restarted (fast and immediate shutdown) in the middle of a run.

mod common;
use bioseal::{Decision, Embedding, Error, Purpose, RootKey, Store, StoreConfig, Threshold};
use common::{pg, Rng, DIM, MODEL};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const IDV: Purpose = Purpose::IDENTITY_VERIFICATION;

fn config(url: &str, key: u8) -> StoreConfig {
    StoreConfig::new(url, RootKey::from_bytes([key; 32]))
        .model(MODEL, DIM)
        .threshold(Threshold::cosine(0.5))
        .buckets(8)
}

fn consent() -> bioseal::Consent {
    bioseal::Consent::new([IDV])
        .expires_at(
            bioseal::Clock::now(&bioseal::SystemClock)
                .saturating_add(Duration::from_secs(365 * 86_400)),
        )
        .evidence([3; 32])
}

fn vector(seed: u64) -> Vec<f32> {
    Rng(seed).unit(DIM)
}

/// Every bioseal row of a database, hashed (to show nothing was written).
fn fingerprint(url: &str) -> String {
    let mut c = pg::client(url);
    let mut out = String::new();
    for t in ["records", "keys", "meta", "audit"] {
        let row = c
            .query_one(
                &format!(
                    "SELECT coalesce(md5(string_agg(k || v, '' ORDER BY k)), '') FROM bioseal.{t}"
                ),
                &[],
            )
            .expect("hash");
        out.push_str(&row.get::<_, String>(0));
    }
    let row = c
        .query_one(
            "SELECT coalesce(md5(string_agg(v, '' ORDER BY part)), '') FROM bioseal.keyring",
            &[],
        )
        .expect("hash");
    out + &row.get::<_, String>(0)
}

#[test]
fn an_unreachable_database_is_one_typed_line_without_the_password() {
    let url = "postgresql://bob:hunter2secret@127.0.0.1:1/bioseal?password=alsosecret";
    let t = std::time::Instant::now();
    let e = Store::open(config(url, 1)).expect_err("nothing listens on port 1");
    let msg = e.to_string();
    assert!(matches!(e, Error::Storage(_)), "{e:?}");
    assert!(msg.contains("127.0.0.1:1"), "names host and port: {msg}");
    assert!(!msg.contains("secret"), "never the password: {msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    assert!(t.elapsed() < Duration::from_secs(8), "reported at once");
    // Nor does the configuration print it.
    let dbg = format!("{:?}", config(url, 1));
    assert!(!dbg.contains("secret"), "{dbg}");
}

#[test]
fn wrong_root_key_another_store_or_a_newer_schema_are_typed_and_write_nothing() {
    if pg::skipped("wrong_root_key_another_store_or_a_newer_schema") {
        return;
    }
    let a = pg::fresh_database();
    let b = pg::fresh_database();
    for url in [&a, &b] {
        let s = Store::open(config(url, 1)).expect("create");
        s.enroll("alice", Embedding::new(vector(1)), consent())
            .expect("enroll");
    }
    // Wrong root key: refused before anything is written.
    let before = fingerprint(&a);
    assert!(matches!(
        Store::open(config(&a, 2)),
        Err(Error::WrongRootKey)
    ));
    assert_eq!(fingerprint(&a), before, "nothing written");

    // A's data under B's keyring rows (same root key): another store's.
    let mut ca = pg::client(&a);
    let mut cb = pg::client(&b);
    let ring: Vec<(i32, Vec<u8>)> = cb
        .query("SELECT part, v FROM bioseal.keyring ORDER BY part", &[])
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let saved: Vec<(i32, Vec<u8>)> = ca
        .query("SELECT part, v FROM bioseal.keyring ORDER BY part", &[])
        .expect("read")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let put = |c: &mut postgres::Client, rows: &[(i32, Vec<u8>)]| {
        for (p, v) in rows {
            c.execute("UPDATE bioseal.keyring SET v = $2 WHERE part = $1", &[p, v])
                .expect("update");
        }
    };
    put(&mut ca, &ring);
    let before = fingerprint(&a);
    assert!(matches!(
        Store::open(config(&a, 1)),
        Err(Error::StoreMismatch)
    ));
    assert_eq!(fingerprint(&a), before, "nothing written");
    put(&mut ca, &saved);

    // A schema newer than this code: typed, and nothing written.
    ca.execute("INSERT INTO bioseal.schema VALUES (99)", &[])
        .expect("insert");
    let before = fingerprint(&a);
    match Store::open(config(&a, 1)) {
        Err(Error::SchemaVersion {
            found: 99,
            supported,
        }) => assert!(supported < 99),
        other => panic!("expected SchemaVersion, got {other:?}"),
    }
    assert_eq!(fingerprint(&a), before, "nothing written");
    ca.execute("DELETE FROM bioseal.schema WHERE version = 99", &[])
        .expect("delete");
    let s = Store::open(config(&a, 1)).expect("opens again");
    assert_eq!(
        s.verify("alice", &IDV, Embedding::new(vector(1)))
            .expect("verify"),
        Decision::Match
    );
    // A schema altered behind bioseal's back (a NULL where a value was):
    // typed, never a panic, never a match.
    ca.batch_execute(
        "ALTER TABLE bioseal.records ALTER COLUMN v DROP NOT NULL;
         UPDATE bioseal.records SET v = NULL WHERE substring(k from 1 for 1) = 'S'",
    )
    .expect("alter");
    let r = s.verify("alice", &IDV, Embedding::new(vector(1)));
    assert!(matches!(r, Err(Error::Tampered { .. })), "{r:?}");
}

/// The server is stopped (fast, then immediate shutdown) and started again
/// while a worker enrolls and verifies: calls fail with typed errors while
/// it is down and succeed again once it is back, without reopening the
/// store; every acknowledged enrollment is there afterwards.
#[test]
fn a_server_restart_mid_run_fails_calls_typed_and_loses_nothing_acknowledged() {
    if pg::skipped("a_server_restart_mid_run") {
        return;
    }
    let server = pg::Server::start();
    let url = server.fresh_database("restart");
    let store = Arc::new(Store::open(config(&url, 1)).expect("open"));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (store, acked, errors, stop) =
            (store.clone(), acked.clone(), errors.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                match store.enroll(&format!("r{i}"), Embedding::new(vector(i)), consent()) {
                    Ok(_) => acked.lock().expect("lock").push(i),
                    Err(Error::Storage(m)) => errors.lock().expect("lock").push(m),
                    Err(e) => panic!("an untyped failure while the server restarts: {e:?}"),
                }
                let probe = acked.lock().expect("lock").last().copied();
                if let Some(j) = probe {
                    match store.verify(&format!("r{j}"), &IDV, Embedding::new(vector(j))) {
                        Ok(Decision::Match) => {}
                        Ok(d) => panic!("r{j}: {d:?}"),
                        Err(Error::Storage(m)) => errors.lock().expect("lock").push(m),
                        Err(e) => panic!("an untyped failure while the server restarts: {e:?}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let progress = |what: &str| {
        let n = acked.lock().expect("lock").len();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while acked.lock().expect("lock").len() < n + 5 {
            assert!(std::time::Instant::now() < deadline, "no progress {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    progress("before the restarts");
    for mode in ["fast", "immediate"] {
        server.stop(mode);
        // While it is down, a call fails typed, within the pool's
        // connection timeout (3 s), naming the server.
        let t = std::time::Instant::now();
        match store.verify("r1", &IDV, Embedding::new(vector(1))) {
            Err(Error::Storage(m)) => {
                assert!(m.contains("postgresql://postgres@"), "{m}");
                assert!(!m.contains('\n'), "{m}");
            }
            other => panic!("{mode}: a call to a stopped server gave {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        server.start_again();
        progress(&format!("after the {mode} restart"));
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("worker");
    let errors = errors.lock().expect("lock").clone();
    for e in &errors {
        assert!(!e.contains('\n'), "one line: {e}");
    }
    // Every acknowledged enrollment verifies, from this store and from a
    // fresh one.
    drop(store);
    let store = Store::open(config(&url, 1)).expect("reopen");
    let acked = acked.lock().expect("lock").clone();
    for &i in &acked {
        assert_eq!(
            store
                .verify(&format!("r{i}"), &IDV, Embedding::new(vector(i)))
                .expect("acknowledged enrollment present"),
            Decision::Match,
            "r{i}"
        );
    }
    store.audit().verify_chain().expect("audit chain intact");
    eprintln!(
        "restart test: {} enrollments acknowledged, {} calls failed while the server was down",
        acked.len(),
        errors.len()
    );
}

/// TLS when the URL asks for it: a server that accepts TCP connections
/// over TLS only (`hostssl`) is reached with `sslmode=require` and its CA
/// in `sslrootcert`; without TLS it refuses; with another CA the
/// certificate is refused (it is always verified). Each failure is one
/// typed `Storage` line.
#[test]
fn tls_when_the_url_asks_for_it_and_the_server_is_always_verified() {
    if pg::skipped("tls_when_the_url_asks_for_it") {
        return;
    }
    let (server, port, ca) = pg::Server::start_tls();
    server.fresh_database("tls");
    let url = |q: &str| format!("postgresql://postgres@localhost:{port}/tls?{q}");
    let tls = url(&format!("sslmode=require&sslrootcert={}", ca.display()));
    {
        let s = Store::open(config(&tls, 1)).expect("open over TLS");
        s.enroll("alice", Embedding::new(vector(1)), consent())
            .expect("enroll");
        assert_eq!(
            s.verify("alice", &IDV, Embedding::new(vector(1)))
                .expect("verify"),
            Decision::Match
        );
    }
    for (what, u) in [
        ("no TLS", url("sslmode=disable")),
        ("another CA", {
            // A CA of its own: the server's certificate does not chain to it.
            let other = server.dir.join("other-ca.crt");
            let ok = std::process::Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "openssl req -x509 -newkey rsa:2048 -nodes -keyout /dev/null -out {} -days 1 -subj /CN=other 2>/dev/null",
                        other.display()
                    ),
                ])
                .status()
                .expect("openssl");
            assert!(ok.success());
            url(&format!("sslmode=require&sslrootcert={}", other.display()))
        }),
        ("the Mozilla roots", url("sslmode=require")),
    ] {
        match Store::open(config(&u, 1)) {
            Err(Error::Storage(m)) => {
                assert!(m.contains(&format!("localhost:{port}")), "{what}: {m}");
                assert!(!m.contains('\n'), "{what}: {m}");
            }
            other => panic!("{what}: expected a Storage error, got {other:?}"),
        }
    }
}
