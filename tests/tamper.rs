//! Promise 7: corrupted or tampered files give a typed error, never a panic,
//! never a wrong Match.

mod common;
use bioseal::{Decision, Error, Store};
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Enroll a few subjects; return the fixture and their vectors.
fn populated(k: Kind, n: usize) -> (Fixture, Vec<Vec<f32>>) {
    let f = Fixture::with(k, 4);
    let mut rng = Rng(1234);
    let vecs: Vec<Vec<f32>> = (0..n).map(|_| rng.unit(DIM)).collect();
    let store = f.open();
    for (i, v) in vecs.iter().enumerate() {
        store
            .enroll(&format!("s{i}"), emb(v), consent(f.now(), 100))
            .expect("enroll");
    }
    drop(store);
    (f, vecs)
}

/// The one subject record: its key and value.
fn only_record(f: &Fixture) -> (Vec<u8>, Vec<u8>) {
    let key = subject_keys(f).pop().expect("one record");
    let value = f
        .raw_rows("records")
        .into_iter()
        .find(|(x, _)| *x == key)
        .expect("record")
        .1;
    (key, value)
}

/// Keys of the subject records.
fn subject_keys(f: &Fixture) -> Vec<Vec<u8>> {
    f.raw_rows("records")
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.first() == Some(&b'S'))
        .collect()
}

/// Every byte of a subject record flipped (twice) and truncations, in the
/// sled files or as a row edited in the database: `Tampered`, never a
/// match, and an enroll on top does not overwrite it.
fn every_flipped_record_byte_is_detected(k: Kind) {
    let (f, vecs) = populated(k, 1);
    let (key, good) = only_record(&f);
    let mut checked = 0;
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            f.raw_put("records", &key, Some(&bad));
            let store = f.open();
            let r = store.verify("s0", &IDV, emb(&vecs[0]));
            assert!(
                matches!(r, Err(Error::Tampered { .. })),
                "byte {i} mask {mask:#x}: {r:?}"
            );
            // Enrolling on top of a tampered record must not overwrite it.
            let e = store.enroll("s0", emb(&vecs[0]), consent(f.now(), 1));
            assert!(
                matches!(e, Err(Error::Tampered { .. })),
                "byte {i}: enroll {e:?}"
            );
            checked += 1;
        }
    }
    // Truncations.
    for n in [0, 1, 9, 69, 80, good.len() - 1] {
        f.raw_put("records", &key, Some(&good[..n]));
        let r = f.open().verify("s0", &IDV, emb(&vecs[0]));
        assert!(
            matches!(r, Err(Error::Tampered { .. })),
            "truncated to {n}: {r:?}"
        );
    }
    // Restored, it verifies again: nothing was lost.
    f.raw_put("records", &key, Some(&good));
    assert_eq!(
        f.open().verify("s0", &IDV, emb(&vecs[0])).expect("verify"),
        Decision::Match
    );
    assert!(checked > 600, "{checked}");
}

/// Every byte of a bucket key table flipped: each subject verifies as a
/// match or fails typed (`Tampered`, or `KeyUnavailable` for a generation
/// moved below the live ones); at least one subject of the bucket fails;
/// an impostor never matches; restoring the table restores every match.
/// (PostgreSQL: every third byte, each flip costs a reopen and re-keys.)
fn every_flipped_key_table_byte_is_detected(k: Kind) {
    let (f, vecs) = populated(k, 8);
    // The fullest table (8 subjects in 4 buckets: some bucket has two).
    let (key, good) = f
        .raw_rows("keys")
        .into_iter()
        .filter(|(k, _)| k.first() == Some(&b'K'))
        .max_by_key(|(_, v)| v.len())
        .expect("a key table");
    assert!(good.len() >= 9 + 2 * 92, "{}", good.len());
    let impostor = Rng(999).unit(DIM);
    let stride = if k == Kind::Postgres { 3 } else { 1 };
    let mut checked = 0;
    for i in (0..good.len()).step_by(stride) {
        for mask in [0x01u8, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            f.raw_put("keys", &key, Some(&bad));
            let store = f.open();
            let mut failed = 0;
            for (j, v) in vecs.iter().enumerate() {
                let id = format!("s{j}");
                match store.verify(&id, &IDV, emb(v)) {
                    Ok(Decision::Match) => {}
                    Err(Error::Tampered { .. } | Error::KeyUnavailable { .. }) => failed += 1,
                    other => panic!("byte {i} mask {mask:#x} {id}: {other:?}"),
                }
                let r = store.verify(&id, &IDV, emb(&impostor));
                assert!(
                    !matches!(r, Ok(Decision::Match)),
                    "byte {i}: impostor {r:?}"
                );
                store.reset_attempts(&id).ok();
            }
            assert!(failed >= 1, "byte {i} mask {mask:#x}: nothing noticed");
            checked += 1;
        }
    }
    f.raw_put("keys", &key, Some(&good));
    let store = f.open();
    for (j, v) in vecs.iter().enumerate() {
        assert_eq!(
            store
                .verify(&format!("s{j}"), &IDV, emb(v))
                .expect("verify"),
            Decision::Match
        );
    }
    assert!(checked >= 2 * (9 + 2 * 92) / stride, "{checked}");
}

fn records_swapped_between_subjects_do_not_open(k: Kind) {
    let (f, vecs) = populated(k, 8);
    let rows = f.raw_rows("records");
    let value = |key: &Vec<u8>| rows.iter().find(|(x, _)| x == key).expect("row").1.clone();
    let keys = subject_keys(&f);
    // Swap the values of two records in the same bucket (same KEK) and of
    // two in different buckets.
    let (a, b) = (&keys[0], &keys[1]);
    let (c, d) = (&keys[0..4][2], keys.last().expect("key"));
    for (x, y) in [(a, b), (c, d)] {
        let (vx, vy) = (value(x), value(y));
        f.raw_put("records", x, Some(&vy));
        f.raw_put("records", y, Some(&vx));
    }
    let store = f.open();
    let mut tampered = 0;
    for (i, v) in vecs.iter().enumerate() {
        match store.verify(&format!("s{i}"), &IDV, emb(v)) {
            Ok(Decision::Match) => {}
            Err(Error::Tampered { .. }) => tampered += 1,
            other => panic!("s{i}: {other:?}"),
        }
    }
    assert_eq!(
        tampered, 4,
        "the four swapped records fail, the rest still match"
    );
}

/// A split-custody subject's record (issue 14): every byte flipped, the
/// templates section included, is `Tampered` with the right user key —
/// never a `Match`, and never mistaken for a wrong key (the payload keeps
/// the section's digest). (PostgreSQL: every third byte.)
fn every_flipped_split_record_byte_is_tampered_not_a_wrong_key(k: Kind) {
    let f = Fixture::with(k, 4);
    let v = Rng(4321).unit(DIM);
    let user = bioseal::UserKey::from_bytes(
        [0x3c; 31]
            .iter()
            .chain(&[1u8])
            .copied()
            .collect::<Vec<u8>>()
            .try_into()
            .expect("32"),
    )
    .expect("key");
    f.open()
        .enroll_with("s0", emb(&v), consent(f.now(), 100), &user)
        .expect("enroll");
    let (key, good) = only_record(&f);
    let stride = if k == Kind::Postgres { 3 } else { 1 };
    let mut checked = 0;
    for i in (0..good.len()).step_by(stride) {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        f.raw_put("records", &key, Some(&bad));
        let r = f.open().verify_with("s0", &IDV, emb(&v), &user);
        assert!(
            matches!(r, Err(Error::Tampered { .. })),
            "byte {i} of {}: {r:?}",
            good.len()
        );
        checked += 1;
    }
    f.raw_put("records", &key, Some(&good));
    assert_eq!(
        f.open()
            .verify_with("s0", &IDV, emb(&v), &user)
            .expect("verify"),
        Decision::Match
    );
    assert!(checked * stride > 2 * DIM, "{checked}");
}

on_both_backends!(
    every_flipped_split_record_byte_is_tampered_not_a_wrong_key,
    every_flipped_record_byte_is_detected,
    every_flipped_key_table_byte_is_detected,
    records_swapped_between_subjects_do_not_open,
);

/// The keyring (the file in the key directory, or its rows in the
/// database) edited: `Tampered` (or `WrongRootKey` where the edit is
/// indistinguishable from another key), and nothing else.
fn keyring_tampering_is_typed(k: Kind) {
    let (f, _) = populated(k, 2);
    let good = f.raw_keyring();
    // Magic, version, bucket count, model id, epoch start, secrets,
    // padding, active slot of bucket 0 (generation, ciphertext, tag), empty
    // slot, slot padding.
    for i in [
        0,
        9,
        14,
        40,
        120,
        160,
        200,
        300,
        1024,
        1032,
        1072,
        1091,
        1152,
        1112,
        good.len() - 1,
    ] {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        f.set_raw_keyring(&bad);
        let r = Store::open(f.config());
        assert!(matches!(r, Err(Error::Tampered { .. })), "byte {i}: {r:?}");
    }
    // The state (high-water mark, audit head, threshold): two copies, so
    // that a torn write leaves one; both edited is tampering.
    for i in [520, 600, 650] {
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        bad[i + 256] ^= 0x04;
        f.set_raw_keyring(&bad);
        let r = Store::open(f.config());
        assert!(matches!(r, Err(Error::Tampered { .. })), "byte {i}: {r:?}");
    }
    // The epoch: names another epoch's key, which the provider (a fixed
    // root key: epoch 0 only) does not have.
    let mut bad = good.clone();
    bad[116] ^= 0x04;
    f.set_raw_keyring(&bad);
    let r = Store::open(f.config());
    assert!(matches!(r, Err(Error::KeyUnavailable { .. })), "{r:?}");
    for i in [20, 130, 150] {
        // Store id and key check value: indistinguishable from a wrong key.
        let mut bad = good.clone();
        bad[i] ^= 0x04;
        f.set_raw_keyring(&bad);
        assert!(
            matches!(Store::open(f.config()), Err(Error::WrongRootKey)),
            "byte {i}"
        );
    }
    f.set_raw_keyring(&good[..good.len() - 128]);
    assert!(matches!(
        Store::open(f.config()),
        Err(Error::Tampered { .. })
    ));
    f.set_raw_keyring(b"");
    assert!(matches!(
        Store::open(f.config()),
        Err(Error::Tampered { .. } | Error::KeyUnavailable { .. })
    ));
    f.set_raw_keyring(&good);
    f.open();
}

on_both_backends!(keyring_tampering_is_typed);

/// Random byte flips anywhere in sled's files: whatever sled and bioseal
/// make of them, the result is a typed error or the right decision, never a
/// panic and never a Match for an impostor.
#[test]
fn random_corruption_of_sled_files_never_panics_or_false_matches() {
    let (f, vecs) = populated(Kind::Sled, 12);
    let pristine = tempfile::tempdir().expect("tempdir");
    copy_dir(f.data.path(), pristine.path());
    let mut rng = Rng(77);
    let impostor = rng.unit(DIM);
    let (mut opened, mut refused) = (0, 0);
    for round in 0..60 {
        std::fs::remove_dir_all(f.data.path().join("db")).expect("rm");
        copy_dir(&pristine.path().join("db"), &f.data.path().join("db"));
        let files: Vec<_> = read_all_files(&f.data.path().join("db"))
            .into_iter()
            .filter(|(_, d)| !d.is_empty())
            .collect();
        let (path, mut data) = files[(rng.next_u64() as usize) % files.len()].clone();
        for _ in 0..1 + round % 4 {
            let at = (rng.next_u64() as usize) % data.len();
            data[at] ^= 1 << (rng.next_u64() % 8);
        }
        std::fs::write(&path, &data).expect("write");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let store = match Store::open(f.config()) {
                Ok(s) => s,
                Err(_) => return false,
            };
            for (i, v) in vecs.iter().enumerate() {
                let s = format!("s{i}");
                if let Ok(d) = store.verify(&s, &IDV, emb(v)) {
                    assert_eq!(d, Decision::Match, "{s} genuine after corruption");
                }
                if let Ok(d) = store.verify(&s, &IDV, emb(&impostor)) {
                    assert_eq!(
                        d,
                        Decision::NoMatch,
                        "{s} impostor matched after corruption"
                    );
                }
            }
            true
        }));
        match outcome {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("round {round}: panic on corrupted {}", path.display()),
        }
    }
    eprintln!("corrupted sled files: {opened} opened, {refused} refused");
}
