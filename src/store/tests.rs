//! Unit tests of the store's internals: crash recovery, shreds, the
//! retention index and the flusher.

use super::*;
use crate::{ManualClock, RootKey, Threshold};

const DIM: usize = 8;

/// Data in `dir/data`, keyring in `dir/keys`.
fn config(dir: &Path, policy: ShredPolicy) -> StoreConfig {
    StoreConfig::new(dir.join("data"), RootKey::from_bytes([9; 32]))
        .key_dir(dir.join("keys"))
        .model("m", DIM)
        .threshold(Threshold::cosine(0.9))
        .buckets(1)
        .shred_policy(policy)
        .clock(ManualClock::new(Timestamp::from_unix_secs(1_000)))
}

fn vec_for(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|j| {
            if j == i % DIM {
                1.0
            } else {
                0.05 * (i / DIM) as f32
            }
        })
        .collect()
}

fn populate(store: &Store, n: usize) {
    for i in 0..n {
        let c = Consent::new([Purpose::IDENTITY_VERIFICATION])
            .expires_at(Timestamp::from_unix_secs(99_999))
            .evidence([1; 32]);
        store
            .enroll(&format!("s{i}"), Embedding::new(vec_for(i)), c)
            .expect("enroll");
    }
}

fn all_match(store: &Store, n: usize) {
    match_each(store, 0..n);
}

/// Every subject `s{i}` for `i` in `ids` matches its own vector.
fn match_each(store: &Store, ids: impl IntoIterator<Item = usize>) {
    for i in ids {
        let d = store
            .verify(
                &format!("s{i}"),
                &Purpose::IDENTITY_VERIFICATION,
                Embedding::new(vec_for(i)),
            )
            .expect("verify");
        assert_eq!(d, Decision::Match, "s{i}");
    }
}

fn keyring_slot_bytes(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let k = std::fs::read(dir.join("keys").join(KEYRING_FILE)).expect("read");
    (k[1024..1152].to_vec(), k[1152..1280].to_vec())
}

/// Crash right after the new KEK slot was synced: on reopen the rotation
/// is completed (every DEK re-wrapped, old slot zeroed) before anything else.
#[test]
fn rotation_interrupted_after_new_slot_is_completed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
        populate(&store, 6);
        assert_eq!(store.keyring.begin_rotation(0).expect("begin"), 2);
        // "crash": drop without finishing
    }
    let (a, b) = keyring_slot_bytes(dir.path());
    assert!(
        a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0),
        "both slots live"
    );
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
    let (a, _) = keyring_slot_bytes(dir.path());
    assert!(a.iter().all(|&x| x == 0), "old slot zeroed on open");
    let s = store.stats().expect("stats");
    assert_eq!((s.generation_min, s.generation_max), (2, 2));
    all_match(&store, 6);
    let table = store
        .raw_get(Table::Keys, &storage::key_table_key(0))
        .expect("read")
        .expect("table");
    let table = DekTable::decode(&table).expect("decode");
    assert_eq!((table.generation, table.entries.len()), (2, 6));
}

/// Crash after the re-wrap batch was flushed but before the old slot was
/// zeroed.
#[test]
fn rotation_interrupted_before_zeroing_is_completed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
        populate(&store, 6);
        let g = store.keyring.begin_rotation(0).expect("begin");
        let t = store
            .rewrap_table(0, g, &[], None)
            .expect("rewrap")
            .expect("table");
        store
            .raw_put(Table::Keys, &storage::key_table_key(0), t)
            .expect("insert");
        store.db.flush().expect("flush");
    }
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
    assert!(keyring_slot_bytes(dir.path()).0.iter().all(|&x| x == 0));
    assert!(!store.keyring.is_rotating(0).expect("state"));
    all_match(&store, 6);
}

/// A deferred revocation left pending is shredded on open once the store
/// runs with immediate shredding.
#[test]
fn pending_shred_runs_on_open_with_immediate_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("open");
        populate(&store, 3);
        assert_eq!(
            store.revoke("s1").expect("revoke").status,
            ShredStatus::Pending
        );
    }
    {
        let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("reopen");
        assert_eq!(
            store.stats().expect("stats").pending_shreds,
            1,
            "deferred stays pending"
        );
    }
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
    let s = store.stats().expect("stats");
    assert_eq!((s.pending_shreds, s.generation_max, s.subjects), (0, 2, 2));
}

/// A crash between the writes of `put_subject` can leave a retention
/// entry under a day the subject's pointer does not name. The sweep that
/// visits it removes it and leaves the subject alone; an entry with no
/// subject at all is removed too.
#[test]
fn sweep_removes_index_entries_left_by_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
    let store =
        Store::open(config(dir.path(), ShredPolicy::Immediate).clock(clock.clone())).expect("open");
    populate(&store, 2);
    let (p, b, _) = store.locate("s0");
    let ghost = Pseudonym([7; 32]);
    // As a crash would leave them: a stale entry for a live subject (day 0,
    // its pointer names the day of its deadline) and one for no subject.
    for k in [
        storage::deadline_key(0, b, &p),
        storage::deadline_key(0, b, &ghost),
    ] {
        store.raw_put(Table::Records, &k, &[][..]).expect("insert");
    }
    let report = store.sweep().expect("sweep");
    assert_eq!((report.examined, report.expired), (2, 0));
    for k in [
        storage::deadline_key(0, b, &p),
        storage::deadline_key(0, b, &ghost),
    ] {
        assert!(store.raw_get(Table::Records, &k).expect("read").is_none());
    }
    let day = day_of(99_999);
    assert!(store
        .raw_get(Table::Records, &storage::deadline_key(day, b, &p))
        .expect("read")
        .is_some());
    assert_eq!(store.sweep().expect("sweep").examined, 0);
    all_match(&store, 2);
}

fn table_of(store: &Store, b: u32) -> DekTable {
    let v = store
        .raw_get(Table::Keys, &storage::key_table_key(b))
        .expect("read")
        .expect("table");
    DekTable::decode(&v).expect("decode")
}

/// A deferred revocation leaves the subject's key-table entry until the
/// shred, which drops it (no record) while re-wrapping the rest.
#[test]
fn deferred_shred_drops_the_revoked_entry_from_the_key_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path(), ShredPolicy::Deferred)).expect("open");
    populate(&store, 3);
    store.revoke("s1").expect("revoke");
    let t = table_of(&store, 0);
    assert_eq!((t.generation, t.entries.len()), (1, 3));
    assert_eq!(store.shred().expect("shred"), 1);
    let t = table_of(&store, 0);
    assert_eq!((t.generation, t.entries.len()), (2, 2));
    let (p1, _, _) = store.locate("s1");
    assert!(t.entries.iter().all(|(p, _)| *p != p1.0));
}

/// A crash after a rotation removed a record but before it wrote the
/// bucket's new key table: recovery drops the orphaned entry instead of
/// re-wrapping it under the new KEK (which would keep the removed
/// subject's DEK alive).
#[test]
fn recovery_drops_entries_whose_record_was_removed_before_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p1 = {
        let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
        populate(&store, 3);
        let (p1, b, key) = store.locate("s1");
        store.keyring.begin_rotation(b).expect("begin");
        store.raw_del(Table::Records, &key).expect("remove");
        p1
        // "crash": drop with the rotation unfinished
    };
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("reopen");
    let t = table_of(&store, 0);
    assert_eq!((t.generation, t.entries.len()), (2, 2));
    assert!(t.entries.iter().all(|(p, _)| *p != p1.0));
    assert!(matches!(
        store.verify(
            "s1",
            &Purpose::IDENTITY_VERIFICATION,
            Embedding::new(vec_for(1))
        ),
        Err(Error::NotEnrolled)
    ));
    match_each(&store, [0, 2]);
}

#[test]
fn re_enrollment_after_revocation_gets_a_new_dek() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
    populate(&store, 1);
    let first = store.test_dek("s0").expect("dek");
    store.revoke("s0").expect("revoke");
    populate(&store, 1);
    let second = store.test_dek("s0").expect("dek");
    assert_ne!(*first, *second);
}

/// The flusher drains the audit queue when it reaches the wake mark,
/// long before its interval, so that callers do not seal and MAC
/// entries themselves.
#[test]
fn a_filling_audit_queue_wakes_the_flusher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate).durability(
        Durability::GroupCommit {
            interval: std::time::Duration::from_secs(60),
        },
    ))
    .expect("open");
    populate(&store, 1);
    let verify = || {
        let d = store.verify(
            "s0",
            &Purpose::IDENTITY_VERIFICATION,
            Embedding::new(vec_for(0)),
        );
        assert_eq!(d.expect("verify"), Decision::Match);
    };
    let stored = store.raw_all(Table::Audit).len();
    for _ in 1..crate::audit::WAKE_AT {
        verify();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        store.raw_all(Table::Audit).len(),
        stored,
        "nothing drains below the mark"
    );
    verify();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.raw_all(Table::Audit).len() == stored && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        store.raw_all(Table::Audit).len() > stored,
        "the flusher drained at the mark"
    );
}

/// A bucket refuses a subject past its limit (what bounds the wraps one
/// KEK ever seals), without sealing anything.
#[test]
fn a_full_bucket_refuses_enrollment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
    populate(&store, 1);
    let mut t = table_of(&store, 0);
    for i in 0..rotation::MAX_BUCKET_SUBJECTS as u32 {
        let mut p = [0xffu8; 32];
        p[..4].copy_from_slice(&i.to_be_bytes());
        t.put(&Pseudonym(p), [0; WRAPPED_DEK_LEN]);
    }
    store
        .raw_put(Table::Keys, &storage::key_table_key(0), t.encode())
        .expect("insert");
    let c = Consent::new([Purpose::IDENTITY_VERIFICATION])
        .expires_at(Timestamp::from_unix_secs(99_999))
        .evidence([1; 32]);
    assert!(matches!(
        store.enroll("one-too-many", Embedding::new(vec_for(3)), c),
        Err(Error::BucketFull { .. })
    ));
}

/// Each audit segment is sealed under its own key: an entry of one segment
/// does not open under another segment's key, and no segment holds more
/// than 256 entries.
#[test]
fn audit_segments_have_their_own_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(config(dir.path(), ShredPolicy::Immediate)).expect("open");
    populate(&store, 1);
    for _ in 0..600 {
        let _ = store.verify(
            "s0",
            &Purpose::IDENTITY_VERIFICATION,
            Embedding::new(vec_for(0)),
        );
    }
    store.flush().expect("flush");
    let segments: Vec<(Vec<u8>, Vec<u8>)> = store.raw_all(Table::Audit);
    assert!(segments.len() >= 3, "{} segments", segments.len());
    assert!(crate::audit::tests_support::max_entries(&segments) <= 256);
    assert!(crate::audit::tests_support::cross_open_fails(
        &store.audit,
        &segments
    ));
    store.audit().verify_chain().expect("chain");
}

/// Raw table access for these tests.
impl Store {
    fn raw_get(&self, t: Table, k: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(t, k)?.map(|v| v.to_vec()))
    }
    fn raw_put(&self, t: Table, k: &[u8], v: impl Into<Vec<u8>>) -> Result<()> {
        let mut w = Writes::default();
        w.put(t, k, Some(v.into()));
        self.db.apply(w, false)
    }
    fn raw_del(&self, t: Table, k: &[u8]) -> Result<()> {
        let mut w = Writes::default();
        w.put(t, k, None);
        self.db.apply(w, false)
    }
    fn raw_all(&self, t: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        self.db
            .scan(t, &[], None, &mut |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .expect("scan");
        out
    }
}
