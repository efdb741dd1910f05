//! Promise 8: every event is in a hash-chained, MACed audit log that names
//! the first bad entry when anything is edited, dropped, reordered or
//! inserted, and that holds no biometric data and no subject id.

mod common;
use bioseal::{AuditEvent, AuditOutcome, Consent, Error, Purpose, ShredPolicy, Store};
use common::*;
use std::path::Path;

/// A long mixed run; returns the fixture and the vectors used.
fn mixed_run() -> (Fixture, Vec<Vec<f32>>) {
    let f = Fixture::new(8);
    let mut rng = Rng(21);
    let vecs: Vec<Vec<f32>> = (0..30).map(|_| rng.unit(DIM)).collect();
    {
        let store = Store::open(f.config().max_inactivity(DAY * 40)).expect("open");
        for (i, v) in vecs.iter().enumerate() {
            let purposes = if i % 2 == 0 {
                vec![IDV]
            } else {
                vec![IDV, Purpose::IMPERSONATION_CHECK]
            };
            let c = Consent::new(purposes)
                .expires_at(f.now().saturating_add(DAY * (20 + i as u32)))
                .evidence([9; 32]);
            store
                .enroll(&format!("subject-{i}@example.org"), emb(v), c)
                .expect("enroll");
        }
        for round in 0..3 {
            for (i, v) in vecs.iter().enumerate() {
                let s = format!("subject-{i}@example.org");
                let probe = if (i + round) % 3 == 0 {
                    rng.unit(DIM)
                } else {
                    rng.noisy(v, 0.2)
                };
                let _ = store.verify(&s, &IDV, emb(&probe));
            }
            f.clock.advance(DAY);
        }
        for i in (0..30).step_by(7) {
            store
                .revoke(&format!("subject-{i}@example.org"))
                .expect("revoke");
        }
        store
            .withdraw_purpose("subject-1@example.org", &Purpose::IMPERSONATION_CHECK)
            .expect("withdraw");
        store
            .renew_consent("subject-2@example.org", consent(f.now(), 60))
            .expect("renew");
        let _ = store.verify("nobody", &IDV, emb(&vecs[0]));
        let _ = store.verify(
            "subject-4@example.org",
            &Purpose::IMPERSONATION_CHECK,
            emb(&vecs[4]),
        );
        f.clock.advance(DAY * 20);
        store.sweep().expect("sweep");
    }
    {
        // Reopen with deferred shredding and go on appending.
        let store = Store::open(f.config().shred_policy(ShredPolicy::Deferred)).expect("reopen");
        store.revoke("subject-2@example.org").expect("revoke");
        store.shred().expect("shred");
    }
    (f, vecs)
}

fn raw_audit(dir: &Path) -> (sled::Db, sled::Tree) {
    let db = sled::open(dir.join("db")).expect("raw sled");
    let t = db.open_tree("audit").expect("tree");
    (db, t)
}

#[test]
fn chain_verifies_after_a_long_mixed_run_and_records_every_kind() {
    let (f, _) = mixed_run();
    let store = f.open();
    let head = store.audit().verify_chain().expect("chain");
    let entries = store.audit().entries().expect("entries");
    assert_eq!(head.entries as usize, entries.len());
    assert!(entries.len() > 130, "{}", entries.len());
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64);
    }
    for kind in [
        AuditEvent::Enroll,
        AuditEvent::Verify,
        AuditEvent::Revoke,
        AuditEvent::Expire,
        AuditEvent::Sweep,
        AuditEvent::Shred,
        AuditEvent::ConsentRenewed,
        AuditEvent::PurposeWithdrawn,
        AuditEvent::KeyRotation,
    ] {
        assert!(entries.iter().any(|e| e.event == kind), "no {kind:?} entry");
    }
    for outcome in [
        AuditOutcome::Match,
        AuditOutcome::NoMatch,
        AuditOutcome::NotEnrolled,
        AuditOutcome::PurposeNotConsented,
        AuditOutcome::ShredPending,
        AuditOutcome::Shredded,
    ] {
        assert!(
            entries.iter().any(|e| e.outcome == Some(outcome)),
            "no {outcome:?} outcome"
        );
    }
    let verifies = entries
        .iter()
        .filter(|e| e.event == AuditEvent::Verify)
        .count();
    assert_eq!(verifies, 3 * 30 + 2);
    // Every rotation is logged with its bucket and generation.
    assert!(entries
        .iter()
        .filter(|e| e.event == AuditEvent::KeyRotation)
        .all(|e| e.bucket.is_some() && e.generation.is_some()));
}

/// Apply `edit` to the audit tree of a fresh copy of `pristine`, then check
/// that the chain is reported broken at `want`.
fn expect_broken_at(pristine: &Path, want: u64, edit: impl FnOnce(&sled::Tree)) {
    let f = Fixture::new(8);
    std::fs::remove_dir_all(f.data.path()).expect("rm");
    copy_dir(pristine, f.data.path());
    {
        let (db, t) = raw_audit(f.data.path());
        edit(&t);
        db.flush().expect("flush");
    }
    let store = Store::open(f.config_at(f.data.path())).expect("open");
    match store.audit().verify_chain() {
        Err(Error::AuditChainBroken { seq }) => assert_eq!(seq, want),
        other => panic!("expected a break at {want}, got {other:?}"),
    }
}

fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

#[test]
fn any_single_edit_drop_reorder_or_insert_is_found_at_its_sequence_number() {
    let (f, _) = mixed_run();
    let n = f.open().audit().verify_chain().expect("chain").entries;
    // The same fixture key opens every copy.
    let pristine = f.data.path();
    for k in [0, 1, n / 2, n - 2] {
        // Edit one byte of entry k (in its sealed body and in its MAC).
        for at in [0usize, 20, usize::MAX] {
            expect_broken_at(pristine, k, |t| {
                let mut v = t.get(key(k)).expect("get").expect("entry").to_vec();
                let i = if at == usize::MAX { v.len() - 1 } else { at };
                v[i] ^= 0x10;
                t.insert(key(k), v).expect("insert");
            });
        }
        // Drop entry k.
        expect_broken_at(pristine, k, |t| {
            t.remove(key(k)).expect("remove");
        });
        // Swap entries k and k+1.
        expect_broken_at(pristine, k, |t| {
            let a = t.get(key(k)).expect("get").expect("a");
            let b = t.get(key(k + 1)).expect("get").expect("b");
            t.insert(key(k), b).expect("insert");
            t.insert(key(k + 1), a).expect("insert");
        });
        // Insert a (replayed) entry at k, shifting the rest up by one.
        expect_broken_at(pristine, k, |t| {
            for j in (k..n).rev() {
                let v = t.get(key(j)).expect("get").expect("v");
                t.insert(key(j + 1), v).expect("insert");
            }
            let replay = t.get(key((k + 5) % n)).expect("get").expect("v");
            t.insert(key(k), replay).expect("insert");
        });
    }
    // An entry appended by someone without the key.
    expect_broken_at(pristine, n, |t| {
        let v = t.get(key(n - 1)).expect("get").expect("v");
        t.insert(key(n), v).expect("insert");
    });
}

#[test]
fn truncation_is_found_against_an_anchored_head() {
    let (f, _) = mixed_run();
    let anchor = f.open().audit().verify_chain().expect("chain");
    {
        let (db, t) = raw_audit(f.data.path());
        for j in anchor.entries - 3..anchor.entries {
            t.remove(key(j)).expect("remove");
        }
        db.flush().expect("flush");
    }
    let store = f.open();
    let shorter = store
        .audit()
        .verify_chain()
        .expect("a shorter chain is still a chain");
    assert_eq!(shorter.entries, anchor.entries - 3);
    assert!(matches!(
        store.audit().verify_against(&anchor),
        Err(Error::AuditChainBroken { .. })
    ));
    // Against its own head it verifies.
    store.audit().verify_against(&shorter).expect("own head");
}

#[test]
fn export_is_json_lines_without_ids_or_biometric_data() {
    let (f, vecs) = mixed_run();
    let store = f.open();
    let mut out = Vec::new();
    let lines = store.audit().export(&mut out).expect("export");
    let text = String::from_utf8(out.clone()).expect("utf8");
    assert_eq!(text.lines().count() as u64, lines);
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(v["seq"], i as u64);
        assert!(v["event"].is_string() && v["mac"].as_str().is_some_and(|m| m.len() == 64));
    }
    assert!(
        text.contains("\"event\":\"verify\"")
            && text.contains("\"purpose\":\"identity-verification\"")
    );
    for (i, v) in vecs.iter().enumerate() {
        assert!(
            !text.contains(&format!("subject-{i}@")),
            "subject id in export"
        );
        for x in &v[..8] {
            assert!(
                !text.contains(&format!("{x}")),
                "embedding value {x} in export"
            );
        }
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(!contains(&out, &bytes[..16]));
    }
    assert!(!text.contains("example.org"));
    // The files at rest hold no purpose name either: the entries are sealed.
    for (path, data) in read_all_files(f.data.path()) {
        assert!(
            !contains(&data, b"identity-verification"),
            "{}",
            path.display()
        );
        assert!(!contains(&data, b"example.org"), "{}", path.display());
    }
}

#[test]
fn a_broken_chain_is_not_exported() {
    let (f, _) = mixed_run();
    {
        let (db, t) = raw_audit(f.data.path());
        t.remove(key(3)).expect("remove");
        db.flush().expect("flush");
    }
    let mut out = Vec::new();
    assert!(matches!(
        f.open().audit().export(&mut out),
        Err(Error::AuditChainBroken { seq: 3 })
    ));
    assert!(out.is_empty());
}
