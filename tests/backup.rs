//! Backups and restores that never resurrect (issue 13): a backup taken
//! before a revocation and restored after it leaves the revoked subject
//! `NotEnrolled` and every other subject matching; a backup of a destroyed
//! epoch is `EpochDestroyed`; a restore killed midway gives a typed error
//! on reopen or a completed restore; and after the epoch rolls, no byte
//! string in the backup, the key directory or the provider's file opens
//! the revoked subject.

mod common;
use bioseal::forensics::{backup_subject_records, keyring_keks};
use bioseal::{
    Decision, Error, FileEpochProvider, ManualClock, Purpose, Store, StoreConfig, Threshold,
    Timestamp,
};
use common::{consent, contains, emb, read_all_files, Kind, Rng, IDV};
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

const DIM: usize = 16;
const T0: u64 = 1_900_000_000;
const N: u64 = 12;

fn config_at(dir: &Path, data: &Path) -> StoreConfig {
    std::fs::create_dir_all(dir.join("keys")).expect("key dir");
    let provider =
        FileEpochProvider::open(dir.join("keys").join("bioseal.epochs")).expect("epochs");
    StoreConfig::new(data, provider)
        .key_dir(dir.join("keys"))
        .model("backup-test", DIM)
        .threshold(Threshold::cosine(0.5))
        .buckets(4)
        .clock(ManualClock::new(Timestamp::from_unix_secs(T0)))
}

fn config(dir: &Path) -> StoreConfig {
    config_at(dir, &dir.join("data"))
}

/// Where a test's data lives: `dir/data`, or a fresh database (whose URL
/// is written to `dir/url`, so that a worker process finds it).
fn location(k: Kind, dir: &Path) -> std::path::PathBuf {
    match k {
        Kind::Sled => dir.join("data"),
        Kind::Postgres => {
            let url = common::pg::fresh_database();
            std::fs::write(dir.join("url"), &url).expect("write url");
            std::path::PathBuf::from(url)
        }
    }
}

/// The disaster: the data is lost, the keyring (key directory, or the
/// keyring rows) survives.
fn lose_data(k: Kind, data: &Path) {
    match k {
        Kind::Sled => std::fs::remove_dir_all(data).expect("lose the data"),
        Kind::Postgres => {
            let mut c = common::pg::client(&data.to_string_lossy());
            c.batch_execute(
                "DELETE FROM bioseal.records; DELETE FROM bioseal.keys; \
                 DELETE FROM bioseal.meta; DELETE FROM bioseal.audit;",
            )
            .expect("lose the data");
        }
    }
}

fn vector(i: u64) -> Vec<f32> {
    Rng(9_000 + i).unit(DIM)
}

/// Subject ids long enough that finding one by chance in ciphertext is
/// out of the question.
fn name(i: u64) -> String {
    format!("subject-number-{i:04}")
}

fn now() -> Timestamp {
    Timestamp::from_unix_secs(T0)
}

/// Enroll s0..s{N-1}, back up to `dir/backup`; then revoke s3, withdraw
/// s5's last purpose, renew s7's consent and enroll s{N} (after the backup).
fn populate_backup_and_change(dir: &Path, data: &Path) {
    let store = Store::open(config_at(dir, data)).expect("open");
    for i in 0..N {
        store
            .enroll(&name(i), emb(&vector(i)), consent(now(), 365))
            .expect("enroll");
    }
    let info = store.backup(dir.join("backup")).expect("backup");
    assert_eq!(info.epoch, 1);
    assert!(info.rows > N);
    store.revoke(&name(3)).expect("revoke");
    store
        .withdraw_purpose(&name(5), &IDV)
        .expect("withdraw last purpose");
    store
        .renew_consent(&name(7), consent(now(), 200))
        .expect("renew");
    store
        .enroll(&name(N), emb(&vector(N)), consent(now(), 365))
        .expect("enroll after backup");
}

/// What a restored store must show: the backup's subjects, minus every
/// subject destroyed or whose consent changed since.
fn check_restored(store: &Store) {
    for i in 0..=N {
        let r = store.verify(&name(i), &IDV, emb(&vector(i)));
        match i {
            // Revoked, withdrew its last purpose, consent changed, enrolled
            // after the backup.
            3 | 5 | 7 | N => assert!(matches!(r, Err(Error::NotEnrolled)), "s{i}: {r:?}"),
            _ => assert_eq!(r.expect("verify"), Decision::Match, "s{i}"),
        }
    }
    store.audit().verify_chain().expect("chain");
}

fn a_backup_before_a_revocation_restored_after_it_does_not_resurrect(k: Kind) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = location(k, tmp.path());
    let config = |_: &Path| config_at(tmp.path(), &data);
    populate_backup_and_change(tmp.path(), &data);
    // The data is lost; the key directory (keyring, ledger, epoch file) or
    // the keyring rows survive.
    lose_data(k, &data);
    let (store, report) =
        Store::restore(tmp.path().join("backup"), config(tmp.path())).expect("restore");
    assert_eq!(report.replayed, 3, "s3 revoked, s5 withdrawn, s7 renewed");
    assert!(report.rows > N);
    // Before any verify (a refused verify rotates its bucket too): the
    // buckets the replay touched were re-rotated: the restored keyring
    // (opened with every window of the key directory, the epoch key among
    // them) holds no KEK that opens the revoked subject's record in the
    // backup, while it does open the others'.
    store.backup(tmp.path().join("today")).expect("backup");
    let keyring = std::fs::read(tmp.path().join("today").join("keyring")).expect("keyring");
    let keys = windows(
        &read_all_files(&tmp.path().join("keys"))
            .into_iter()
            .map(|(_, b)| b)
            .collect::<Vec<_>>(),
    );
    // Today's records, through the backup of the restored store (the same
    // rows on either backend).
    drop(store);
    let restored = backup_subject_records(tmp.path().join("today")).expect("records");
    assert_eq!(restored.len(), N as usize - 3);
    assert!(
        restored.iter().all(|r| opens(r, &keyring, &keys)),
        "control: the restored subjects open"
    );
    let here: HashSet<[u8; 32]> = restored.iter().map(|r| r.pseudonym).collect();
    let gone: Vec<_> = backup_subject_records(tmp.path().join("backup"))
        .expect("records")
        .into_iter()
        .filter(|r| !here.contains(&r.pseudonym))
        .collect();
    assert_eq!(gone.len(), 3);
    assert!(
        gone.iter().all(|r| !opens(r, &keyring, &keys)),
        "a replayed subject's record in the backup opens with the restored keys"
    );
    let store = Store::open(config(tmp.path())).expect("reopen");
    check_restored(&store);
    // The restored store carries on: new enrollments, a reopen.
    store
        .enroll("after", emb(&vector(50)), consent(now(), 30))
        .expect("enroll");
    drop(store);
    let store = Store::open(config(tmp.path())).expect("reopen");
    check_restored(&store);
    assert_eq!(
        store
            .verify("after", &IDV, emb(&vector(50)))
            .expect("verify"),
        Decision::Match
    );
    let restored = store
        .audit()
        .entries()
        .expect("entries")
        .into_iter()
        .filter(|e| e.event == bioseal::AuditEvent::Restored)
        .count();
    assert_eq!(restored, 1);
}

#[test]
fn restore_refuses_what_it_cannot_do_safely() {
    let tmp = tempfile::tempdir().expect("tempdir");
    populate_backup_and_change(tmp.path(), &tmp.path().join("data"));
    // Not into a location that holds data.
    let r = Store::restore(tmp.path().join("backup"), config(tmp.path()));
    assert!(matches!(r, Err(Error::Config(_))), "{:?}", r.err());
    // Not without the live keyring (its ledger).
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let r = Store::restore(tmp.path().join("backup"), config(elsewhere.path()));
    assert!(
        matches!(r, Err(Error::KeyUnavailable { .. })),
        "{:?}",
        r.err()
    );
    // Not a tampered backup.
    let fresh = tmp.path().join("fresh");
    let manifest = tmp.path().join("backup").join("manifest");
    let good = std::fs::read(&manifest).expect("manifest");
    for i in [30, 40, good.len() - 1] {
        let mut bad = good.clone();
        bad[i] ^= 1;
        std::fs::write(&manifest, &bad).expect("write");
        let r = Store::restore(tmp.path().join("backup"), config_at(tmp.path(), &fresh));
        assert!(
            matches!(
                r,
                Err(Error::Tampered { .. } | Error::EpochDestroyed { .. })
            ),
            "manifest byte {i}: {:?}",
            r.err()
        );
    }
    std::fs::write(&manifest, &good).expect("write");
    let data = tmp.path().join("backup").join("data");
    let good_data = std::fs::read(&data).expect("data");
    let mut bad = good_data.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&data, &bad).expect("write");
    let r = Store::restore(tmp.path().join("backup"), config_at(tmp.path(), &fresh));
    assert!(matches!(r, Err(Error::Tampered { .. })), "{:?}", r.err());
    std::fs::write(&data, &good_data).expect("write");
    // The live store is untouched by the refusals.
    let store = Store::open(config(tmp.path())).expect("open");
    assert_eq!(
        store
            .verify(&name(1), &IDV, emb(&vector(1)))
            .expect("verify"),
        Decision::Match
    );
    // After the epoch rolls, the backup is inert.
    store.roll_epoch().expect("roll");
    drop(store);
    std::fs::remove_dir_all(tmp.path().join("data")).expect("lose the data");
    let r = Store::restore(tmp.path().join("backup"), config(tmp.path()));
    assert!(
        matches!(r, Err(Error::EpochDestroyed { epoch: 1 })),
        "{:?}",
        r.err()
    );
}

/// A backup is online: verifies on other threads wait while it copies,
/// none fails, and every one answers right.
#[test]
fn a_backup_runs_while_other_threads_verify() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(tmp.path())).expect("open");
    for i in 0..N {
        store
            .enroll(&name(i), emb(&vector(i)), consent(now(), 365))
            .expect("enroll");
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done, backups) = std::thread::scope(|sc| {
        let verifier = sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = n % N;
                let d = store
                    .verify(&name(i), &IDV, emb(&vector(i)))
                    .expect("verify");
                assert_eq!(d, Decision::Match);
                n += 1;
            }
            n
        });
        let mut backups = 0;
        for b in 0..5 {
            let info = store
                .backup(tmp.path().join(format!("b{b}")))
                .expect("backup");
            assert!(info.rows > N);
            backups += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (verifier.join().expect("verifier"), backups)
    });
    assert_eq!(backups, 5);
    assert!(done > 0, "the verifier ran");
}

/// The worker: restore `dir/backup` into `dir/data`, aborting at the named
/// point in `BIOSEAL_FAILPOINT`.
#[test]
#[ignore = "worker process of the restore crash test; started by it"]
fn restore_worker() {
    let Ok(dir) = std::env::var("BIOSEAL_RESTORE_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let data = std::fs::read_to_string(dir.join("url")).map_or(dir.join("data"), Into::into);
    Store::restore(dir.join("backup"), config_at(dir, &data)).expect("restore");
}

fn a_restore_killed_midway_is_finished_or_refused_never_resurrecting(k: Kind) {
    let points: &[&str] = match k {
        Kind::Sled => &[
            "restore:data-written",
            "keyring:next-synced",
            "keyring:renamed",
            "rotation:new-slot-synced",
            "restore:replayed-group",
        ],
        // The keyring rows are replaced by one statement.
        Kind::Postgres => &[
            "restore:data-written",
            "rotation:new-slot-synced",
            "restore:replayed-group",
        ],
    };
    for &point in points {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = location(k, tmp.path());
        let config = |_: &Path| config_at(tmp.path(), &data);
        populate_backup_and_change(tmp.path(), &data);
        lose_data(k, &data);
        let status = Command::new(std::env::current_exe().expect("exe"))
            .args(["--exact", "restore_worker", "--ignored", "--nocapture"])
            .env("BIOSEAL_RESTORE_DIR", tmp.path())
            .env("BIOSEAL_FAILPOINT", point)
            .status()
            .expect("worker");
        assert!(!status.success(), "{point}: the worker must abort there");
        match Store::open(config(tmp.path())) {
            Ok(store) => check_restored(&store),
            // The data was written but not the keyring: the live keyring's
            // mark is ahead of the restored data.
            Err(Error::RolledBack { .. }) => {
                assert_eq!(point, "restore:data-written");
                // The operator restores again, into an empty location.
                lose_data(k, &data);
                let (store, _) = Store::restore(tmp.path().join("backup"), config(tmp.path()))
                    .expect("restore again");
                check_restored(&store);
            }
            Err(e) => panic!("{point}: {e}"),
        }
    }
}

/// Every distinct 32-byte window of the given bytes.
fn windows(blobs: &[Vec<u8>]) -> HashSet<[u8; 32]> {
    let mut out = HashSet::new();
    for b in blobs {
        for w in b.windows(32) {
            out.insert(w.try_into().expect("32 bytes"));
        }
    }
    out
}

/// Whether any window, as a key or as an epoch root key of `keyring`,
/// opens `rec`.
fn opens(
    rec: &bioseal::forensics::RawSubjectRecord,
    keyring: &[u8],
    keys: &HashSet<[u8; 32]>,
) -> bool {
    keys.iter().any(|k| {
        rec.wrapped_dek.opens_with(k)
            || rec.payload.opens_with(k)
            || keyring_keks(keyring, k)
                .is_some_and(|keks| keks.iter().any(|kek| rec.wrapped_dek.opens_with(kek)))
    })
}

fn after_the_epoch_rolls_nothing_held_today_opens_a_backed_up_revoked_subject(k: Kind) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = location(k, tmp.path());
    let config = |_: &Path| config_at(tmp.path(), &data);
    let store = Store::open(config(tmp.path())).expect("open");
    for i in 0..N {
        store
            .enroll(&name(i), emb(&vector(i)), consent(now(), 365))
            .expect("enroll");
    }
    store.backup(tmp.path().join("backup")).expect("backup");
    let victim_p = {
        let recs = backup_subject_records(tmp.path().join("backup")).expect("records");
        assert_eq!(recs.len(), N as usize);
        recs
    };
    let receipt = store.revoke(&name(3)).expect("revoke");
    assert!(receipt.backups_inert_by.is_some());
    let today = || {
        let mut blobs: Vec<Vec<u8>> = read_all_files(&tmp.path().join("keys"))
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        blobs.extend(
            read_all_files(&tmp.path().join("backup"))
                .into_iter()
                .map(|(_, b)| b),
        );
        blobs
    };
    let backup_keyring = std::fs::read(tmp.path().join("backup").join("keyring")).expect("keyring");
    // Which of the backup's records is the victim's: the one no longer in
    // today's data (read through a backup of it: the same rows on either
    // backend).
    store.backup(tmp.path().join("live1")).expect("backup");
    drop(store);
    let live: HashSet<[u8; 32]> = backup_subject_records(tmp.path().join("live1"))
        .expect("live records")
        .into_iter()
        .map(|r| r.pseudonym)
        .collect();
    let gone: Vec<_> = victim_p
        .iter()
        .filter(|r| !live.contains(&r.pseudonym))
        .collect();
    assert_eq!(gone.len(), 1);
    let victim = gone[0];
    let other = victim_p
        .iter()
        .find(|r| live.contains(&r.pseudonym))
        .expect("a live subject");

    // Positive control, before the roll: the backup plus the key directory
    // (the epoch file holds the live epoch's key) opens the victim.
    let before = windows(&today());
    assert!(
        opens(victim, &backup_keyring, &before),
        "control: before the roll the backup opens the revoked subject"
    );

    let store = Store::open(config(tmp.path())).expect("open");
    store.roll_epoch().expect("roll");
    store.backup(tmp.path().join("live2")).expect("backup");
    drop(store);
    let blobs = today();
    let scanned: usize = blobs.iter().map(Vec::len).sum();
    let after = windows(&blobs);
    assert!(
        !opens(victim, &backup_keyring, &after),
        "after the roll nothing held today opens the revoked subject from the backup"
    );
    // Positive control, after the roll: a live subject opens the same way
    // from today's data and keyring.
    let live_keyring = std::fs::read(tmp.path().join("live2").join("keyring")).expect("keyring");
    let live_rec = backup_subject_records(tmp.path().join("live2"))
        .expect("records")
        .into_iter()
        .find(|r| r.pseudonym == other.pseudonym)
        .expect("live record");
    assert!(
        opens(&live_rec, &live_keyring, &after),
        "control: today's keys open a live subject"
    );
    // And no plaintext anywhere.
    for (path, data) in read_all_files(&tmp.path().join("backup")) {
        assert!(
            !contains(&data, name(3).as_bytes()),
            "subject id in {}",
            path.display()
        );
        assert!(
            !contains(&data, Purpose::IDENTITY_VERIFICATION.as_str().as_bytes()),
            "purpose in {}",
            path.display()
        );
    }
    eprintln!(
        "backup forensic scan: {scanned} bytes, {} distinct windows tried as keys and as epoch root keys",
        after.len()
    );
}

/// The same with the epoch keys in SoftHSM2: before the roll the token's
/// key opens the backup's keyring and the revoked subject; after it the
/// token answers `EpochDestroyed`, and no window of the key directory, the
/// backup or the token's own files opens anything; today's keyring still
/// opens through the token (positive control).
#[test]
fn after_an_hsm_epoch_roll_the_backup_is_inert_token_files_included() {
    if common::hsm::skipped("after_an_hsm_epoch_roll_the_backup_is_inert") {
        return;
    }
    let _token = common::hsm::exclusive();
    let tmp = tempfile::tempdir().expect("tempdir");
    let prefix = tmp
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let cfg = || {
        std::fs::create_dir_all(tmp.path().join("keys")).expect("key dir");
        StoreConfig::new(tmp.path().join("data"), common::hsm::provider(&prefix))
            .key_dir(tmp.path().join("keys"))
            .model("backup-test", DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(4)
            .clock(ManualClock::new(Timestamp::from_unix_secs(T0)))
    };
    let store = Store::open(cfg()).expect("open");
    for i in 0..N {
        store
            .enroll(&name(i), emb(&vector(i)), consent(now(), 365))
            .expect("enroll");
    }
    store.backup(tmp.path().join("backup")).expect("backup");
    store.revoke(&name(3)).expect("revoke");
    store.backup(tmp.path().join("live1")).expect("backup");
    let live: HashSet<[u8; 32]> = backup_subject_records(tmp.path().join("live1"))
        .expect("records")
        .into_iter()
        .map(|r| r.pseudonym)
        .collect();
    let old = backup_subject_records(tmp.path().join("backup")).expect("records");
    let victim = old
        .iter()
        .find(|r| !live.contains(&r.pseudonym))
        .expect("the revoked subject's record");
    let backup_keyring = std::fs::read(tmp.path().join("backup").join("keyring")).expect("keyring");
    let provider = common::hsm::provider(&prefix);
    let keks = bioseal::forensics::keyring_keks_from(&backup_keyring, &provider).expect("epoch 1");
    assert!(
        keks.iter().any(|k| victim.wrapped_dek.opens_with(k)),
        "control: within the epoch the token's key opens the backup"
    );
    store.roll_epoch().expect("roll");
    store.backup(tmp.path().join("live2")).expect("backup");
    drop(store);
    assert!(matches!(
        bioseal::forensics::keyring_keks_from(&backup_keyring, &provider),
        Err(Error::EpochDestroyed { epoch: 1 })
    ));
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for dir in [
        tmp.path().join("keys"),
        tmp.path().join("backup"),
        common::hsm::token_dir(),
    ] {
        blobs.extend(read_all_files(&dir).into_iter().map(|(_, b)| b));
    }
    let keys = windows(&blobs);
    assert!(
        !opens(victim, &backup_keyring, &keys),
        "a window of the key directory, the backup or the token files opens the revoked subject"
    );
    let today = std::fs::read(tmp.path().join("live2").join("keyring")).expect("keyring");
    let other = backup_subject_records(tmp.path().join("live2"))
        .expect("records")
        .into_iter()
        .next()
        .expect("a live record");
    let keks = bioseal::forensics::keyring_keks_from(&today, &provider).expect("epoch 2");
    assert!(
        keks.iter().any(|k| other.wrapped_dek.opens_with(k)),
        "control: today's keyring opens through the token"
    );
}

on_both_backends!(
    a_backup_before_a_revocation_restored_after_it_does_not_resurrect,
    a_restore_killed_midway_is_finished_or_refused_never_resurrecting,
    after_the_epoch_rolls_nothing_held_today_opens_a_backed_up_revoked_subject,
);
