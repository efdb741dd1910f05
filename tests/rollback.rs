//! Promise 7 against the store's own files: sled is log-structured, so every
//! older version of a subject record and of a bucket key table stays in the
//! data files until sled reuses the space. Anyone who can write the files
//! (no key needed) can splice such a version back. None may lower a failure
//! counter, lift a disable, restore a withdrawn purpose or lengthen consent:
//! a spliced subject answers with a typed error or its current state.
//!
//! Each test drives one such change, then collects every older version of
//! the subject's record and of its bucket's key table from the raw files,
//! splices every pair back (plain sled writes through the test hook) and
//! checks the answer.

mod common;
use bioseal::__test;
use bioseal::{Consent, Decision, Error, Purpose, Store, Timestamp};
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The subject record of the one subject whose key is `key`, and its
/// bucket's key table (key `K | bucket`), as they are now.
struct Current {
    record_key: Vec<u8>,
    record: Vec<u8>,
    table_key: Vec<u8>,
    table: Vec<u8>,
}

/// The current record and table of the subject that is alone in `before`'s
/// complement: the one subject key that `enrolled` added.
fn current(store: &Store, record_key: &[u8]) -> Current {
    let records = __test::entries(store, "records").expect("records");
    let record = records
        .iter()
        .find(|(k, _)| k == record_key)
        .map(|(_, v)| v.clone())
        .expect("subject record present");
    let mut table_key = vec![b'K'];
    table_key.extend_from_slice(&record_key[1..5]);
    let table = __test::entries(store, "keys")
        .expect("keys")
        .into_iter()
        .find(|(k, _)| *k == table_key)
        .map(|(_, v)| v)
        .expect("key table present");
    Current {
        record_key: record_key.to_vec(),
        record,
        table_key,
        table,
    }
}

/// The key of the subject record that `f` adds to the store.
fn key_added_by(store: &Store, f: impl FnOnce()) -> Vec<u8> {
    let keys = |s: &Store| -> BTreeSet<Vec<u8>> {
        __test::entries(s, "records")
            .expect("records")
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.first() == Some(&b'S'))
            .collect()
    };
    let before = keys(store);
    f();
    let after = keys(store);
    let added: Vec<_> = after.difference(&before).cloned().collect();
    assert_eq!(added.len(), 1, "one subject record added");
    added.into_iter().next().expect("one")
}

/// Every older version of `cur`'s record and of its key table that can be
/// found in the raw files below the data directory. A record version is
/// found by its envelope (format byte, the same payload length, the same
/// total length); a table version by its format byte, its first pseudonym
/// and its length (the tests enroll every subject before they start).
fn older_versions(data: &std::path::Path, cur: &Current) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut records, mut tables) = (BTreeSet::new(), BTreeSet::new());
    let head = &cur.record[..5];
    let first_pseudonym = &cur.table[9..41];
    for (_, bytes) in read_all_files(data) {
        for i in 0..bytes
            .len()
            .saturating_sub(cur.record.len().min(cur.table.len()))
        {
            if bytes[i..].starts_with(head) && i + cur.record.len() <= bytes.len() {
                records.insert(bytes[i..i + cur.record.len()].to_vec());
            }
            if bytes[i] == cur.table[0]
                && i + cur.table.len() <= bytes.len()
                && &bytes[i + 9..i + 41] == first_pseudonym
            {
                tables.insert(bytes[i..i + cur.table.len()].to_vec());
            }
        }
    }
    records.remove(&cur.record);
    tables.remove(&cur.table);
    (records.into_iter().collect(), tables.into_iter().collect())
}

/// Splice every combination of (older or current) record and (older or
/// current) table back, ask `check` what the subject answers, and put the
/// current versions back. A check that is answered from a valid state may
/// itself rotate the bucket (a refused verify costs a rotation): the
/// versions it leaves become the current ones for the next splice, so every
/// splice is tried against the keyring as it is at that moment. Returns how
/// many older versions were found.
fn splice_all(
    store: &Store,
    f: &Fixture,
    cur: Current,
    check: impl Fn(&Store, usize, usize),
) -> (usize, usize) {
    let (old_records, old_tables) = older_versions(f.data.path(), &cur);
    let mut cur = cur;
    let n = (old_records.len() + 1, old_tables.len() + 1);
    for i in 0..n.0 {
        for j in 0..n.1 {
            let r = old_records.get(i).unwrap_or(&cur.record).clone();
            let t = old_tables.get(j).unwrap_or(&cur.table).clone();
            __test::put(store, "records", &cur.record_key, Some(&r)).expect("splice record");
            __test::put(store, "keys", &cur.table_key, Some(&t)).expect("splice table");
            check(store, i, j);
            let now = current(store, &cur.record_key);
            if now.table != t || now.record != r {
                cur = now;
            } else {
                __test::put(store, "records", &cur.record_key, Some(&cur.record)).expect("restore");
                __test::put(store, "keys", &cur.table_key, Some(&cur.table)).expect("restore");
            }
        }
    }
    (old_records.len(), old_tables.len())
}

/// A typed error that says "these bytes do not open", which any spliced
/// version may answer.
fn unreadable(e: &Error) -> bool {
    matches!(e, Error::Tampered { .. } | Error::KeyUnavailable { .. })
}

/// Three subjects in one bucket, so that every change rotates the bucket
/// the victim shares.
fn setup(f: &Fixture, c: Consent) -> (Store, Vec<u8>, Vec<f32>, Vec<f32>) {
    let store = Store::open(f.config().buckets(1)).expect("open");
    let mut rng = Rng(71);
    let (v, impostor) = (rng.unit(DIM), rng.unit(DIM));
    let key = key_added_by(&store, || {
        store.enroll("victim", emb(&v), c).expect("enroll");
    });
    for i in 0..2 {
        store
            .enroll(
                &format!("other-{i}"),
                emb(&rng.unit(DIM)),
                consent(f.now(), 100),
            )
            .expect("enroll");
    }
    (store, key, v, impostor)
}

#[test]
fn older_versions_do_not_lift_a_lockout() {
    let f = Fixture::new(1);
    let (store, key, v, impostor) = setup(&f, consent(f.now(), 100));
    // A match between failures writes a version with a zero counter.
    for round in 0..2 {
        for _ in 0..if round == 0 { 3 } else { 5 } {
            let d = store
                .verify("victim", &IDV, emb(&impostor))
                .expect("attempt");
            assert_eq!(d, Decision::NoMatch);
        }
        if round == 0 {
            let d = store.verify("victim", &IDV, emb(&v)).expect("genuine");
            assert_eq!(d, Decision::Match);
            f.clock.advance(DAY);
        }
    }
    assert!(matches!(
        store.verify("victim", &IDV, emb(&v)),
        Err(Error::LockedOut { .. })
    ));
    let cur = current(&store, &key);
    let (r, t) = splice_all(&store, &f, cur, |s, i, j| {
        match s.verify("victim", &IDV, emb(&v)) {
            Err(Error::LockedOut { .. }) => {}
            Err(e) if unreadable(&e) => {}
            other => panic!("record version {i} with table version {j}: {other:?}"),
        }
    });
    assert!(
        r >= 5 && t >= 5,
        "found {r} older records, {t} older tables"
    );
    // The current versions are back: still locked out.
    assert!(matches!(
        store.verify("victim", &IDV, emb(&v)),
        Err(Error::LockedOut { .. })
    ));
}

#[test]
fn older_versions_do_not_lift_a_disable() {
    let f = Fixture::new(1);
    let (store, key, v, impostor) = setup(&f, consent(f.now(), 100));
    for _ in 0..50 {
        let d = store
            .verify("victim", &IDV, emb(&impostor))
            .expect("attempt");
        assert_eq!(d, Decision::NoMatch);
        f.clock.advance(WAIT);
    }
    assert!(matches!(
        store.verify("victim", &IDV, emb(&v)),
        Err(Error::VerificationDisabled)
    ));
    let cur = current(&store, &key);
    let (r, t) = splice_all(&store, &f, cur, |s, i, j| {
        match s.verify("victim", &IDV, emb(&v)) {
            Err(Error::VerificationDisabled) => {}
            Err(e) if unreadable(&e) => {}
            other => panic!("record version {i} with table version {j}: {other:?}"),
        }
    });
    assert!(
        r >= 10 && t >= 10,
        "found {r} older records, {t} older tables"
    );
}

#[test]
fn older_versions_do_not_restore_a_withdrawn_purpose_or_longer_consent() {
    let f = Fixture::new(1);
    let both = Consent::new([IDV, Purpose::IMPERSONATION_CHECK])
        .expires_at(f.now().saturating_add(DAY * 300))
        .evidence([3; 32]);
    let (store, key, _, _) = setup(&f, both);
    store
        .withdraw_purpose("victim", &Purpose::IMPERSONATION_CHECK)
        .expect("withdraw");
    let shorter: Timestamp = f.now().saturating_add(DAY * 20);
    store
        .renew_consent(
            "victim",
            Consent::new([IDV]).expires_at(shorter).evidence([4; 32]),
        )
        .expect("shorten");
    let cur = current(&store, &key);
    let (r, t) = splice_all(&store, &f, cur, |s, i, j| {
        match s.consent_status("victim") {
            Ok(st) => {
                assert_eq!(st.purposes, vec![IDV], "record {i}, table {j}");
                assert_eq!(st.expires_at, shorter, "record {i}, table {j}");
            }
            Err(e) if unreadable(&e) => {}
            Err(e) => panic!("record version {i} with table version {j}: {e:?}"),
        }
    });
    assert!(
        r >= 2 && t >= 2,
        "found {r} older records, {t} older tables"
    );
}

/// Issue 11 §2: a copy of the data directory put back over the live one
/// (here: taken before a revocation and before failures were counted) is
/// refused at open with `RolledBack`. Accepted explicitly, it opens, the
/// acceptance is audited, the revoked subject stays unreadable, and the
/// newer data can no longer come back silently either.
#[test]
fn a_restored_copy_of_the_data_is_refused_as_rolled_back() {
    let f = Fixture::new(4);
    let mut rng = Rng(72);
    let vecs: Vec<Vec<f32>> = (0..6).map(|_| rng.unit(DIM)).collect();
    {
        let store = f.open();
        for (i, v) in vecs.iter().enumerate() {
            store
                .enroll(&format!("s{i}"), emb(v), consent(f.now(), 100))
                .expect("enroll");
        }
    }
    let old = tempfile::tempdir().expect("tempdir");
    copy_dir(f.data.path(), old.path());
    {
        let store = f.open();
        store.revoke("s0").expect("revoke");
        for _ in 0..3 {
            let d = store.verify("s1", &IDV, emb(&vecs[0])).expect("attempt");
            assert_eq!(d, Decision::NoMatch);
        }
    }
    let newer = tempfile::tempdir().expect("tempdir");
    copy_dir(f.data.path(), newer.path());
    let put_back = |from: &std::path::Path| {
        std::fs::remove_dir_all(f.data.path()).expect("rm");
        copy_dir(from, f.data.path());
    };
    put_back(old.path());
    match Store::open(f.config()) {
        Err(Error::RolledBack { data, keyring }) => assert!(data < keyring, "{data} {keyring}"),
        other => panic!("a rolled-back copy opened: {other:?}"),
    }
    {
        let store = Store::open(f.config().accept_rollback(true)).expect("accepted");
        let audit = store.audit().entries().expect("entries");
        assert!(audit
            .iter()
            .any(|e| e.event == bioseal::AuditEvent::RollbackAccepted));
        store.audit().verify_chain().expect("chain");
        match store.verify("s0", &IDV, emb(&vecs[0])) {
            Err(Error::KeyUnavailable { .. }) => {}
            other => panic!("the revoked subject from the old copy: {other:?}"),
        }
    }
    // Accepted once, the store opens normally.
    drop(f.open());
    // The newer copy is now older than the mark too.
    put_back(newer.path());
    assert!(matches!(
        Store::open(f.config()),
        Err(Error::RolledBack { .. })
    ));
}

/// A store from before the key directory (its keyring inside the data
/// directory) gets a typed error that says what to do.
#[test]
fn the_old_layout_is_a_typed_error() {
    let f = Fixture::new(4);
    std::fs::write(f.data.path().join("keyring"), b"BIOSEALK").expect("write");
    match Store::open(f.config()) {
        Err(Error::LegacyLayout(msg)) => assert!(msg.contains("re-create"), "{msg}"),
        other => panic!("{other:?}"),
    }
}
