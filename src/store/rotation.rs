//! Key tables, bucket KEK rotations, shreds and crash recovery.

use super::*;

impl Store {
    /// Complete every pending shred (see [`ShredPolicy::Deferred`]). Returns
    /// the number of buckets rotated.
    pub fn shred(&self) -> Result<usize> {
        let mut n = 0;
        for group in self.db.pending_buckets()?.chunks(ROTATION_GROUP) {
            let guards: Vec<BucketGuard<'_>> = group.iter().map(|b| self.lock(*b)).collect();
            let mut work = Vec::new();
            for &b in group {
                if self.db.records.contains_key(storage::pending_key(b))? {
                    work.push((b, Vec::new()));
                }
            }
            if !work.is_empty() {
                self.rotate_many(&work, &guards.iter().collect::<Vec<_>>())?;
                n += work.len();
            }
        }
        if n > 0 {
            self.log(
                self.clock.now(),
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
                self.rotate_many(&[(b, ps.to_vec())], &[guard])?;
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
        // The marker first: a crash part-way through the removals must not
        // leave a removed subject without a pending shred.
        let mut w = Writes::default();
        w.insert(storage::pending_key(b).as_slice(), &[][..]);
        for p in ps {
            self.remove_subject(&mut w, b, p)?;
        }
        w.apply(&self.db)
    }

    /// Finish what a crash interrupted: half-done rotations, and (with
    /// immediate shredding) revocations whose rotation never started.
    pub(super) fn recover(&self) -> Result<()> {
        for b in self.keyring.interrupted() {
            let _guard = self.lock(b);
            self.complete_rotation(b)?;
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
    pub(super) fn table_with(&self, p: &Pseudonym, b: u32, dek: &[u8; 32]) -> Result<Vec<u8>> {
        let (generation, wrapped) = self.wrap_dek(p, b, dek)?;
        let mut table = match self.db.keys.get(storage::key_table_key(b))? {
            Some(v) => DekTable::decode(&v)?,
            None => DekTable::new(generation),
        };
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
    pub(super) fn rotate_many(
        &self,
        work: &[(u32, Vec<Pseudonym>)],
        _guards: &[&BucketGuard<'_>],
    ) -> Result<()> {
        for (b, _) in work {
            if self.keyring.is_rotating(*b)? {
                self.complete_rotation(*b)?;
            }
        }
        let buckets: Vec<u32> = work.iter().map(|(b, _)| *b).collect();
        let gens = self.keyring.begin_rotations(&buckets)?;
        let mut w = Writes::default();
        let mut tables = Vec::with_capacity(work.len());
        for ((b, remove), &gen) in work.iter().zip(&gens) {
            // A bucket with a pending shred may hold entries of subjects a
            // deferred revocation removed: drop every entry without a record.
            let thorough = self.db.records.contains_key(storage::pending_key(*b))?;
            for p in remove {
                self.remove_subject(&mut w, *b, p)?;
            }
            tables.push((*b, self.rewrap_table(*b, gen, remove, thorough)?));
        }
        for (b, table) in tables {
            if let Some(t) = table {
                w.put_table(b, t);
            }
            w.remove(storage::pending_key(b).as_slice());
        }
        w.apply(&self.db)?;
        failpoint::hit("rotation:batch-applied");
        let now = self.clock.now();
        for (&b, &gen) in buckets.iter().zip(&gens) {
            self.log(
                now,
                AuditEntry::new(AuditEvent::KeyRotation)
                    .rotation(b, gen)
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        self.flush()?;
        failpoint::hit("rotation:batch-flushed");
        self.keyring.finish_rotations(&buckets)
    }

    /// Finish a rotation whose new KEK is already in the keyring (after a
    /// crash): re-wrap the key table under it, dropping entries that have no
    /// record (a removal the crash interrupted), then zero the old slot.
    pub(super) fn complete_rotation(&self, b: u32) -> Result<()> {
        let newest = self.keyring.with_newest(b, |g, _| g)?;
        if let Some(t) = self.rewrap_table(b, newest, &[], true)? {
            self.db.keys.insert(storage::key_table_key(b), t)?;
        }
        self.log(
            self.clock.now(),
            AuditEntry::new(AuditEvent::KeyRotation)
                .rotation(b, newest)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        self.keyring.finish_rotation(b)
    }

    /// Bucket `b`'s key table re-wrapped under `new_gen`, without the entries
    /// of `remove` (and, if `thorough`, without entries that have no record).
    /// `None` if the bucket has no table or it cannot be parsed: it is left
    /// as it is. An entry that cannot be unwrapped (tampered, or under a
    /// shredded key) is dropped: it was unreadable before and stays so, and
    /// it must not block a revocation.
    pub(super) fn rewrap_table(
        &self,
        b: u32,
        new_gen: u64,
        remove: &[Pseudonym],
        thorough: bool,
    ) -> Result<Option<Vec<u8>>> {
        let Some(v) = self.db.keys.get(storage::key_table_key(b))? else {
            return Ok(None);
        };
        let Ok(table) = DekTable::decode(&v) else {
            return Ok(None);
        };
        let store_id = self.keyring.header().store_id;
        let mut keep = Vec::with_capacity(table.entries.len());
        for (p, wrapped) in &table.entries {
            let p = Pseudonym(*p);
            if remove.contains(&p)
                || (thorough && !self.db.records.contains_key(storage::subject_key(b, &p))?)
            {
                continue;
            }
            keep.push((p, wrapped));
        }
        let old = table.generation;
        let deks: Vec<(Pseudonym, Zeroizing<Vec<u8>>)> =
            match self.keyring.with_kek(b, old, |kek| {
                keep.iter()
                    .filter_map(|(p, w)| {
                        kek.open(&dek_aad(&store_id, p, b, old), &w[..])
                            .ok()
                            .filter(|d| d.len() == 32)
                            .map(|d| (*p, d))
                    })
                    .collect()
            })? {
                Kek::Found(d) => d,
                Kek::Shredded | Kek::Unknown => Vec::new(),
            };
        let nonces = crate::crypto::random_nonces(deks.len())?;
        let rewrapped = match self.keyring.with_kek(b, new_gen, |kek| {
            let mut out = DekTable::new(new_gen);
            for ((p, dek), nonce) in deks.iter().zip(&nonces) {
                let sealed = kek.seal_with_nonce(nonce, &dek_aad(&store_id, p, b, new_gen), dek)?;
                out.entries.push((p.0, to_wrapped(&sealed)?));
            }
            Ok::<_, Error>(out)
        })? {
            Kek::Found(t) => t?,
            _ => return Err(Error::tampered("keyring rotation state")),
        };
        Ok(Some(rewrapped.encode()))
    }
}
