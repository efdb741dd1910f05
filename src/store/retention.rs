//! Deadlines: consent expiry and the inactivity limit, the retention index
//! and the sweep.

use super::*;

impl Store {
    /// Destroy every subject past its deadline (consent expiry, or the
    /// inactivity limit after its last interaction). Visits only the
    /// subjects the retention index lists as due by today, rotates each
    /// affected bucket once, and is audited.
    ///
    /// Due buckets are handled in groups of up to 256 (each group one
    /// rotation: three syncs); groups share no bucket, so they run on up to
    /// four threads (at most the available parallelism). Every group is
    /// complete in itself: an error stops the sweep after the groups under
    /// way, and the groups done are done.
    pub fn sweep(&self) -> Result<SweepReport> {
        let started = Instant::now();
        let now = self.now();
        self.check_clock(now)?;
        let mut due: BTreeMap<u32, Vec<(Pseudonym, u32)>> = BTreeMap::new();
        let mut examined = 0;
        for (day, b, p) in self.due_index_entries(now)? {
            due.entry(b).or_default().push((p, day));
            examined += 1;
        }
        let due: Vec<DueBucket> = due.into_iter().collect();
        let groups: Vec<&[DueBucket]> = due.chunks(ROTATION_GROUP).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(SWEEP_THREADS)
            .min(groups.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let worker = || -> Result<(usize, usize)> {
            let (mut expired, mut rotated) = (0, 0);
            while !failed.load(std::sync::atomic::Ordering::Relaxed) {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(group) = groups.get(i) else { break };
                match self.sweep_group(group, now) {
                    Ok((e, r)) => {
                        expired += e;
                        rotated += r;
                    }
                    Err(e) => {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            Ok((expired, rotated))
        };
        let results: Vec<Result<(usize, usize)>> = if threads <= 1 {
            vec![worker()]
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = (0..threads).map(|_| sc.spawn(worker)).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            })
        };
        let (mut expired, mut rotated) = (0, 0);
        for r in results {
            let (e, r) = r?;
            expired += e;
            rotated += r;
        }
        self.log(
            now,
            AuditEntry::new(AuditEvent::Sweep)
                .count(expired as u64)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        // The latest time seen, kept for the next process's jump check.
        let seen = self.seen.load(std::sync::atomic::Ordering::SeqCst);
        self.keyring
            .update_state(|st| st.last_seen = st.last_seen.max(seen))?;
        // A due epoch is rolled here, so that the bound every receipt
        // states for backups holds for a store swept on a schedule.
        let epoch_rolled = self.roll_epoch_if_due()?.then(|| self.keyring.epoch().0);
        Ok(SweepReport {
            examined,
            expired,
            buckets_rotated: rotated,
            epoch_rolled,
            took: started.elapsed(),
        })
    }

    /// One group of a sweep: lock its buckets (ascending, so groups cannot
    /// deadlock with each other or with single-bucket operations), find the
    /// subjects really past their deadline, destroy them (one rotation for
    /// the group under immediate shredding) and audit each. Returns the
    /// subjects destroyed and the buckets rotated.
    pub(super) fn sweep_group(
        &self,
        group: &[DueBucket],
        now: Timestamp,
    ) -> Result<(usize, usize)> {
        let buckets: Vec<u32> = group.iter().map(|(b, _)| *b).collect();
        let guards = self.lock_many(&buckets)?;
        let mut work: Vec<(u32, Vec<(Pseudonym, AuditOutcome)>)> = Vec::new();
        for (b, candidates) in group {
            let doomed = self.sweep_bucket(*b, candidates, now)?;
            if !doomed.is_empty() {
                work.push((*b, doomed));
            }
        }
        let removals: Vec<(u32, Vec<Pseudonym>)> = work
            .iter()
            .map(|(b, d)| (*b, d.iter().map(|(p, _)| *p).collect()))
            .collect();
        let mut rotated = 0;
        match self.shred_policy {
            ShredPolicy::Immediate if !removals.is_empty() => {
                self.rotate_many(
                    &removals,
                    &guards.iter().collect::<Vec<_>>(),
                    false,
                    None,
                    true,
                )?;
                rotated = removals.len();
            }
            ShredPolicy::Immediate => {}
            ShredPolicy::Deferred => {
                for (b, ps) in &removals {
                    self.remove_deferred(*b, ps)?;
                }
            }
        }
        let mut expired = 0;
        for (_, doomed) in &work {
            for (p, reason) in doomed {
                self.log(
                    now,
                    AuditEntry::new(AuditEvent::Expire)
                        .subject(p)
                        .outcome(*reason),
                )?;
            }
            expired += doomed.len();
        }
        Ok((expired, rotated))
    }

    /// Every retention-index entry (day, bucket, pseudonym) due by `now`'s day.
    pub(super) fn due_index_entries(&self, now: Timestamp) -> Result<Vec<(u32, u32, Pseudonym)>> {
        let end = storage::deadline_scan_end(day_of(now.unix_secs()));
        let mut out = Vec::new();
        self.db
            .scan(Table::Records, b"D", Some(&end), &mut |k, _| {
                out.push(storage::parse_deadline_key(k).ok_or(Error::tampered("retention index"))?);
                Ok(true)
            })?;
        Ok(out)
    }

    /// Which of a bucket's due candidates are past their deadline (caller
    /// holds the bucket's lock). Cleans up index entries a crash left.
    pub(super) fn sweep_bucket(
        &self,
        b: u32,
        candidates: &[(Pseudonym, u32)],
        now: Timestamp,
    ) -> Result<Vec<(Pseudonym, AuditOutcome)>> {
        let mut doomed = Vec::new();
        for &(p, day) in candidates {
            let key = storage::subject_key(b, &p);
            let reason = match self.load_subject(&p, b, &key) {
                Ok(Some(l)) => {
                    let reason = self.overdue(&l, now);
                    if reason.is_none() {
                        self.drop_stale_index_entry(b, &p, day)?;
                    }
                    reason
                }
                Ok(None) => {
                    // A stale index entry: nothing to destroy.
                    let mut w = Writes::default();
                    self.remove_index(&mut w, b, &p)?;
                    w.remove(&storage::deadline_key(day, b, &p)[..]);
                    w.apply(&*self.db)?;
                    None
                }
                // Listed as due and unreadable: nothing can be lost by removing it.
                Err(_) => Some(AuditOutcome::RetentionExpired),
            };
            if let Some(reason) = reason {
                doomed.push((p, reason));
            }
        }
        Ok(doomed)
    }

    /// How many subjects a [`Store::sweep`] run now would destroy, without
    /// destroying or writing anything (a dry run). Visits the same
    /// retention-index entries the sweep would.
    pub fn due(&self) -> Result<usize> {
        let now = self.now();
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        for (_, b, p) in self.due_index_entries(now)? {
            if !seen.insert((b, p.0)) {
                continue;
            }
            let _guard = self.lock(b)?;
            match self.load_subject(&p, b, &storage::subject_key(b, &p)) {
                Ok(Some(l)) if self.overdue(&l, now).is_some() => n += 1,
                Ok(_) => {}
                Err(_) => n += 1,
            }
        }
        Ok(n)
    }

    /// Load a subject that must exist and be within its deadline; one past
    /// it is destroyed and its expiry returned as the error.
    pub(super) fn load_live(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<Loaded> {
        let l = self.load_subject(p, b, key)?.ok_or(Error::NotEnrolled)?;
        if let Some(reason) = self.overdue(&l, now) {
            drop(l);
            self.destroy_expired(b, p, reason, guard)?;
            return Err(match reason {
                AuditOutcome::ConsentExpired => Error::ConsentExpired,
                _ => Error::RetentionExpired,
            });
        }
        Ok(l)
    }

    /// Why a subject is past its deadline at `now`, if it is.
    pub(super) fn overdue(&self, l: &Loaded, now: Timestamp) -> Option<AuditOutcome> {
        if l.payload.consent.is_expired(now) {
            Some(AuditOutcome::ConsentExpired)
        } else if now >= self.inactivity_deadline(&l.state) {
            Some(AuditOutcome::RetentionExpired)
        } else {
            None
        }
    }

    pub(super) fn inactivity_deadline(&self, state: &SubjectState) -> Timestamp {
        Timestamp::from_unix_secs(state.last_interaction).saturating_add(self.max_inactivity)
    }

    pub(super) fn deadline(&self, consent: &Consent, state: &SubjectState) -> Timestamp {
        let expiry = consent.expiry().unwrap_or_default();
        expiry.min(self.inactivity_deadline(state))
    }

    pub(super) fn status(&self, l: &Loaded) -> ConsentStatus {
        let (consent, state) = (&l.payload.consent, &l.state);
        ConsentStatus {
            custody: match l.payload.split {
                Some(_) => crate::Custody::Split,
                None => crate::Custody::Server,
            },
            purposes: consent.purposes().cloned().collect(),
            granted_at: consent.granted(),
            expires_at: consent.expiry().unwrap_or_default(),
            evidence: consent.evidence_digest().copied(),
            policy_version: consent.policy(),
            last_interaction: Timestamp::from_unix_secs(state.last_interaction),
            deadline: self.deadline(consent, state),
        }
    }

    pub(super) fn destroy_expired(
        &self,
        b: u32,
        p: &Pseudonym,
        reason: AuditOutcome,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        self.check_clock(self.now())?;
        self.destroy(b, &[*p], guard)?;
        self.log(
            self.now(),
            AuditEntry::new(AuditEvent::Expire)
                .subject(p)
                .outcome(reason),
        )?;
        self.flush()?;
        Ok(())
    }

    /// A live subject listed under `day` whose index pointer names another
    /// day: the entry was left by a crash between the writes of
    /// [`Store::put_subject`]; remove it.
    pub(super) fn drop_stale_index_entry(&self, b: u32, p: &Pseudonym, day: u32) -> Result<()> {
        let ptr = self
            .db
            .get(Table::Records, &storage::deadline_ptr_key(b, p))?;
        if matches!(ptr.as_deref().and_then(be_u32), Some(d) if d != day) {
            let mut w = Writes::default();
            w.remove(storage::deadline_key(day, b, p));
            w.apply(&*self.db)?;
        }
        Ok(())
    }

    /// Queue removal of the retention-index pointer, then of the entry it
    /// names (in that order: a pointer must never name a missing entry).
    pub(super) fn remove_index(&self, w: &mut Writes, b: u32, p: &Pseudonym) -> Result<()> {
        let ptr = storage::deadline_ptr_key(b, p);
        let day = self
            .db
            .get(Table::Records, &ptr)?
            .as_deref()
            .and_then(be_u32);
        w.remove(&ptr[..]);
        if let Some(day) = day {
            w.remove(&storage::deadline_key(day, b, p)[..]);
        }
        Ok(())
    }
}
