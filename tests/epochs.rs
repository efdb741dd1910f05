//! Key epochs (issue 13): rolling the epoch re-seals the keyring under a
//! new root key and destroys the old one; a kill at any named point of the
//! roll leaves exactly one usable epoch and the keyring intact; receipts
//! state the bound for backups; sweep rolls a due epoch.

mod common;
use bioseal::{
    AuditEvent, Clock, Decision, Error, FileEpochProvider, KeyProvider, ManualClock, RootKey,
    Store, StoreConfig, Threshold, Timestamp,
};
use common::{consent, emb, Rng, IDV};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DIM: usize = 16;
const T0: u64 = 1_900_000_000;

fn epochs_file(dir: &Path) -> std::path::PathBuf {
    dir.join("keys").join("bioseal.epochs")
}

/// Where the epoch keys are: a file in the key directory, or SoftHSM2.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prov {
    File,
    Hsm,
}

fn provider(dir: &Path, prov: Prov) -> Box<dyn KeyProvider> {
    std::fs::create_dir_all(dir.join("keys")).expect("key dir");
    match prov {
        Prov::File => Box::new(FileEpochProvider::open(epochs_file(dir)).expect("epoch file")),
        // One label prefix per test directory.
        Prov::Hsm => Box::new(common::hsm::provider(
            &dir.file_name().expect("name").to_string_lossy(),
        )),
    }
}

fn config(dir: &Path, clock: &ManualClock) -> StoreConfig {
    config_p(dir, clock, Prov::File)
}

fn config_p(dir: &Path, clock: &ManualClock, prov: Prov) -> StoreConfig {
    // Shared mode when the test wrote a database URL into the directory.
    let data = std::fs::read_to_string(dir.join("url")).map_or(dir.join("data"), Into::into);
    StoreConfig::new(data, provider(dir, prov))
        .key_dir(dir.join("keys"))
        .model("epoch-test", DIM)
        .threshold(Threshold::cosine(0.5))
        .buckets(4)
        .epoch_length(Duration::from_secs(7 * 86_400))
        .clock(clock.clone())
}

fn vector(i: u64) -> Vec<f32> {
    Rng(7_000 + i).unit(DIM)
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_unix_secs(T0))
}

fn enroll_some(store: &Store, n: u64, clock: &ManualClock) {
    for i in 0..n {
        store
            .enroll(&format!("s{i}"), emb(&vector(i)), consent(clock.now(), 365))
            .expect("enroll");
    }
}

fn live_epochs(dir: &Path) -> Vec<u64> {
    live_epochs_p(dir, Prov::File)
}

fn live_epochs_p(dir: &Path, prov: Prov) -> Vec<u64> {
    provider(dir, prov).live_epochs().expect("live")
}

fn key_dir_bytes(dir: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir.join("keys")).expect("keys") {
        all.extend(std::fs::read(e.expect("entry").path()).expect("read"));
    }
    all
}

#[test]
fn roll_reseals_destroys_the_old_epoch_and_keeps_every_subject() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(config(tmp.path(), &clock)).expect("open");
    enroll_some(&store, 6, &clock);
    let st = store.epoch_status().expect("status");
    assert_eq!(st.epoch, 1);
    assert_eq!(st.started, Timestamp::from_unix_secs(T0));
    assert_eq!(st.destruction_delay, Some(Duration::ZERO));
    let receipt = store.revoke("s0").expect("revoke");
    assert_eq!(
        receipt.backups_inert_by,
        Some(Timestamp::from_unix_secs(T0 + 7 * 86_400)),
        "epoch end + the file provider's delay (none)"
    );
    assert_eq!(store.epoch_status().expect("status").ledger_entries, 1);
    // Epoch 1's record is the file's first: its key at 64 + 16.
    let file = std::fs::read(epochs_file(tmp.path())).expect("epoch file");
    let old_key: [u8; 32] = file[80..112].try_into().expect("key bytes");
    assert_ne!(old_key, [0u8; 32]);
    assert!(common::contains(&key_dir_bytes(tmp.path()), &old_key));

    clock.advance(Duration::from_secs(3600));
    let st = store.roll_epoch().expect("roll");
    assert_eq!(st.epoch, 2);
    assert_eq!(st.started, Timestamp::from_unix_secs(T0 + 3600));
    assert_eq!(st.ledger_entries, 0, "a roll empties the ledger");
    assert_eq!(live_epochs(tmp.path()), vec![2]);
    assert!(
        !common::contains(&key_dir_bytes(tmp.path()), &old_key),
        "the old epoch's key is overwritten in the epoch file"
    );
    for i in 1..6 {
        assert_eq!(
            store
                .verify(&format!("s{i}"), &IDV, emb(&vector(i)))
                .expect("verify"),
            Decision::Match
        );
    }
    assert!(matches!(
        store.verify("s0", &IDV, emb(&vector(0))),
        Err(Error::NotEnrolled)
    ));
    // Rotations and state writes after the roll go to the new image.
    store.revoke("s1").expect("revoke after roll");
    drop(store);
    let store = Store::open(config(tmp.path(), &clock)).expect("reopen");
    assert_eq!(store.epoch_status().expect("status").epoch, 2);
    assert_eq!(store.epoch_status().expect("status").ledger_entries, 1);
    assert_eq!(
        store.verify("s2", &IDV, emb(&vector(2))).expect("verify"),
        Decision::Match
    );
    let rolled = store
        .audit()
        .entries()
        .expect("entries")
        .into_iter()
        .filter(|e| e.event == AuditEvent::EpochRolled)
        .count();
    assert_eq!(rolled, 1);
    store.audit().verify_chain().expect("chain");
}

#[test]
fn a_fixed_root_key_cannot_roll_and_says_backups_never_become_inert() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(
        StoreConfig::new(tmp.path().join("data"), RootKey::from_bytes([3; 32]))
            .key_dir(tmp.path().join("keys"))
            .model("epoch-test", DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(4)
            .epoch_length(Duration::from_secs(86_400))
            .clock(clock.clone()),
    )
    .expect("open");
    enroll_some(&store, 2, &clock);
    let r = store.revoke("s0").expect("revoke");
    assert_eq!(r.backups_inert_by, None);
    assert!(matches!(store.roll_epoch(), Err(Error::KeyProvider(_))));
    let st = store.epoch_status().expect("status");
    assert_eq!((st.epoch, st.destruction_delay), (0, None));
    clock.advance(Duration::from_secs(2 * 86_400));
    assert_eq!(store.sweep().expect("sweep").epoch_rolled, None, "cannot");
}

#[test]
fn sweep_rolls_a_due_epoch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(config(tmp.path(), &clock)).expect("open");
    enroll_some(&store, 3, &clock);
    clock.advance(Duration::from_secs(6 * 86_400));
    assert_eq!(store.sweep().expect("sweep").epoch_rolled, None, "not due");
    clock.advance(Duration::from_secs(86_400));
    assert_eq!(store.sweep().expect("sweep").epoch_rolled, Some(2));
    assert_eq!(live_epochs(tmp.path()), vec![2]);
    assert_eq!(
        store.verify("s1", &IDV, emb(&vector(1))).expect("verify"),
        Decision::Match
    );
}

/// A store created with a fixed root key moves to epoch keys: the key is
/// imported as epoch 0, the store opens with the epoch file, and a roll
/// destroys it there (the old key no longer opens the store).
#[test]
fn a_fixed_root_key_store_moves_to_epoch_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let fixed = || {
        StoreConfig::new(tmp.path().join("data"), RootKey::from_bytes([8; 32]))
            .key_dir(tmp.path().join("keys"))
            .model("epoch-test", DIM)
            .clock(clock.clone())
    };
    let store = Store::open(fixed().threshold(Threshold::cosine(0.5)).buckets(4)).expect("open");
    enroll_some(&store, 3, &clock);
    drop(store);
    // Not yet imported: a typed error that says what to do.
    let r = Store::open(config(tmp.path(), &clock));
    assert!(
        matches!(r, Err(Error::KeyUnavailable { .. })),
        "{:?}",
        r.err()
    );
    let p = FileEpochProvider::open(epochs_file(tmp.path())).expect("epoch file");
    p.import_fixed_key(&RootKey::from_bytes([8; 32]))
        .expect("import");
    assert!(
        p.import_fixed_key(&RootKey::from_bytes([8; 32])).is_err(),
        "only once"
    );
    let store = Store::open(config(tmp.path(), &clock)).expect("open with the epoch file");
    assert_eq!(store.epoch_status().expect("status").epoch, 0);
    assert_eq!(store.roll_epoch().expect("roll").epoch, 1);
    assert_eq!(
        store.verify("s2", &IDV, emb(&vector(2))).expect("verify"),
        Decision::Match
    );
    drop(store);
    assert_eq!(live_epochs(tmp.path()), vec![1]);
    assert!(
        Store::open(fixed()).is_err(),
        "the old root key no longer opens it"
    );
}

/// A copy of the key directory and the data put back together (the one
/// rollback the high-water mark cannot see) is refused once the epoch it
/// was sealed under has rolled: the copy's keyring names a destroyed
/// epoch. The epoch file itself is the provider's, not part of the copy.
#[test]
fn key_directory_and_data_rolled_back_across_an_epoch_do_not_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(config(tmp.path(), &clock)).expect("open");
    enroll_some(&store, 4, &clock);
    drop(store);
    let copy = tempfile::tempdir().expect("tempdir");
    common::copy_dir(&tmp.path().join("data"), &copy.path().join("data"));
    std::fs::copy(
        tmp.path().join("keys").join("bioseal.keyring"),
        copy.path().join("bioseal.keyring"),
    )
    .expect("copy keyring");
    let store = Store::open(config(tmp.path(), &clock)).expect("open");
    store.revoke("s0").expect("revoke");
    store.roll_epoch().expect("roll");
    drop(store);
    std::fs::remove_dir_all(tmp.path().join("data")).expect("rm");
    common::copy_dir(&copy.path().join("data"), &tmp.path().join("data"));
    std::fs::copy(
        copy.path().join("bioseal.keyring"),
        tmp.path().join("keys").join("bioseal.keyring"),
    )
    .expect("put back");
    let r = Store::open(config(tmp.path(), &clock));
    assert!(
        matches!(r, Err(Error::EpochDestroyed { epoch: 1 })),
        "{:?}",
        r.err()
    );
}

/// One process owns an embedded store: a second open is refused on the
/// key directory's lock, before it reads the keyring (so no open settles
/// epochs under a roll in progress).
#[test]
fn a_second_open_of_an_embedded_store_is_refused_on_the_key_directory_lock() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(config(tmp.path(), &clock)).expect("open");
    let r = Store::open(config(tmp.path(), &clock));
    assert!(
        matches!(&r, Err(Error::Storage(m)) if m.contains("locked")),
        "{:?}",
        r.err()
    );
    drop(store);
    Store::open(config(tmp.path(), &clock)).expect("open again once closed");
}

/// The worker: open the store, enroll, roll the epoch (aborting at the
/// named point given in `BIOSEAL_FAILPOINT`).
#[test]
#[ignore = "worker process of the epoch crash tests; started by them"]
fn epoch_worker() {
    let Ok(dir) = std::env::var("BIOSEAL_EPOCH_DIR") else {
        return;
    };
    let prov = if std::env::var("BIOSEAL_EPOCH_PROVIDER").is_ok_and(|p| p == "hsm") {
        Prov::Hsm
    } else {
        Prov::File
    };
    let clock = clock();
    let store = Store::open(config_p(Path::new(&dir), &clock, prov)).expect("worker open");
    enroll_some(&store, 5, &clock);
    store.revoke("s0").expect("revoke");
    store.roll_epoch().expect("roll");
}

const POINTS: &[&str] = &[
    "epoch:start",
    "epoch:created",
    "keyring:next-synced",
    "keyring:renamed",
    "epoch:resealed",
    "epoch:destroyed",
];

fn run_worker(dir: &Path, point: &str, prov: Prov) {
    if prov == Prov::Hsm {
        // The token exists before the worker starts; it inherits it.
        let _ = common::hsm::token_dir();
    }
    let status = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "epoch_worker", "--ignored", "--nocapture"])
        .env("BIOSEAL_EPOCH_DIR", dir)
        .env(
            "BIOSEAL_EPOCH_PROVIDER",
            if prov == Prov::Hsm { "hsm" } else { "file" },
        )
        .env("BIOSEAL_FAILPOINT", point)
        .status()
        .expect("worker");
    assert!(!status.success(), "{point}: the worker must abort there");
}

/// After a kill: the store opens, exactly one epoch is live and it is the
/// keyring's, every live subject verifies, the revoked one does not.
fn check_after_kill(dir: &Path, point: &str, prov: Prov) -> u64 {
    let clock = clock();
    let store = Store::open(config_p(dir, &clock, prov)).unwrap_or_else(|e| panic!("{point}: {e}"));
    let epoch = store.epoch_status().expect("status").epoch;
    assert_eq!(
        live_epochs_p(dir, prov),
        vec![epoch],
        "{point}: one usable epoch"
    );
    for i in 1..5 {
        assert_eq!(
            store
                .verify(&format!("s{i}"), &IDV, emb(&vector(i)))
                .expect("verify"),
            Decision::Match,
            "{point}: s{i}"
        );
    }
    assert!(matches!(
        store.verify("s0", &IDV, emb(&vector(0))),
        Err(Error::NotEnrolled)
    ));
    assert!(!dir.join("keys").join("bioseal.next").exists());
    store.revoke("s1").expect("revoke after recovery");
    store.audit().verify_chain().expect("chain");
    // And the epoch rolls on from there.
    let next = store.roll_epoch().expect("roll after recovery").epoch;
    assert!(next > epoch);
    drop(store);
    assert_eq!(live_epochs_p(dir, prov), vec![next]);
    epoch
}

fn kill_at_every_point(prov: Prov) {
    for point in POINTS {
        let tmp = tempfile::tempdir().expect("tempdir");
        run_worker(tmp.path(), point, prov);
        let epoch = check_after_kill(tmp.path(), point, prov);
        // Before the re-sealed keyring reached the disk the roll is undone;
        // from then on it is finished.
        let finished = !matches!(*point, "epoch:start" | "epoch:created");
        assert_eq!(epoch, if finished { 2 } else { 1 }, "{point}");
    }
}

#[test]
fn a_kill_at_any_point_of_a_roll_leaves_exactly_one_usable_epoch() {
    kill_at_every_point(Prov::File);
}

/// Shared mode: the keyring rows are replaced in one statement, committed
/// before the old key is destroyed; a kill at each point leaves one
/// usable epoch (the next open settles the other).
#[test]
fn a_kill_at_any_point_of_a_shared_roll_leaves_exactly_one_usable_epoch() {
    if common::pg::skipped("a_kill_at_any_point_of_a_shared_roll") {
        return;
    }
    for point in [
        "epoch:start",
        "epoch:created",
        "epoch:resealed",
        "epoch:destroyed",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("url"), common::pg::fresh_database()).expect("url");
        run_worker(tmp.path(), point, Prov::File);
        let epoch = check_after_kill(tmp.path(), point, Prov::File);
        let finished = !matches!(point, "epoch:start" | "epoch:created");
        assert_eq!(epoch, if finished { 2 } else { 1 }, "{point}");
    }
}

#[test]
fn a_kill_at_any_point_of_a_roll_on_an_hsm_leaves_exactly_one_usable_epoch() {
    if common::hsm::skipped("a_kill_at_any_point_of_a_roll_on_an_hsm") {
        return;
    }
    let _token = common::hsm::exclusive();
    kill_at_every_point(Prov::Hsm);
}

#[test]
fn an_hsm_epoch_key_never_leaves_the_token_and_a_destroyed_one_is_gone() {
    if common::hsm::skipped("an_hsm_epoch_key_never_leaves_the_token") {
        return;
    }
    let _token = common::hsm::exclusive();
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = clock();
    let store = Store::open(config_p(tmp.path(), &clock, Prov::Hsm)).expect("open");
    enroll_some(&store, 4, &clock);
    let st = store.epoch_status().expect("status");
    assert_eq!((st.epoch, st.destruction_delay), (1, Some(Duration::ZERO)));
    // No 32-byte window of any file — the key directory, the data, the
    // token's own files — opens the keyring as its epoch root key: the key
    // stays in the token (the store opened, so the token's key does).
    let keyring_1 =
        std::fs::read(tmp.path().join("keys").join("bioseal.keyring")).expect("keyring");
    let mut files = common::read_all_files(&tmp.path().join("keys"));
    files.extend(common::read_all_files(&tmp.path().join("data")));
    files.extend(common::read_all_files(&common::hsm::token_dir()));
    assert!(files
        .iter()
        .any(|(p, _)| p.to_string_lossy().contains("tokens")));
    let mut windows = std::collections::HashSet::new();
    for (_, d) in &files {
        for w in d.windows(32) {
            windows.insert(<[u8; 32]>::try_from(w).expect("32"));
        }
    }
    assert!(windows.len() > 1000);
    assert!(windows
        .iter()
        .all(|w| bioseal::forensics::keyring_keks(&keyring_1, w).is_none()));
    assert_eq!(store.roll_epoch().expect("roll").epoch, 2);
    let p = provider(tmp.path(), Prov::Hsm);
    assert!(matches!(
        p.epoch_key(1),
        Err(Error::EpochDestroyed { epoch: 1 })
    ));
    assert_eq!(p.live_epochs().expect("live"), vec![2]);
    assert!(matches!(p.epoch_key(9), Err(Error::KeyUnavailable { .. })));
    for i in 0..4 {
        assert_eq!(
            store
                .verify(&format!("s{i}"), &IDV, emb(&vector(i)))
                .expect("verify"),
            Decision::Match
        );
    }
}

#[test]
fn a_torn_new_keyring_is_discarded_and_the_new_epoch_destroyed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    run_worker(tmp.path(), "keyring:next-synced", Prov::File);
    let next = tmp.path().join("keys").join("bioseal.next");
    let bytes = std::fs::read(&next).expect("next image");
    // A power cut that kept only part of it.
    std::fs::write(&next, &bytes[..bytes.len() / 2]).expect("tear");
    assert_eq!(live_epochs(tmp.path()), vec![1, 2]);
    assert_eq!(check_after_kill(tmp.path(), "torn next", Prov::File), 1);
}
