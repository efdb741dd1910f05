//! Promise 7 under crashes: a child process enrolls and revokes while the
//! parent kills it with SIGKILL at random moments, or it aborts itself at a
//! named point inside a key rotation. After each kill the parent reopens the
//! store and checks: it opens (no corruption error), every enroll and revoke
//! acknowledged before the kill is in effect, no revoked subject is back, no
//! rotation is left half done, and the audit chain verifies.

mod common;
use bioseal::{Decision, Error, RootKey, Store, StoreConfig, Threshold};
use common::{consent, emb, Rng, IDV};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DIM: usize = 32;
const BUCKETS: u32 = 4;

/// Data in `dir/data`, keyring in `dir/keys`.
fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(dir.join("data"), RootKey::from_bytes([0x42; 32]))
        .key_dir(dir.join("keys"))
        .model("crash-test", DIM)
        .threshold(Threshold::cosine(0.5))
        .buckets(BUCKETS)
}

fn vector(i: u64) -> Vec<f32> {
    Rng(1_000 + i).unit(DIM)
}

/// The child: enroll s0, s1, …; after every third enrollment revoke the
/// subject enrolled two steps earlier. Each operation is journaled (and the
/// journal synced) only after it returned Ok.
#[test]
#[ignore = "worker process of the crash tests; started by them"]
fn crash_worker() {
    let (Ok(dir), Ok(journal)) = (
        std::env::var("BIOSEAL_CRASH_DIR"),
        std::env::var("BIOSEAL_CRASH_JOURNAL"),
    ) else {
        return;
    };
    let store = Store::open(config(Path::new(&dir))).expect("worker open");
    let mut j = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)
        .expect("journal");
    let now = bioseal::Clock::now(&bioseal::SystemClock);
    for i in 0..100_000u64 {
        store
            .enroll(&format!("s{i}"), emb(&vector(i)), consent(now, 365))
            .expect("enroll");
        j.write_all(format!("E {i}\n").as_bytes()).expect("journal");
        j.sync_data().expect("sync");
        if i % 3 == 2 {
            store.revoke(&format!("s{}", i - 2)).expect("revoke");
            j.write_all(format!("R {}\n", i - 2).as_bytes())
                .expect("journal");
            j.sync_data().expect("sync");
        }
    }
}

#[derive(Clone, Copy)]
enum Kill {
    After(Duration),
    At(&'static str, u64),
}

/// Run one child until it is killed; then check the store. Returns the
/// number of acknowledged operations.
fn round(kill: Kill) -> usize {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let journal = tmp.path().join("journal");
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.args([
        "--exact",
        "crash_worker",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("BIOSEAL_CRASH_DIR", &dir)
    .env("BIOSEAL_CRASH_JOURNAL", &journal)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Kill::At(point, skip) = kill {
        cmd.env("BIOSEAL_FAILPOINT", point)
            .env("BIOSEAL_FAILPOINT_SKIP", skip.to_string());
    }
    let mut child = cmd.spawn().expect("spawn worker");
    let status = match kill {
        Kill::After(d) => {
            std::thread::sleep(d);
            child.kill().expect("SIGKILL");
            child.wait().expect("wait")
        }
        Kill::At(point, _) => {
            let started = Instant::now();
            loop {
                if let Some(s) = child.try_wait().expect("wait") {
                    break s;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "worker never reached {point}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    assert!(
        !status.success(),
        "the worker must have been killed: {status:?}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        let want = match kill {
            Kill::After(_) => 9, // SIGKILL
            Kill::At(..) => 6,   // SIGABRT from the failpoint
        };
        assert_eq!(status.signal(), Some(want), "{status:?}");
    }

    // What the child acknowledged (a torn last line was never acknowledged).
    let text = std::fs::read_to_string(&journal).unwrap_or_default();
    let mut enrolled = std::collections::BTreeSet::new();
    let mut revoked = std::collections::BTreeSet::new();
    // Only complete lines count: the kill can land inside a write.
    for line in text
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
    {
        match line.split_once(' ').map(|(op, n)| (op, n.parse::<u64>())) {
            Some(("E", Ok(n))) => {
                enrolled.insert(n);
            }
            Some(("R", Ok(n))) => {
                revoked.insert(n);
            }
            _ => panic!("malformed complete journal line {line:?}"),
        }
    }

    let store = Store::open(config(&dir)).expect("a killed store must open cleanly");
    // No rotation left half done: every bucket has exactly one live slot.
    let ring = std::fs::read(dir.join("keys").join("bioseal.keyring")).expect("keyring");
    for b in 0..BUCKETS as usize {
        let live = (0..2)
            .filter(|s| {
                let off = 1024 + (2 * b + s) * 128;
                ring[off..off + 128].iter().any(|&x| x != 0)
            })
            .count();
        assert_eq!(live, 1, "bucket {b} has {live} live slots after recovery");
    }
    // The worker revokes s(i-2) right after journaling "E i" for i % 3 == 2:
    // if that revoke was not journaled it may or may not have happened.
    let in_flight = enrolled
        .iter()
        .next_back()
        .filter(|&&i| i % 3 == 2 && !revoked.contains(&(i - 2)))
        .map(|&i| i - 2);
    for &i in &enrolled {
        let r = store.verify(&format!("s{i}"), &IDV, emb(&vector(i)));
        let ctx = || format!("s{i}; journal ends {:?}", text.lines().last());
        if revoked.contains(&i) {
            assert!(
                matches!(r, Err(Error::NotEnrolled)),
                "revoked {} is back: {r:?}",
                ctx()
            );
        } else if Some(i) == in_flight {
            // Where the crash point fixes the outcome, require it.
            let ok = match kill {
                Kill::At("rotation:new-slot-synced", _) => matches!(r, Ok(Decision::Match)),
                Kill::At("rotation:batch-flushed", _) => matches!(r, Err(Error::NotEnrolled)),
                _ => matches!(r, Ok(Decision::Match) | Err(Error::NotEnrolled)),
            };
            assert!(ok, "in-flight revoke of {}: {r:?}", ctx());
        } else {
            assert!(
                matches!(r, Ok(Decision::Match)),
                "acknowledged enrollment {}: {r:?}",
                ctx()
            );
        }
    }
    store
        .audit()
        .verify_chain()
        .expect("audit chain after a crash");
    enrolled.len() + revoked.len()
}

#[test]
fn sigkill_at_random_moments() {
    let mut rng = Rng(2024);
    let mut acked = Vec::new();
    for _ in 0..24 {
        let ms = 20 + rng.next_u64() % 600;
        acked.push(round(Kill::After(Duration::from_millis(ms))));
    }
    eprintln!("acknowledged operations per round: {acked:?}");
    assert!(
        acked.iter().filter(|&&n| n > 10).count() >= 12,
        "most rounds must get past start-up: {acked:?}"
    );
}

#[test]
fn abort_inside_rotations() {
    for point in [
        "rotation:new-slot-synced",
        "rotation:batch-applied",
        "rotation:batch-flushed",
    ] {
        for skip in [0, 3, 11] {
            // The (skip+1)-th rotation is the revoke after enrollment 3*skip+2.
            let acked = round(Kill::At(point, skip));
            assert_eq!(
                acked as u64,
                3 * skip + 3 + skip,
                "{point}/{skip}: acknowledged operations"
            );
        }
    }
}
