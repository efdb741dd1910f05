//! Key tables, bucket KEK rotations, shreds and crash recovery.

use super::*;
use crate::crypto::keyring::{LedgerEntry, LedgerKind};

/// Most subjects one bucket holds (see [`Store::table_with`]).
pub(crate) const MAX_BUCKET_SUBJECTS: usize = 1 << 16;

/// A bucket's DEKs opened for a rotation, sorted by pseudonym.
pub(super) type Deks = Vec<(Pseudonym, Zeroizing<Vec<u8>>)>;

impl Store {
    /// Complete every pending shred (see [`ShredPolicy::Deferred`]). Returns
    /// the number of buckets rotated.
    pub fn shred(&self) -> Result<usize> {
        let mut n = 0;
        for group in storage::pending_buckets(&*self.db)?.chunks(ROTATION_GROUP) {
            let guards = self.lock_many(group)?;
            let mut work = Vec::new();
            for &b in group {
                if self
                    .db
                    .get(Table::Records, &storage::pending_key(b))?
                    .is_some()
                {
                    work.push((b, Vec::new()));
                }
            }
            if !work.is_empty() {
                self.rotate_many(&work, &guards.iter().collect::<Vec<_>>(), false, None, true)?;
                n += work.len();
            }
        }
        if n > 0 {
            self.log(
                self.now(),
                AuditEntry::new(AuditEvent::Shred)
                    .count(n as u64)
                    .outcome(AuditOutcome::Ok),
            )?;
            self.flush()?;
        }
        Ok(n)
    }

    /// Remove subjects of bucket `b`, shredding them as the policy says.
    /// Returns whether the bucket's KEK was rotated. A rotation is durable
    /// when this returns; a deferred removal is made durable by the caller's
    /// flush, which also covers the audit entry it appends.
    pub(super) fn destroy(
        &self,
        b: u32,
        ps: &[Pseudonym],
        guard: &BucketGuard<'_>,
    ) -> Result<bool> {
        match self.shred_policy {
            ShredPolicy::Immediate => {
                self.rotate_many(&[(b, ps.to_vec())], &[guard], false, None, true)?;
                Ok(true)
            }
            ShredPolicy::Deferred => {
                self.remove_deferred(b, ps)?;
                Ok(false)
            }
        }
    }

    /// Remove subjects of bucket `b` and mark the bucket's shred pending
    /// (caller holds the lock). Their key-table entries stay until the shred,
    /// which drops every entry without a record.
    pub(super) fn remove_deferred(&self, b: u32, ps: &[Pseudonym]) -> Result<()> {
        // The ledger before the removals (see `rotate_many`).
        let now = self.now().unix_secs();
        let ledger: Vec<LedgerEntry> = ps
            .iter()
            .map(|p| LedgerEntry {
                time: now,
                kind: LedgerKind::Destroyed,
                pseudonym: p.0,
            })
            .collect();
        self.keyring.append_ledger(&ledger)?;
        // The marker first: a crash part-way through the removals must not
        // leave a removed subject without a pending shred.
        let mut w = Writes::default();
        w.insert(storage::pending_key(b).as_slice(), &[][..]);
        for p in ps {
            self.remove_subject(&mut w, b, p)?;
        }
        w.apply(&*self.db)
    }

    /// Record a consent change of `p` in the revocation ledger, before it is
    /// written: a restore of an older backup must not bring the older
    /// consent back (it destroys the subject; see `Store::restore`).
    pub(super) fn ledger_consent_change(&self, p: &Pseudonym, now: Timestamp) -> Result<()> {
        self.keyring.append_ledger(&[LedgerEntry {
            time: now.unix_secs(),
            kind: LedgerKind::ConsentChanged,
            pseudonym: p.0,
        }])
    }

    /// Finish what a crash interrupted: half-done rotations, and (with
    /// immediate shredding) revocations whose rotation never started.
    pub(super) fn recover(&self) -> Result<()> {
        for b in self.keyring.interrupted() {
            let _guard = self.lock(b)?;
            // Shared mode: taking the lock may have finished it already.
            if self.keyring.is_rotating(b)? {
                self.complete_rotation(b)?;
            }
        }
        if self.shred_policy == ShredPolicy::Immediate {
            self.shred()?;
        }
        Ok(())
    }

    pub(super) fn unwrap_dek(
        &self,
        p: &Pseudonym,
        b: u32,
        generation: u64,
        wrapped: &[u8; WRAPPED_DEK_LEN],
    ) -> Result<Zeroizing<[u8; 32]>> {
        let aad = dek_aad(&self.keyring.header().store_id, p, b, generation);
        match self
            .keyring
            .with_kek(b, generation, |kek| kek.open(&aad, wrapped))?
        {
            Kek::Found(Ok(dek)) if dek.len() == 32 => {
                let mut out = Zeroizing::new([0u8; 32]);
                out.copy_from_slice(&dek);
                Ok(out)
            }
            Kek::Found(_) => Err(Error::tampered("wrapped data key")),
            Kek::Shredded => Err(Error::KeyUnavailable {
                what: "the key that wrapped this record was shredded",
            }),
            Kek::Unknown => Err(Error::tampered("bucket key table (key generation)")),
        }
    }

    pub(super) fn wrap_dek(
        &self,
        p: &Pseudonym,
        b: u32,
        dek: &[u8; 32],
    ) -> Result<(u64, [u8; WRAPPED_DEK_LEN])> {
        let store_id = self.keyring.header().store_id;
        self.keyring.with_newest(b, |gen, kek| {
            let sealed = kek.seal(&dek_aad(&store_id, p, b, gen), dek)?;
            Ok((gen, to_wrapped(&sealed)?))
        })?
    }

    /// The bucket's key table with `p`'s entry set to `dek`, wrapped under
    /// the newest KEK.
    ///
    /// A bucket holds at most [`MAX_BUCKET_SUBJECTS`] entries: that bounds
    /// what one KEK ever seals (its table at the rotation that created it,
    /// plus each enrollment since, each adding an entry; every removal
    /// under immediate shredding rotates) to 2^16 wraps, far inside the
    /// 2^32 random-nonce budget of AES-GCM.
    pub(super) fn table_with(&self, p: &Pseudonym, b: u32, dek: &[u8; 32]) -> Result<Vec<u8>> {
        let existing = match self.db.get(Table::Keys, &storage::key_table_key(b))? {
            Some(v) => Some(DekTable::decode(&v)?),
            None => None,
        };
        if existing
            .as_ref()
            .is_some_and(|t| t.entries.len() >= MAX_BUCKET_SUBJECTS)
        {
            return Err(Error::BucketFull {
                max: MAX_BUCKET_SUBJECTS,
            });
        }
        let (generation, wrapped) = self.wrap_dek(p, b, dek)?;
        let mut table = existing.unwrap_or_else(|| DekTable::new(generation));
        if table.generation != generation {
            return Err(Error::tampered("bucket key table (generation)"));
        }
        table.put(p, wrapped);
        Ok(table.encode())
    }

    /// Rotate the KEKs of distinct buckets, each locked by the caller,
    /// removing the listed subjects of each first. Three syncs for the whole
    /// group: the new KEK slots, sled's log, the old slots zeroed.
    ///
    /// Order: the keyring syncs the new slots before any sled write, so from
    /// then on a crash is completed on open ([`Store::recover`]); then the
    /// removals, each bucket's re-wrapped key table, and the pending markers.
    ///
    /// Strict rotations destroy nothing (a failure counted, a consent
    /// change, a refused or unknown-subject verify; see
    /// [`Store::open_table`]) and write in one sled transaction. With
    /// `rekey`, that subject (as the `Loaded` holds it, in the one bucket of
    /// `work`) is re-sealed under a fresh DEK in the same transaction (see
    /// [`Store::rekey_subject`]); without it, a strict rotation writes a
    /// record-sized stand-in instead, so that both cost the same.
    ///
    /// With `ledger`, the removed subjects enter the revocation ledger in
    /// the keyring's first sync (a restore's replay, which removes what the
    /// ledger already lists, passes false).
    pub(super) fn rotate_many(
        &self,
        work: &[(u32, Vec<Pseudonym>)],
        _guards: &[&BucketGuard<'_>],
        strict: bool,
        rekey: Option<(&Pseudonym, Loaded)>,
        ledger: bool,
    ) -> Result<()> {
        for (b, _) in work {
            if self.keyring.is_rotating(*b)? {
                self.complete_rotation(*b)?;
            }
        }
        let rekey = match rekey {
            Some((p, l)) => Some((p, l, random::<32>()?)),
            None => None,
        };
        // Every table is opened before the keyring changes: a strict
        // rotation that finds a table it cannot open changes nothing.
        let mut opened = Vec::with_capacity(work.len());
        for (b, remove) in work {
            let replace = rekey.as_ref().map(|(p, _, dek)| (*p, &**dek));
            opened.push(self.open_table(*b, remove, replace, strict)?);
        }
        let buckets: Vec<u32> = work.iter().map(|(b, _)| *b).collect();
        // Every subject this rotation destroys enters the revocation ledger
        // with the new KEKs, before any of its records go: a restore of an
        // older backup replays it (see `Store::restore`).
        let now_secs = self.now().unix_secs();
        let ledger: Vec<LedgerEntry> = work
            .iter()
            .filter(|_| ledger)
            .flat_map(|(_, remove)| remove.iter())
            .map(|p| LedgerEntry {
                time: now_secs,
                kind: LedgerKind::Destroyed,
                pseudonym: p.0,
            })
            .collect();
        let gens = self.keyring.begin_rotations(&buckets, &ledger)?;
        let mut w = Writes::default();
        for (((b, remove), &gen), deks) in work.iter().zip(&gens).zip(&opened) {
            for p in remove {
                self.remove_subject(&mut w, *b, p)?;
            }
            if let Some(d) = deks {
                w.put_table(*b, self.seal_table(*b, gen, d)?);
            }
            w.remove(storage::pending_key(*b).as_slice());
        }
        let rekeyed = rekey.is_some();
        if let (Some((p, l, dek)), Some(&b)) = (rekey, buckets.first()) {
            let l = Loaded {
                dek,
                sealed_payload: Vec::new(),
                ..l
            };
            self.put_subject(&mut w, p, b, &l, true)?;
        } else if strict {
            // A refused or unknown-subject verify writes as a no-match's
            // re-key does: random bytes the size of a record at one fixed
            // key, never anything about the caller's subject (SECURITY.md
            // §11).
            let mut stand_in = vec![0u8; self.decoy.record.len()];
            crate::crypto::fill_random(&mut stand_in)?;
            w.insert(storage::DECOY_KEY, stand_in);
        }
        if strict {
            w.apply_atomic(&*self.db)?;
        } else {
            w.apply(&*self.db)?;
        }
        failpoint::hit(if rekeyed {
            "rekey:applied"
        } else {
            "rotation:batch-applied"
        });
        let now = self.now();
        for (&b, &gen) in buckets.iter().zip(&gens) {
            self.log(
                now,
                AuditEntry::new(AuditEvent::KeyRotation)
                    .rotation(b, gen)
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        let anchor = self.advance_mark()?;
        failpoint::hit(if rekeyed {
            "rekey:flushed"
        } else {
            "rotation:batch-flushed"
        });
        self.keyring.finish_rotations(&buckets, Some(anchor))
    }

    /// Finish a rotation whose new KEK is already in the keyring (after a
    /// crash): re-wrap the key table under it, dropping entries that have no
    /// record (a removal the crash interrupted), then zero the old slot.
    pub(super) fn complete_rotation(&self, b: u32) -> Result<()> {
        let newest = self.keyring.with_newest(b, |g, _| g)?;
        if let Some(t) = self.rewrap_table(b, newest, &[], None)? {
            let mut w = Writes::default();
            w.put_table(b, t);
            w.apply(&*self.db)?;
        }
        self.log(
            self.now(),
            AuditEntry::new(AuditEvent::KeyRotation)
                .rotation(b, newest)
                .outcome(AuditOutcome::Ok),
        )?;
        let anchor = self.advance_mark()?;
        self.keyring.finish_rotations(&[b], Some(anchor))
    }

    /// Re-seal subject `p` (as `l` holds it) under a fresh DEK and rotate
    /// its bucket in the same step (caller holds the lock). Every older
    /// version of the subject's record and of the bucket's key table that
    /// the data files still hold is then under a DEK wrapped only under a
    /// KEK that exists nowhere: spliced back, it does not open. This is how
    /// a change that must not be undone (a failure counted, a disable, a
    /// purpose withdrawn, consent replaced, a reset) is written.
    ///
    /// Order: the new KEK is synced into the keyring first; then the
    /// record and the re-wrapped table are written in one sled transaction
    /// (a crash leaves the old pair or the new pair, never a record whose
    /// DEK is not in the table); sled is synced; the old slot is zeroed.
    pub(super) fn rekey_subject(
        &self,
        p: &Pseudonym,
        b: u32,
        l: Loaded,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        self.rotate_many(&[(b, Vec::new())], &[guard], true, Some((p, l)), true)
    }

    /// Bucket `b`'s key table re-wrapped under `new_gen` (see
    /// [`Store::open_table`], lenient), or `None` if there is nothing to
    /// re-wrap.
    pub(super) fn rewrap_table(
        &self,
        b: u32,
        new_gen: u64,
        remove: &[Pseudonym],
        replace: Option<(&Pseudonym, &[u8; 32])>,
    ) -> Result<Option<Vec<u8>>> {
        match self.open_table(b, remove, replace, false)? {
            Some(deks) => self.seal_table(b, new_gen, &deks).map(Some),
            None => Ok(None),
        }
    }

    /// The DEKs bucket `b`'s key table should carry into its next
    /// generation: only those of subjects that have a record and are not in
    /// `remove`; with `replace`, that subject's entry holds the given new
    /// DEK (added if the table has none). Every rotation drops entries
    /// without a record, so a revoked subject's DEK is never carried into a
    /// new generation, whatever happened to the pending-shred marker.
    ///
    /// Lenient (`strict` false: revocations, expiries, shreds, recovery): a
    /// table that does not parse gives `None` and is left as it is; an
    /// entry that cannot be unwrapped (tampered, or under a shredded key)
    /// is dropped: it was unreadable before and stays so, and it must not
    /// block a revocation. Strict (changes that destroy nothing: a failure
    /// counted, a consent change, a decoy): any of these is
    /// [`Error::Tampered`], so that a tampered table never costs another
    /// subject its key.
    pub(super) fn open_table(
        &self,
        b: u32,
        remove: &[Pseudonym],
        replace: Option<(&Pseudonym, &[u8; 32])>,
        strict: bool,
    ) -> Result<Option<Deks>> {
        let bad = Error::tampered("bucket key table (an entry does not open)");
        let table = match self.db.get(Table::Keys, &storage::key_table_key(b))? {
            Some(v) => match DekTable::decode(&v) {
                Ok(t) => t,
                Err(e) if strict => return Err(e),
                Err(_) => return Ok(None),
            },
            None if replace.is_some() => DekTable::new(0),
            None => return Ok(None),
        };
        // The bucket's live subjects: one range scan of its records.
        let mut live = std::collections::HashSet::new();
        for k in storage::keys_with_prefix(&*self.db, Table::Records, &storage::subject_prefix(b))?
        {
            if let Some((_, p)) = storage::parse_subject_key(&k) {
                live.insert(p.0);
            }
        }
        let store_id = self.keyring.header().store_id;
        let mut keep = Vec::with_capacity(table.entries.len());
        for (p, wrapped) in &table.entries {
            let p = Pseudonym(*p);
            if remove.contains(&p) || replace.is_some_and(|(r, _)| *r == p) {
                continue;
            }
            keep.push((p, wrapped));
        }
        let old = table.generation;
        let mut deks: Vec<(Pseudonym, Zeroizing<Vec<u8>>)> = if keep.is_empty() {
            Vec::new()
        } else {
            match self.keyring.with_kek(b, old, |kek| {
                keep.iter()
                    .filter_map(|(p, w)| {
                        kek.open(&dek_aad(&store_id, p, b, old), &w[..])
                            .ok()
                            .filter(|d| d.len() == 32)
                            .map(|d| (*p, d))
                    })
                    .collect::<Vec<_>>()
            })? {
                Kek::Found(d) => d,
                Kek::Shredded | Kek::Unknown if strict => return Err(bad),
                Kek::Shredded | Kek::Unknown => Vec::new(),
            }
        };
        // Strict: every entry must open, even one about to be dropped (an
        // edited pseudonym makes an entry look orphaned; it does not open).
        if strict && deks.len() != keep.len() {
            return Err(bad);
        }
        deks.retain(|(p, _)| live.contains(&p.0));
        if let Some((p, dek)) = replace {
            deks.push((*p, Zeroizing::new(dek.to_vec())));
            deks.sort_by_key(|d| d.0 .0);
        }
        Ok(Some(deks))
    }

    /// A key table of generation `gen` wrapping `deks` (sorted by
    /// pseudonym) under bucket `b`'s KEK of that generation.
    pub(super) fn seal_table(&self, b: u32, gen: u64, deks: &Deks) -> Result<Vec<u8>> {
        let store_id = self.keyring.header().store_id;
        let nonces = crate::crypto::random_nonces(deks.len())?;
        let table = match self.keyring.with_kek(b, gen, |kek| {
            let mut out = DekTable::new(gen);
            for ((p, dek), nonce) in deks.iter().zip(&nonces) {
                let sealed = kek.seal_with_nonce(nonce, &dek_aad(&store_id, p, b, gen), dek)?;
                out.entries.push((p.0, to_wrapped(&sealed)?));
            }
            Ok::<_, Error>(out)
        })? {
            Kek::Found(t) => t?,
            _ => return Err(Error::tampered("keyring rotation state")),
        };
        Ok(table.encode())
    }
}
