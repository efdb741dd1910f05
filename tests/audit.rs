//! Promise 8: every event is in a hash-chained, MACed audit log that names
//! the first bad entry when anything is edited, dropped, reordered or
//! inserted, and that holds no biometric data and no subject id.

mod common;
use bioseal::{AuditEvent, AuditOutcome, Consent, Error, Purpose, ShredPolicy, Store};
use common::*;

/// A long mixed run; returns the fixture and the vectors used.
fn mixed_run(k: Kind) -> (Fixture, Vec<Vec<f32>>) {
    let f = Fixture::with(k, 8);
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

fn chain_verifies_after_a_long_mixed_run_and_records_every_kind(k: Kind) {
    let (f, _) = mixed_run(k);
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

/// The stored audit log as raw entries (`sealed || mac`), grouped by
/// segment (key = first sequence number), in the format `src/audit.rs`
/// documents: each entry `len (u32 BE) || sealed || mac`.
type Segments = Vec<(u64, Vec<Vec<u8>>)>;

fn load(rows: &[(Vec<u8>, Vec<u8>)]) -> Segments {
    rows.iter()
        .map(|(k, v)| {
            let first = u64::from_be_bytes(k.as_slice().try_into().expect("8-byte key"));
            let mut entries = Vec::new();
            let mut rest = &v[..];
            while !rest.is_empty() {
                let len = u32::from_be_bytes(rest[..4].try_into().expect("len")) as usize;
                entries.push(rest[4..4 + len].to_vec());
                rest = &rest[4 + len..];
            }
            (first, entries)
        })
        .collect()
}

fn encode(segments: &Segments) -> Vec<(Vec<u8>, Vec<u8>)> {
    segments
        .iter()
        .map(|(first, entries)| {
            let mut v = Vec::new();
            for e in entries {
                v.extend_from_slice(&(e.len() as u32).to_be_bytes());
                v.extend_from_slice(e);
            }
            (first.to_be_bytes().to_vec(), v)
        })
        .collect()
}

/// Replace the stored audit log with `segments` (behind the store's back).
fn store(f: &Fixture, segments: &Segments) {
    f.set_raw_rows("audit", &encode(segments));
}

/// (segment, index within it) of entry `k`, counting entries in order.
fn locate(segments: &Segments, k: u64) -> (usize, usize) {
    let mut n = 0u64;
    for (si, (_, entries)) in segments.iter().enumerate() {
        if k < n + entries.len() as u64 {
            return (si, (k - n) as usize);
        }
        n += entries.len() as u64;
    }
    panic!("no entry {k}");
}

/// Apply `edit` to the stored audit entries (files or rows), check that
/// the chain is reported broken at `want`, then put the pristine log back.
fn expect_broken_at(
    f: &Fixture,
    pristine: &[(Vec<u8>, Vec<u8>)],
    want: u64,
    edit: impl FnOnce(&mut Segments),
) {
    let mut segments = load(pristine);
    edit(&mut segments);
    store(f, &segments);
    {
        // An edit that moves the entry the keyring anchored is refused at
        // open (RolledBack); accepted, the chain names the first broken
        // entry.
        let store = Store::open(f.config().accept_rollback(true)).expect("open");
        match store.audit().verify_chain() {
            Err(Error::AuditChainBroken { seq }) => assert_eq!(seq, want),
            other => panic!("expected a break at {want}, got {other:?}"),
        }
    }
    f.set_raw_rows("audit", pristine);
}

fn entry(segments: &mut Segments, k: u64) -> &mut Vec<u8> {
    let (si, ei) = locate(segments, k);
    &mut segments[si].1[ei]
}

fn any_single_edit_drop_reorder_or_insert_is_found_at_its_sequence_number(kind: Kind) {
    let (f, _) = mixed_run(kind);
    let n = f.open().audit().verify_chain().expect("chain").entries;
    let rows = f.raw_rows("audit");
    let segments = load(&rows);
    assert!(segments.len() > 1, "the log spans several segments");
    assert_eq!(segments.iter().map(|(_, e)| e.len() as u64).sum::<u64>(), n);
    let pristine = &rows;
    let f = &f;
    for k in [0, 1, n / 2, n - 2] {
        // Edit one byte of entry k (its nonce, its ciphertext, its MAC).
        for at in [0usize, 20, usize::MAX] {
            expect_broken_at(f, pristine, k, |segs| {
                let e = entry(segs, k);
                let i = if at == usize::MAX { e.len() - 1 } else { at };
                e[i] ^= 0x10;
            });
        }
        // Drop entry k.
        expect_broken_at(f, pristine, k, |segs| {
            let (si, ei) = locate(segs, k);
            segs[si].1.remove(ei);
        });
        // Swap entries k and k+1.
        expect_broken_at(f, pristine, k, |segs| {
            let a = entry(segs, k).clone();
            let b = std::mem::replace(entry(segs, k + 1), a);
            *entry(segs, k) = b;
        });
        // Insert a (replayed) entry at k, shifting the rest up by one.
        expect_broken_at(f, pristine, k, |segs| {
            let replay = entry(segs, (k + 5) % n).clone();
            let (si, ei) = locate(segs, k);
            segs[si].1.insert(ei, replay);
        });
    }
    // An entry appended by someone without the key.
    expect_broken_at(f, pristine, n, |segs| {
        let last = entry(segs, n - 1).clone();
        segs.last_mut().expect("segment").1.push(last);
    });
}

fn truncation_is_found_against_an_anchored_head(k: Kind) {
    let (f, _) = mixed_run(k);
    let anchor = f.open().audit().verify_chain().expect("chain");
    {
        let mut segs = load(&f.raw_rows("audit"));
        for _ in 0..3 {
            let last = segs.last_mut().expect("segment");
            last.1.pop();
            if last.1.is_empty() {
                segs.pop();
            }
        }
        store(&f, &segs);
    }
    // The keyring anchored the head at the last rotation: a truncated log
    // is refused at open, and opens only by accepting it (audited).
    assert!(matches!(
        Store::open(f.config()),
        Err(Error::RolledBack { .. })
    ));
    let store = Store::open(f.config().accept_rollback(true)).expect("accept");
    let shorter = store
        .audit()
        .verify_chain()
        .expect("a shorter chain is still a chain");
    assert_eq!(shorter.entries, anchor.entries - 3 + 1, "+ the acceptance");
    let last = store.audit().entries().expect("entries");
    assert_eq!(
        last.last().map(|e| e.event),
        Some(bioseal::AuditEvent::RollbackAccepted)
    );
    assert!(matches!(
        store.audit().verify_against(&anchor),
        Err(Error::AuditChainBroken { .. })
    ));
    // Against its own head it verifies.
    store.audit().verify_against(&shorter).expect("own head");
}

fn export_is_json_lines_without_ids_or_biometric_data(k: Kind) {
    let (f, vecs) = mixed_run(k);
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
    // The files (rows) at rest hold no purpose name either: the entries
    // are sealed.
    drop(store);
    let at_rest: Vec<(std::path::PathBuf, Vec<u8>)> = match k {
        Kind::Sled => read_all_files(f.data.path()),
        Kind::Postgres => ["records", "keys", "meta", "audit"]
            .iter()
            .flat_map(|t| {
                f.raw_rows(t)
                    .into_iter()
                    .map(move |(k, v)| (t.into(), [k, v].concat()))
            })
            .collect(),
    };
    for (path, data) in at_rest {
        assert!(
            !contains(&data, b"identity-verification"),
            "{}",
            path.display()
        );
        assert!(!contains(&data, b"example.org"), "{}", path.display());
    }
}

fn a_broken_chain_is_not_exported(k: Kind) {
    let (f, _) = mixed_run(k);
    {
        let mut segs = load(&f.raw_rows("audit"));
        let (si, ei) = locate(&segs, 3);
        segs[si].1.remove(ei);
        store(&f, &segs);
    }
    let mut out = Vec::new();
    assert!(matches!(
        f.open().audit().export(&mut out),
        Err(Error::AuditChainBroken { seq: 3 })
    ));
    assert!(out.is_empty());
}

on_both_backends!(
    chain_verifies_after_a_long_mixed_run_and_records_every_kind,
    any_single_edit_drop_reorder_or_insert_is_found_at_its_sequence_number,
    truncation_is_found_against_an_anchored_head,
    export_is_json_lines_without_ids_or_biometric_data,
    a_broken_chain_is_not_exported,
);
