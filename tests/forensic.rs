//! Promises 5 and 6: after revocation nothing in today's files or an older
//! copy of them, even with the root key, brings the template back; and the
//! files reveal no template or subject id at rest.

mod common;
use bioseal::forensics::subject_records;
use bioseal::{Decision, Error, Store};
use common::*;
use std::collections::HashSet;
use std::path::Path;

const VICTIM: &str = "victim-subject-7f3a9c@example.org";

/// The store's fixed-point quantisation, recomputed independently.
fn quantise(v: &[f32]) -> Vec<u8> {
    let n = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    v.iter()
        .flat_map(|&x| (((f64::from(x) / n) * 16384.0).round() as i16).to_le_bytes())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every distinct 32-byte window of every file below `dir`.
fn windows(dir: &Path, into: &mut HashSet<[u8; 32]>) -> usize {
    let mut bytes = 0;
    for (_, data) in read_all_files(dir) {
        bytes += data.len();
        for w in data.windows(32) {
            let mut k = [0u8; 32];
            k.copy_from_slice(w);
            into.insert(k);
        }
    }
    bytes
}

#[test]
fn revoked_subject_is_unrecoverable_from_any_copy() {
    let f = Fixture::new(4); // few buckets: the victim shares its bucket
    let mut rng = Rng(99);
    let victim = rng.unit(DIM);
    let others: Vec<Vec<f32>> = (0..24).map(|_| rng.unit(DIM)).collect();
    {
        let store = f.open();
        store
            .enroll(VICTIM, emb(&victim), consent(f.now(), 365))
            .expect("enroll");
        for (i, v) in others.iter().enumerate() {
            store
                .enroll(&format!("other-{i}"), emb(v), consent(f.now(), 365))
                .expect("enroll");
        }
    }
    // The "old backup": a full copy of the data directory. The keyring is
    // not in it: it lives in the key directory.
    let backup = tempfile::tempdir().expect("tempdir");
    copy_dir(f.data.path(), backup.path());
    assert!(
        read_all_files(backup.path())
            .iter()
            .all(|(p, _)| !p.to_string_lossy().contains("keyring")),
        "a copy of the data directory carries no keyring"
    );
    // What SECURITY.md's assumption is about: a copy of the key directory
    // kept from before the revocation.
    let old_keys = tempfile::tempdir().expect("tempdir");
    copy_dir(f.secrets.path(), old_keys.path());

    {
        let store = f.open();
        store.revoke(VICTIM).expect("revoke");
        assert!(matches!(
            store.verify(VICTIM, &IDV, emb(&victim)),
            Err(Error::NotEnrolled)
        ));
    }

    // (a) No plaintext at rest, neither today nor in the backup.
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("f32 embedding", f32_bytes(&victim)),
        ("first 8 f32 components", f32_bytes(&victim[..8])),
        ("quantised template", quantise(&victim)),
        (
            "first 16 quantised components",
            quantise(&victim)[..32].to_vec(),
        ),
        ("subject id", VICTIM.as_bytes().to_vec()),
        ("other subject id", b"other-3".to_vec()),
        ("purpose name", b"identity-verification".to_vec()),
    ];
    for dir in [f.data.path(), backup.path()] {
        for (path, data) in read_all_files(dir) {
            for (what, needle) in &needles {
                assert!(
                    !contains(&data, needle),
                    "{what} found in {}",
                    path.display()
                );
            }
        }
    }

    // (c) The victim's ciphertexts, from the backup (today's files no longer
    // hold its record). Read them from a scratch copy so the backup's bytes
    // stay exactly as they were.
    let scratch = tempfile::tempdir().expect("tempdir");
    copy_dir(backup.path(), scratch.path());
    let old_records = subject_records(scratch.path()).expect("old records");
    let today_scratch = tempfile::tempdir().expect("tempdir");
    copy_dir(f.data.path(), today_scratch.path());
    let today: HashSet<[u8; 32]> = subject_records(today_scratch.path())
        .expect("records")
        .into_iter()
        .map(|r| r.pseudonym)
        .collect();
    let gone: Vec<_> = old_records
        .iter()
        .filter(|r| !today.contains(&r.pseudonym))
        .collect();
    assert_eq!(gone.len(), 1, "exactly the victim's record disappeared");
    let victim_rec = gone[0];
    assert_eq!(old_records.len(), 25);

    let mut keys = HashSet::new();
    let scanned = windows(f.data.path(), &mut keys) + windows(backup.path(), &mut keys);
    assert!(scanned > 10_000, "scanned only {scanned} bytes");
    let mut opened = 0;
    for k in &keys {
        if victim_rec.wrapped_dek.opens_with(k) || victim_rec.payload.opens_with(k) {
            opened += 1;
        }
    }
    assert_eq!(
        opened, 0,
        "a 32-byte window of the files opens the revoked subject's data"
    );
    eprintln!(
        "forensic scan: {scanned} bytes, {} distinct 32-byte windows, none opens",
        keys.len()
    );

    // (b) Old sled files + today's keyring + the real root key. The old
    // data is refused as rolled back; accepted (as an operator restoring a
    // backup would), the victim still does not open.
    let mixed = tempfile::tempdir().expect("tempdir");
    copy_dir(
        &backup.path().join("db"),
        &mixed.path().join("data").join("db"),
    );
    copy_dir(f.secrets.path(), &mixed.path().join("keys"));
    let mixed_config = || {
        f.config_at(&mixed.path().join("data"))
            .key_dir(mixed.path().join("keys"))
    };
    assert!(matches!(
        Store::open(mixed_config()),
        Err(Error::RolledBack { .. })
    ));
    let store = Store::open(mixed_config().accept_rollback(true))
        .expect("old data opens with today's keyring");
    let r = store.verify(VICTIM, &IDV, emb(&victim));
    assert!(
        matches!(r, Err(Error::KeyUnavailable { .. })),
        "revoked subject from old files: {r:?}"
    );
    // Positive control: subjects outside the victim's bucket still open.
    let mut unaffected = 0;
    for (i, v) in others.iter().enumerate() {
        match store.verify(&format!("other-{i}"), &IDV, emb(v)) {
            Ok(d) => {
                assert_eq!(d, Decision::Match);
                unaffected += 1;
            }
            // Same bucket as the victim: that backup copy died with the rotation.
            Err(Error::KeyUnavailable { .. }) => {}
            Err(e) => panic!("other-{i}: {e}"),
        }
    }
    assert!(
        (10..24).contains(&unaffected),
        "{unaffected} of 24 others readable"
    );
    drop(store);

    // And what the assumption in SECURITY.md is about: the backup together
    // with an old copy of the key directory still holds the victim. Key
    // directory copies must not be kept (or must be destroyed) past a
    // revocation.
    let store = Store::open(f.config_at(scratch.path()).key_dir(old_keys.path()))
        .expect("backup opens with the old keyring");
    assert_eq!(
        store.verify(VICTIM, &IDV, emb(&victim)).expect("verify"),
        Decision::Match
    );
}

/// Issue 11 §6: with `ShredPolicy::Deferred`, deleting the pending-shred
/// marker (a plain sled write, no key) must not keep a revoked subject's
/// DEK alive: every rotation drops every key-table entry without a live
/// record. Without that, the next rotation re-wrapped the revoked DEK under
/// the live KEK, and the old record spliced back matched.
#[test]
fn a_deleted_pending_marker_does_not_keep_a_revoked_dek() {
    use bioseal::{__test, ShredPolicy};
    let f = Fixture::new(1);
    let mut rng = Rng(5);
    let victim = rng.unit(DIM);
    let (victim_key, victim_record) = {
        let store = Store::open(f.config().shred_policy(ShredPolicy::Deferred)).expect("open");
        store
            .enroll(VICTIM, emb(&victim), consent(f.now(), 365))
            .expect("enroll");
        for i in 0..3 {
            store
                .enroll(
                    &format!("other-{i}"),
                    emb(&rng.unit(DIM)),
                    consent(f.now(), 365),
                )
                .expect("enroll");
        }
        let before = __test::entries(&store, "records").expect("records");
        store.revoke(VICTIM).expect("revoke");
        let after = __test::entries(&store, "records").expect("records");
        let (k, v) = before
            .into_iter()
            .find(|(k, _)| k[0] == b'S' && !after.iter().any(|(a, _)| a == k))
            .expect("the victim's record was removed");
        let marker: Vec<u8> = after
            .iter()
            .map(|(k, _)| k.clone())
            .find(|k| k[0] == b'P')
            .expect("pending marker");
        __test::put(&store, "records", &marker, None).expect("delete the marker");
        (k, v)
    };
    // The operator switches to immediate shredding; another revocation in
    // the same bucket rotates it.
    let store = Store::open(f.config()).expect("reopen");
    assert_eq!(store.stats().expect("stats").pending_shreds, 0);
    store.revoke("other-0").expect("revoke");
    let table = __test::entries(&store, "keys")
        .expect("keys")
        .into_iter()
        .next()
        .expect("one table")
        .1;
    assert!(
        !contains(&table, &victim_key[5..]),
        "the rotation dropped the revoked subject's entry"
    );
    // The old record spliced back with today's files and the root key.
    __test::put(&store, "records", &victim_key, Some(&victim_record)).expect("splice");
    match store.verify(VICTIM, &IDV, emb(&victim)) {
        Err(Error::Tampered { .. } | Error::KeyUnavailable { .. }) => {}
        other => panic!("revoked subject answered {other:?}"),
    }
}

fn hex(b: &[u8]) -> Vec<u8> {
    b.iter()
        .flat_map(|x| format!("{x:02x}").into_bytes())
        .collect()
}

/// Shared mode: nothing readable at rest in PostgreSQL's data directory
/// (tables, indexes, WAL) or in a `pg_dump`: no template bytes (f32 or
/// quantised), no subject id, no purpose name. And what SECURITY.md says
/// G5 does *not* hold in shared mode, shown: a dump taken before a
/// revocation, restored with the root key, still opens the revoked subject
/// (its keyring rows are in the dump; key epochs are issue 13).
#[test]
fn postgres_files_wal_and_dumps_hold_nothing_readable() {
    if common::pg::skipped("postgres_files_wal_and_dumps_hold_nothing_readable") {
        return;
    }
    let server = common::pg::Server::start();
    let url = server.fresh_database("forensic");
    let f = Fixture::new(4);
    // Epoch keys in a file in the key directory (which, in shared mode,
    // holds nothing else).
    let epochs = f.secrets.path().join("bioseal.epochs");
    let provider = || bioseal::FileEpochProvider::open(&epochs).expect("epoch file");
    let cfg_at = |url: &str| f.config_with(Path::new(url), provider());
    let cfg = || cfg_at(&url);
    let mut rng = Rng(77);
    let victim = rng.unit(DIM);
    let others: Vec<Vec<f32>> = (0..12).map(|_| rng.unit(DIM)).collect();
    {
        let store = Store::open(cfg()).expect("open");
        store
            .enroll(VICTIM, emb(&victim), consent(f.now(), 365))
            .expect("enroll");
        for (i, v) in others.iter().enumerate() {
            store
                .enroll(&format!("other-{i}"), emb(v), consent(f.now(), 365))
                .expect("enroll");
        }
        assert_eq!(
            store.verify(VICTIM, &IDV, emb(&victim)).expect("verify"),
            Decision::Match
        );
        // An impostor failure re-keys the subject: more versions in the WAL.
        let _ = store.verify(VICTIM, &IDV, emb(&others[0]));
    }
    let old_dump = server.tool(
        "pg_dump",
        &format!("-h {} -U postgres forensic", server.sock.display()),
    );
    {
        let store = Store::open(cfg()).expect("open");
        store.revoke(VICTIM).expect("revoke");
        store.audit().verify_chain().expect("chain");
    }
    let mut c = common::pg::client(&url);
    // Positive control: plaintext written next to the store's tables is
    // found by the same scans (files, WAL, dump).
    let control = f32_bytes(&rng.unit(DIM)[..8]);
    c.execute(
        "CREATE TABLE public.control AS SELECT $1::bytea AS v, 'control-subject-id'::text AS id",
        &[&control],
    )
    .expect("control");
    c.batch_execute("CHECKPOINT").expect("checkpoint");
    let dump = server.tool(
        "pg_dump",
        &format!("-h {} -U postgres forensic", server.sock.display()),
    );
    let q = quantise(&victim);
    let needles: Vec<(&str, Vec<u8>)> = vec![
        ("f32 embedding (8 components)", f32_bytes(&victim[..8])),
        ("quantised template (16 components)", q[..32].to_vec()),
        ("other template (8 components)", f32_bytes(&others[3][..8])),
        ("subject id", VICTIM.as_bytes().to_vec()),
        ("other subject id", b"other-3".to_vec()),
        ("purpose name", b"identity-verification".to_vec()),
    ];
    let files = read_all_files(&server.data);
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    assert!(
        files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("pg_wal")),
        "the WAL is scanned"
    );
    assert!(total > 1_000_000, "scanned {total} bytes");
    for needle in [&control[..], b"control-subject-id"] {
        assert!(
            files.iter().any(|(_, d)| contains(d, needle)),
            "the scan finds plaintext in the server's files"
        );
        assert!(contains(&dump, needle) || contains(&dump, &hex(needle)));
    }
    for (path, data) in &files {
        for (what, needle) in &needles {
            assert!(!contains(data, needle), "{what} in {}", path.display());
        }
    }
    for (name, d) in [("dump", &dump), ("old dump", &old_dump)] {
        assert!(d.len() > 10_000, "{name}: {} bytes", d.len());
        for (what, needle) in &needles {
            assert!(!contains(d, needle), "{what} in the {name}");
            assert!(!contains(d, &hex(needle)), "{what} (hex) in the {name}");
        }
    }
    // The old dump, restored into a database of its own.
    let file = server.dir.join("old-dump.sql");
    std::fs::write(&file, &old_dump).expect("write dump");
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let restore_dump = |db: &str| {
        let url = server.fresh_database(db);
        server.tool(
            "psql",
            &format!(
                "-q -v ON_ERROR_STOP=1 -h {} -U postgres -d {db} -f {}",
                server.sock.display(),
                file.display()
            ),
        );
        url
    };
    // Until the epoch rolls, the old dump plus the provider's key opens the
    // revoked subject (the bound every receipt states: epoch end).
    let restored = restore_dump("restored");
    {
        let store = Store::open(cfg_at(&restored)).expect("open the restored dump");
        assert_eq!(
            store.verify(VICTIM, &IDV, emb(&victim)).expect("verify"),
            Decision::Match,
            "control: within the epoch, an old dump opens a revoked subject"
        );
    }
    let old_keyring = keyring_rows(&restored);
    // Roll the epoch on the live store: the old epoch's key is destroyed.
    {
        let store = Store::open(cfg()).expect("open");
        assert_eq!(store.roll_epoch().expect("roll").epoch, 2);
        for (i, v) in others.iter().enumerate() {
            assert_eq!(
                store
                    .verify(&format!("other-{i}"), &IDV, emb(v))
                    .expect("verify"),
                Decision::Match
            );
        }
    }
    let again = restore_dump("restored_after_roll");
    let r = Store::open(cfg_at(&again));
    assert!(
        matches!(r, Err(Error::EpochDestroyed { epoch: 1 })),
        "after the roll the old dump does not open: {:?}",
        r.err()
    );
    // Nothing the key directory (the epoch file) or the old dump holds,
    // tried as the epoch root key, opens the old dump's keyring; today's
    // keyring opens with a window of the epoch file (positive control).
    let mut keys = HashSet::new();
    let scanned = windows(f.secrets.path(), &mut keys);
    for w in old_dump.windows(32) {
        keys.insert(<[u8; 32]>::try_from(w).expect("32 bytes"));
    }
    assert!(
        keys.iter()
            .all(|k| bioseal::forensics::keyring_keks(&old_keyring, k).is_none()),
        "a 32-byte window opens the old dump's keyring after the roll"
    );
    let live_keyring = keyring_rows(&url);
    assert!(
        keys.iter()
            .any(|k| bioseal::forensics::keyring_keks(&live_keyring, k).is_some()),
        "control: the epoch file opens today's keyring"
    );
    eprintln!(
        "shared-mode epoch scan: {} bytes, {} windows tried as epoch root keys",
        scanned + old_dump.len(),
        keys.len()
    );
}

/// The keyring image a database holds (its rows, in order).
fn keyring_rows(url: &str) -> Vec<u8> {
    common::pg::client(url)
        .query("SELECT v FROM bioseal.keyring ORDER BY part", &[])
        .expect("keyring rows")
        .iter()
        .flat_map(|r| r.get::<_, Vec<u8>>(0))
        .collect()
}
