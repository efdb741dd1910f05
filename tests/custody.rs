//! Split custody (SECURITY.md §17): a subject whose templates open only with
//! the person's user key. Its life on both backends and across key epochs;
//! wrong keys under the attempt limits, never telling whether the face
//! would have matched; retention and revocation without the key; a
//! tampered templates section told apart from a wrong key.

mod common;
use bioseal::{
    AuditEvent, AuditOutcome, Decision, Error, FileEpochProvider, Purpose, Store, UserKey,
    Withdrawal,
};
use common::*;
use std::time::Duration;

fn key_bytes(seed: u8) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed
            .wrapping_mul(31)
            .wrapping_add((i as u8).wrapping_mul(7))
            .wrapping_add(1);
    }
    b
}

fn user_key(seed: u8) -> UserKey {
    UserKey::from_bytes(key_bytes(seed)).expect("user key")
}

fn verify_with(store: &Store, s: &str, probe: &[f32], key: &UserKey) -> Result<Decision, Error> {
    store.verify_with(s, &IDV, emb(probe), key)
}

/// The event and outcome of every audit entry about verification, in order.
fn verify_outcomes(store: &Store) -> Vec<Option<AuditOutcome>> {
    store
        .audit()
        .entries()
        .expect("audit")
        .into_iter()
        .filter(|e| e.event == AuditEvent::Verify)
        .map(|e| e.outcome)
        .collect()
}

fn split_subject_lifecycle(k: Kind) {
    let f = Fixture::with(k, 16);
    let store = f.open();
    let mut rng = Rng(21);
    let alice = rng.unit(DIM);
    let bob = rng.unit(DIM);
    let (key, wrong) = (user_key(1), user_key(2));
    store
        .enroll_with("alice", emb(&alice), consent(f.now(), 365), &key)
        .expect("enroll");
    store
        .enroll("bob", emb(&bob), consent(f.now(), 365))
        .expect("enroll server custody");
    // Enrolled once: a second enrollment is refused whatever its custody.
    assert!(matches!(
        store.enroll_with("alice", emb(&alice), consent(f.now(), 365), &key),
        Err(Error::AlreadyEnrolled)
    ));

    // The right key: genuine matches, an impostor does not.
    for _ in 0..4 {
        let probe = rng.noisy(&alice, 0.3);
        assert_eq!(
            verify_with(&store, "alice", &probe, &key).expect("verify"),
            Decision::Match
        );
    }
    assert_eq!(
        verify_with(&store, "alice", &bob, &key).expect("verify"),
        Decision::NoMatch
    );
    // A wrong key, or none, is WrongUserKey for the genuine face and an
    // impostor alike.
    assert!(matches!(
        verify_with(&store, "alice", &alice, &wrong),
        Err(Error::WrongUserKey)
    ));
    assert!(matches!(
        verify_with(&store, "alice", &bob, &wrong),
        Err(Error::WrongUserKey)
    ));
    assert!(matches!(
        store.verify("alice", &IDV, emb(&alice)),
        Err(Error::WrongUserKey)
    ));
    // A key for a server-custody subject is refused and spends nothing.
    assert!(matches!(
        verify_with(&store, "bob", &bob, &key),
        Err(Error::NotSplitCustody)
    ));
    assert!(matches!(
        store.rekey("bob", &key, &wrong),
        Err(Error::NotSplitCustody)
    ));
    assert_eq!(
        store.verify("bob", &IDV, emb(&bob)).expect("verify"),
        Decision::Match
    );

    // A template added with the key; the subject then matches a face close
    // to the new template only.
    let later = rng.noisy(&alice, 1.2);
    let probe = rng.noisy(&alice, 0.3);
    assert_eq!(
        store
            .add_template_with("alice", &IDV, emb(&probe), emb(&later), &key)
            .expect("add"),
        Decision::Match
    );
    assert!(matches!(
        store.add_template("alice", &IDV, emb(&probe), emb(&later)),
        Err(Error::WrongUserKey)
    ));

    // Consent changes, status and a purpose withdrawal need no key.
    let status = store.consent_status("alice").expect("status");
    assert!(status.purposes.contains(&IDV));
    assert_eq!(status.custody, bioseal::Custody::Split);
    assert_eq!(
        store.consent_status("bob").expect("status").custody,
        bioseal::Custody::Server
    );
    store
        .renew_consent(
            "alice",
            bioseal::Consent::new([IDV, Purpose::IMPERSONATION_CHECK])
                .expires_at(f.now().saturating_add(DAY * 200))
                .evidence([0xab; 32]),
        )
        .expect("renew");
    assert!(matches!(
        store.withdraw_purpose("alice", &Purpose::IMPERSONATION_CHECK),
        Ok(Withdrawal::Remaining(_))
    ));
    assert!(matches!(
        store.verify_with("alice", &Purpose::IMPERSONATION_CHECK, emb(&alice), &key),
        Err(Error::PurposeNotConsented)
    ));
    store.reset_attempts("alice").expect("reset");

    // Reopened: the same answers.
    drop(store);
    let store = f.open();
    assert_eq!(
        verify_with(&store, "alice", &later, &key).expect("verify"),
        Decision::Match
    );
    assert!(matches!(
        verify_with(&store, "alice", &alice, &wrong),
        Err(Error::WrongUserKey)
    ));

    // The person changes the key: the old one no longer opens anything.
    let new = user_key(3);
    assert!(matches!(
        store.rekey("alice", &wrong, &new),
        Err(Error::WrongUserKey)
    ));
    store.rekey("alice", &key, &new).expect("rekey");
    assert!(matches!(
        verify_with(&store, "alice", &alice, &key),
        Err(Error::WrongUserKey)
    ));
    assert_eq!(
        verify_with(&store, "alice", &alice, &new).expect("verify"),
        Decision::Match
    );
    assert_eq!(
        verify_with(&store, "alice", &later, &new).expect("verify"),
        Decision::Match
    );

    // Revoke needs no key.
    store.revoke("alice").expect("revoke");
    assert!(matches!(
        verify_with(&store, "alice", &alice, &new),
        Err(Error::NotEnrolled)
    ));
    let changes: Vec<_> = store
        .audit()
        .entries()
        .expect("audit")
        .into_iter()
        .filter(|e| e.event == AuditEvent::UserKeyChanged)
        .map(|e| e.outcome)
        .collect();
    assert_eq!(
        changes,
        [
            Some(AuditOutcome::NotSplitCustody),
            Some(AuditOutcome::WrongUserKey),
            Some(AuditOutcome::Ok)
        ]
    );
    let v = verify_outcomes(&store);
    assert_eq!(
        v.iter()
            .filter(|o| **o == Some(AuditOutcome::WrongUserKey))
            .count(),
        6,
        "{v:?}"
    );
    store.audit().verify_chain().expect("chain");
}

/// Wrong keys count under the attempt limits exactly as NoMatch does, and
/// a wrong key with the genuine face leaves the store in the same state as
/// a wrong key with an impostor's: the same error, the same audit entries,
/// the same counter (seen through when the lockout starts).
fn wrong_keys_count_and_never_tell_the_face(k: Kind) {
    let mut rng = Rng(22);
    let alice = rng.unit(DIM);
    let impostor = rng.unit(DIM);
    let (key, wrong) = (user_key(4), user_key(5));
    let mut runs = Vec::new();
    for probe in [&alice, &impostor] {
        let f = Fixture::with(k, 8);
        let store = f.open();
        store
            .enroll_with("alice", emb(&alice), consent(f.now(), 365), &key)
            .expect("enroll");
        let mut seen = Vec::new();
        // Five wrong keys (the soft limit): each counted.
        for _ in 0..5 {
            seen.push(format!("{:?}", verify_with(&store, "alice", probe, &wrong)));
        }
        // Then the right key and the genuine face are locked out.
        seen.push(format!("{:?}", verify_with(&store, "alice", &alice, &key)));
        f.clock.advance(Duration::from_secs(31));
        // After the wait, one more failure is allowed (a NoMatch this time)
        // and then the lockout again.
        seen.push(format!(
            "{:?}",
            verify_with(&store, "alice", &impostor, &key)
        ));
        seen.push(format!("{:?}", verify_with(&store, "alice", &alice, &key)));
        runs.push((seen, verify_outcomes(&store)));
    }
    assert_eq!(
        runs[0], runs[1],
        "the face behind a wrong key changes nothing"
    );
    let (seen, audit) = &runs[0];
    assert!(
        seen[..5].iter().all(|s| s == "Err(WrongUserKey)"),
        "{seen:?}"
    );
    assert!(seen[5].starts_with("Err(LockedOut"), "{seen:?}");
    assert_eq!(seen[6], "Ok(NoMatch)");
    assert!(seen[7].starts_with("Err(LockedOut"), "{seen:?}");
    assert_eq!(audit.len(), 8);
    // Counters survive a restart: the hard limit reached with wrong keys
    // (50 failures) disables the subject.
    let f = Fixture::with(k, 8);
    {
        let store = f.open();
        store
            .enroll_with("alice", emb(&alice), consent(f.now(), 365), &key)
            .expect("enroll");
    }
    for _ in 0..50 {
        let store = f.open();
        let _ = verify_with(&store, "alice", &alice, &wrong);
        f.clock.advance(Duration::from_secs(31));
    }
    let store = f.open();
    assert!(matches!(
        verify_with(&store, "alice", &alice, &key),
        Err(Error::VerificationDisabled)
    ));
    store
        .reset_attempts("alice")
        .expect("operator reset, no key");
    assert_eq!(
        verify_with(&store, "alice", &alice, &key).expect("verify"),
        Decision::Match
    );
}

/// Retention works without the key: a split subject past its consent
/// expiry or its inactivity limit is destroyed by the sweep.
fn retention_without_the_key(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let mut rng = Rng(23);
    let (a, b) = (rng.unit(DIM), rng.unit(DIM));
    let key = user_key(6);
    store
        .enroll_with("short", emb(&a), consent(f.now(), 10), &key)
        .expect("enroll");
    store
        .enroll_with("long", emb(&b), consent(f.now(), 365), &key)
        .expect("enroll");
    f.clock.advance(DAY * 11);
    let report = store.sweep().expect("sweep");
    assert_eq!(report.expired, 1);
    assert!(matches!(
        verify_with(&store, "short", &a, &key),
        Err(Error::NotEnrolled)
    ));
    assert_eq!(
        verify_with(&store, "long", &b, &key).expect("verify"),
        Decision::Match
    );
}

/// An altered templates section is Tampered (the payload's digest), not a
/// wrong key, and costs no attempt; a wrong key is never Tampered.
fn tampered_templates_are_not_a_wrong_key(k: Kind) {
    let f = Fixture::with(k, 8);
    let mut rng = Rng(24);
    let alice = rng.unit(DIM);
    let key = user_key(7);
    {
        let store = f.open();
        store
            .enroll_with("alice", emb(&alice), consent(f.now(), 365), &key)
            .expect("enroll");
    }
    let (rk, rec) = f
        .raw_rows("records")
        .into_iter()
        .find(|(k, v)| k.first() == Some(&b'S') && v.len() > 200)
        .expect("the record");
    // version 1 | payload length 4 | payload | templates length 4 | templates | state
    let l = u32::from_be_bytes(rec[1..5].try_into().expect("4")) as usize;
    let t_at = 5 + l;
    let t = u32::from_be_bytes(rec[t_at..t_at + 4].try_into().expect("4")) as usize;
    assert!(
        t > 2 * DIM,
        "the templates live in their own section ({t} bytes)"
    );
    let mut bad = rec.clone();
    bad[t_at + 4 + t / 2] ^= 1;
    f.raw_put("records", &rk, Some(&bad));
    let store = f.open();
    assert!(matches!(
        verify_with(&store, "alice", &alice, &key),
        Err(Error::Tampered { .. })
    ));
    drop(store);
    f.raw_put("records", &rk, Some(&rec));
    let store = f.open();
    assert_eq!(
        verify_with(&store, "alice", &alice, &key).expect("verify"),
        Decision::Match
    );
}

/// With key epochs: a roll re-seals the keyring and the split subject still
/// opens with its key; a backup restored after a user-key change removes
/// that subject (the change is in the revocation ledger), while an
/// unchanged split subject comes back, still needing its key.
fn across_epochs_and_restore(k: Kind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("key dir");
    let config = |data: &std::path::Path| {
        let provider = FileEpochProvider::open(keys.join("bioseal.epochs")).expect("epochs");
        bioseal::StoreConfig::new(data, provider)
            .key_dir(&keys)
            .model(MODEL, DIM)
            .threshold(bioseal::Threshold::cosine(0.5))
            .buckets(4)
    };
    let data = match k {
        Kind::Sled => dir.join("data"),
        Kind::Postgres => std::path::PathBuf::from(pg::fresh_database()),
    };
    let now = bioseal::Clock::now(&bioseal::SystemClock);
    let mut rng = Rng(25);
    let (a, b) = (rng.unit(DIM), rng.unit(DIM));
    let (key, new) = (user_key(8), user_key(9));
    {
        let store = Store::open(config(&data)).expect("open");
        store
            .enroll_with("a", emb(&a), consent(now, 365), &key)
            .expect("enroll");
        store
            .enroll_with("b", emb(&b), consent(now, 365), &key)
            .expect("enroll");
        store.roll_epoch().expect("roll");
        assert_eq!(
            verify_with(&store, "a", &a, &key).expect("verify"),
            Decision::Match
        );
        store.backup(dir.join("backup")).expect("backup");
        store.rekey("a", &key, &new).expect("rekey");
        assert_eq!(
            verify_with(&store, "a", &a, &new).expect("verify"),
            Decision::Match
        );
    }
    // The disaster: the data is lost, the key directory survives.
    match k {
        Kind::Sled => std::fs::remove_dir_all(&data).expect("lose the data"),
        Kind::Postgres => pg::client(&data.to_string_lossy())
            .batch_execute(
                "DELETE FROM bioseal.records; DELETE FROM bioseal.keys; \
                 DELETE FROM bioseal.meta; DELETE FROM bioseal.audit;",
            )
            .expect("lose the data"),
    }
    let (store, report) = Store::restore(dir.join("backup"), config(&data)).expect("restore");
    assert_eq!(report.replayed, 1);
    for kk in [&key, &new] {
        assert!(matches!(
            verify_with(&store, "a", &a, kk),
            Err(Error::NotEnrolled)
        ));
    }
    assert!(matches!(
        verify_with(&store, "b", &b, &new),
        Err(Error::WrongUserKey)
    ));
    assert_eq!(
        verify_with(&store, "b", &b, &key).expect("verify"),
        Decision::Match
    );
    store.roll_epoch().expect("roll after restore");
    assert_eq!(
        verify_with(&store, "b", &b, &key).expect("verify"),
        Decision::Match
    );
}

/// Every answer a split-custody call can give about a subject writes the
/// same thing: one bucket rotation, as a `NoMatch` does (SECURITY.md §11,
/// §17). A key given for a server-custody subject, an unknown subject, a
/// locked-out one, a wrong key, for verify and for rekey alike: latency
/// does not tell them apart.
fn every_refusal_costs_one_rotation(k: Kind) {
    let f = Fixture::with(k, 8);
    let store = f.open();
    let mut rng = Rng(27);
    let (a, b) = (rng.unit(DIM), rng.unit(DIM));
    let (key, wrong) = (user_key(12), user_key(13));
    store
        .enroll_with("split", emb(&a), consent(f.now(), 365), &key)
        .expect("enroll");
    store
        .enroll("server", emb(&b), consent(f.now(), 365))
        .expect("enroll");
    let rotations = |store: &Store| {
        store
            .audit()
            .entries()
            .expect("audit")
            .iter()
            .filter(|e| e.event == AuditEvent::KeyRotation)
            .count()
    };
    type Call<'a> = Box<dyn Fn() -> String + 'a>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "NoMatch",
            Box::new(|| format!("{:?}", verify_with(&store, "split", &b, &key))),
        ),
        (
            "wrong key",
            Box::new(|| format!("{:?}", verify_with(&store, "split", &a, &wrong))),
        ),
        (
            "server custody",
            Box::new(|| format!("{:?}", verify_with(&store, "server", &b, &key))),
        ),
        (
            "unknown",
            Box::new(|| format!("{:?}", verify_with(&store, "nobody", &b, &key))),
        ),
        (
            "rekey wrong key",
            Box::new(|| format!("{:?}", store.rekey("split", &wrong, &key))),
        ),
        (
            "rekey server custody",
            Box::new(|| format!("{:?}", store.rekey("server", &key, &wrong))),
        ),
        (
            "rekey unknown",
            Box::new(|| format!("{:?}", store.rekey("nobody", &key, &wrong))),
        ),
    ];
    for (what, call) in &calls {
        let before = rotations(&store);
        let r = call();
        assert!(r.starts_with("Err") || r == "Ok(NoMatch)", "{what}: {r}");
        assert_eq!(rotations(&store) - before, 1, "{what}: {r}");
    }
    // Locked out (three failures so far plus two more): refused, one
    // rotation, for verify and rekey.
    let _ = verify_with(&store, "split", &b, &key);
    let _ = verify_with(&store, "split", &b, &key);
    for (what, r) in [
        (
            "locked out",
            format!("{:?}", verify_with(&store, "split", &a, &key)),
        ),
        (
            "rekey locked out",
            format!("{:?}", store.rekey("split", &key, &wrong)),
        ),
    ] {
        assert!(r.starts_with("Err(LockedOut"), "{what}: {r}");
    }
    let before = rotations(&store);
    let _ = verify_with(&store, "split", &a, &key);
    let _ = store.rekey("split", &key, &wrong);
    assert_eq!(rotations(&store) - before, 2);
}

/// An existing server-custody subject moved to split custody (the
/// migration of a service's existing users): afterwards only the key opens
/// its templates, the move is audited and refused a second time, and the
/// subject's older record, spliced back, matches with nothing (its DEK is
/// gone with the rotation).
fn moving_a_server_subject_to_split_custody(k: Kind) {
    let f = Fixture::with(k, 8);
    let mut rng = Rng(28);
    let carol = rng.unit(DIM);
    let key = user_key(14);
    {
        let store = f.open();
        store
            .enroll("carol", emb(&carol), consent(f.now(), 365))
            .expect("enroll");
        assert_eq!(
            store.verify("carol", &IDV, emb(&carol)).expect("verify"),
            Decision::Match
        );
    }
    let record = |rows: Vec<(Vec<u8>, Vec<u8>)>| {
        rows.into_iter()
            .find(|(k, v)| k.first() == Some(&b'S') && v.len() > 200)
            .expect("the record")
    };
    let (rk, before) = record(f.raw_rows("records"));
    f.open().move_to_split_custody("carol", &key).expect("move");
    let (_, after) = record(f.raw_rows("records"));
    // The server-custody record from before the move, spliced back with a
    // plain write at once: it does not open, with or without the key.
    f.raw_put("records", &rk, Some(&before));
    {
        let store = f.open();
        for r in [
            store.verify("carol", &IDV, emb(&carol)),
            verify_with(&store, "carol", &carol, &key),
        ] {
            assert!(
                matches!(
                    r,
                    Err(Error::Tampered { .. } | Error::KeyUnavailable { .. })
                ),
                "{r:?}"
            );
        }
    }
    f.raw_put("records", &rk, Some(&after));
    let store = f.open();
    assert_eq!(
        verify_with(&store, "carol", &carol, &key).expect("verify"),
        Decision::Match
    );
    assert!(matches!(
        store.verify("carol", &IDV, emb(&carol)),
        Err(Error::WrongUserKey)
    ));
    assert!(matches!(
        verify_with(&store, "carol", &carol, &user_key(15)),
        Err(Error::WrongUserKey)
    ));
    assert_eq!(
        store.consent_status("carol").expect("status").custody,
        bioseal::Custody::Split
    );
    assert!(matches!(
        store.move_to_split_custody("carol", &key),
        Err(Error::AlreadySplitCustody)
    ));
    assert!(matches!(
        store.move_to_split_custody("nobody", &key),
        Err(Error::NotEnrolled)
    ));
    let moved: Vec<_> = store
        .audit()
        .entries()
        .expect("audit")
        .into_iter()
        .filter(|e| e.event == AuditEvent::CustodyMovedToSplit)
        .map(|e| e.outcome)
        .collect();
    assert_eq!(moved, [Some(AuditOutcome::Ok)]);
}

on_both_backends!(
    moving_a_server_subject_to_split_custody,
    every_refusal_costs_one_rotation,
    split_subject_lifecycle,
    wrong_keys_count_and_never_tell_the_face,
    retention_without_the_key,
    tampered_templates_are_not_a_wrong_key,
    across_epochs_and_restore,
    the_operator_with_every_key_opens_no_split_template,
);

/// Every distinct 32-byte window of every file below `dir`.
fn windows(dir: &std::path::Path, into: &mut std::collections::HashSet<[u8; 32]>) -> usize {
    let mut bytes = 0;
    for (_, data) in read_all_files(dir) {
        bytes += data.len();
        for w in data.windows(32) {
            into.insert(w.try_into().expect("32"));
        }
    }
    bytes
}

/// The adversary "operator with every key" (SECURITY.md §17): with the
/// epoch root key, the keyring and every KEK in it, the subject's DEK and
/// its server half, and every file of the data directory, the key
/// directory and a backup, a split subject's templates do not open. Every
/// 32-byte window of every file and every operator-held key is tried as
/// the template key itself, as the user key combined with the real server
/// half through the HKDF the code uses, and as the server half combined
/// with each operator-held key. Positive controls: the real user key opens
/// them, today's and the backup's; a user key planted in a file is found.
fn the_operator_with_every_key_opens_no_split_template(k: Kind) {
    use bioseal::forensics::{backup_subject_records, keyring_keks};
    use std::collections::HashSet;
    let f = Fixture::with(k, 4);
    let epochs = f.secrets.path().join("bioseal.epochs");
    let location = match &f.url {
        Some(u) => std::path::PathBuf::from(u),
        None => f.data.path().to_path_buf(),
    };
    let config = || f.config_with(&location, FileEpochProvider::open(&epochs).expect("epochs"));
    let mut rng = Rng(26);
    let victim = rng.unit(DIM);
    let key = user_key(10);
    let backup = tempfile::tempdir().expect("tempdir");
    let (dek, half, today) = {
        let store = Store::open(config()).expect("open");
        store
            .enroll_with("victim", emb(&victim), consent(f.now(), 365), &key)
            .expect("enroll");
        for i in 0..10 {
            let v = rng.unit(DIM);
            if i % 2 == 0 {
                store
                    .enroll(&format!("server-{i}"), emb(&v), consent(f.now(), 365))
                    .expect("enroll");
            } else {
                store
                    .enroll_with(
                        &format!("split-{i}"),
                        emb(&v),
                        consent(f.now(), 365),
                        &user_key(40 + i),
                    )
                    .expect("enroll");
            }
        }
        // Older record versions in the files: a match, a NoMatch (re-keyed),
        // a wrong key (re-keyed), a template added, a consent renewal.
        let probe = rng.noisy(&victim, 0.3);
        assert_eq!(
            verify_with(&store, "victim", &probe, &key).expect("verify"),
            Decision::Match
        );
        let other = rng.unit(DIM);
        assert_eq!(
            verify_with(&store, "victim", &other, &key).expect("verify"),
            Decision::NoMatch
        );
        assert!(matches!(
            verify_with(&store, "victim", &victim, &user_key(11)),
            Err(Error::WrongUserKey)
        ));
        let more = rng.noisy(&victim, 0.5);
        assert_eq!(
            store
                .add_template_with("victim", &IDV, emb(&probe), emb(&more), &key)
                .expect("add"),
            Decision::Match
        );
        store
            .renew_consent("victim", consent(f.now(), 300))
            .expect("renew");
        store.backup(backup.path().join("b")).expect("backup");
        let dek = bioseal::__test::dek(&store, "victim").expect("dek");
        let half = bioseal::__test::split_half(&store, "victim")
            .expect("half")
            .expect("split custody");
        (
            dek,
            half,
            bioseal::__test::subject_records(&store).expect("records"),
        )
    };
    if k == Kind::Sled {
        // The auditor's own path reads the same records from a copy of the
        // files.
        let scratch = tempfile::tempdir().expect("tempdir");
        copy_dir(f.data.path(), scratch.path());
        let from_files = bioseal::forensics::subject_records(scratch.path()).expect("records");
        assert_eq!(from_files.len(), today.len());
    }

    // The victim's sealed templates, today's and the backup's.
    let backed = backup_subject_records(backup.path().join("b")).expect("backup records");
    let pseudonym = {
        let splits: Vec<_> = today.iter().filter(|r| r.templates.is_some()).collect();
        assert_eq!(splits.len(), 6, "six split subjects");
        assert_eq!(today.len() - splits.len(), 5, "five in server custody");
        // The victim is the split subject whose key derivation with the
        // real half and key opens its templates (positive control).
        splits
            .iter()
            .find(|r| {
                r.templates
                    .as_ref()
                    .is_some_and(|t| t.opens_with(&r.split_key(&half, &key_bytes(10))))
            })
            .expect("the real user key opens the victim's templates")
            .pseudonym
    };
    let targets: Vec<_> = today
        .iter()
        .chain(&backed)
        .filter(|r| r.pseudonym == pseudonym)
        .collect();
    assert_eq!(targets.len(), 2, "today's record and the backup's");
    for r in &targets {
        assert!(
            r.payload.opens_with(&dek),
            "the operator's DEK opens the payload"
        );
        let t = r.templates.as_ref().expect("split");
        assert!(t.opens_with(&r.split_key(&half, &key_bytes(10))));
    }

    // Everything the operator holds: every window of every file, and the
    // keys those files yield (the epoch root key, every KEK of the
    // keyring), the DEK and the server half.
    let mut cands = HashSet::new();
    let mut scanned = 0;
    for dir in [f.data.path(), f.secrets.path(), backup.path()] {
        scanned += windows(dir, &mut cands);
    }
    if k == Kind::Postgres {
        // The database: every row of every table, as a dump holds them.
        for table in ["records", "keys", "meta", "audit"] {
            for (key, value) in f.raw_rows(table) {
                for bytes in [key, value] {
                    scanned += bytes.len();
                    for w in bytes.windows(32) {
                        cands.insert(w.try_into().expect("32"));
                    }
                }
            }
        }
    }
    let keyring = f.raw_keyring();
    for w in keyring.windows(32) {
        cands.insert(w.try_into().expect("32"));
    }
    let keks: Vec<[u8; 32]> = cands
        .iter()
        .find_map(|w| keyring_keks(&keyring, w))
        .expect("the epoch file holds the root key that opens the keyring")
        .iter()
        .map(|k| **k)
        .collect();
    assert!(keks.len() >= 4, "{} KEKs", keks.len());
    let mut held: Vec<[u8; 32]> = keks;
    held.push(dek);
    held.push(half);
    // The root key is a window of the epoch file, already a candidate.
    cands.extend(held.iter().copied());
    // And every window of what the DEK decrypts: the payloads (consent,
    // server half, count, digest), today's and the backup's.
    for r in &targets {
        let plain = r.payload.open_with(&dek).expect("payload");
        assert!(
            plain.windows(32).any(|w| w == half),
            "the half is in the payload"
        );
        for w in plain.windows(32) {
            cands.insert(w.try_into().expect("32"));
        }
    }
    let opens = |w: &[u8; 32]| {
        targets.iter().any(|r| {
            let t = r.templates.as_ref().expect("split");
            t.opens_with(w)
                || t.opens_with(&r.split_key(&half, w))
                || held.iter().any(|k| t.opens_with(&r.split_key(w, k)))
        })
    };
    let opened = cands.iter().filter(|w| opens(w)).count();
    assert_eq!(
        opened, 0,
        "a byte string the operator holds opens a split template"
    );
    // Positive control of the scan itself: the user key, had it been stored
    // anywhere, would have been found.
    assert!(opens(&key_bytes(10)));
    eprintln!(
        "split custody scan: {scanned} bytes, {} distinct candidates, {} operator keys, none opens",
        cands.len(),
        held.len()
    );
}
