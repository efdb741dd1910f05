//! Enroll, verify, revoke and consent changes: the calls a service makes
//! about one subject.

use super::*;

impl Store {
    /// Enroll a template for `subject` under `consent`. The consent must name
    /// at least one purpose, an evidence digest and an expiry in the future
    /// within the store's maximum lifetime; it replaces any consent the
    /// subject held. A subject may hold up to the configured number of
    /// templates. Enrolling resets the failed-attempt counter. Durable when
    /// it returns.
    pub fn enroll(&self, subject: &str, embedding: Embedding, consent: Consent) -> Result<()> {
        self.enroll_staged(subject, embedding, consent)?;
        self.flush()
    }

    /// Enroll many subjects with one sync for the lot: each item is enrolled
    /// as [`Store::enroll`] would, and every item reported `Ok` is durable
    /// when this returns. One item's error (a bad embedding, a consent
    /// without evidence, too many templates) does not stop the others; the
    /// outer error is a storage failure, after which nothing in this call is
    /// known to be durable.
    pub fn enroll_many<S, I>(&self, items: I) -> Result<Vec<Result<()>>>
    where
        S: AsRef<str>,
        I: IntoIterator<Item = (S, Embedding, Consent)>,
    {
        let mut out = Vec::new();
        for (subject, embedding, consent) in items {
            let r = self.enroll_staged(subject.as_ref(), embedding, consent);
            if let Err(e @ (Error::Storage(_) | Error::Io(_))) = r {
                return Err(e);
            }
            out.push(r);
        }
        self.flush()?;
        Ok(out)
    }

    /// Everything [`Store::enroll`] does except the final sync.
    pub(super) fn enroll_staged(
        &self,
        subject: &str,
        embedding: Embedding,
        consent: Consent,
    ) -> Result<()> {
        check_subject(subject)?;
        let template = embedding.quantize(self.dim)?;
        let now = self.clock.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut existing = self.load_subject(&p, b, &key)?;
        if let Some(l) = &existing {
            if let Some(reason) = self.overdue(l, now) {
                existing = None;
                self.destroy_expired(b, &p, reason, &guard)?;
            }
        }
        let state = SubjectState {
            failures: 0,
            last_failure: 0,
            last_interaction: now.unix_secs(),
        };
        let mut w = Writes::default();
        let (dek, payload) = match existing {
            Some(Loaded {
                dek, mut payload, ..
            }) => {
                if payload.templates.len() >= self.max_templates {
                    return Err(Error::TooManyTemplates {
                        max: self.max_templates,
                    });
                }
                payload.templates.push(template);
                payload.consent = consent;
                (dek, payload)
            }
            None => {
                let dek = random::<32>()?;
                // The key table first: a record must never exist without
                // its DEK (an entry without a record is harmless).
                w.put_table(b, self.table_with(&p, b, &dek)?);
                let payload = SubjectPayload {
                    consent,
                    templates: vec![template],
                };
                (dek, payload)
            }
        };
        let l = Loaded {
            dek,
            payload,
            state,
            sealed_payload: Vec::new(),
        };
        self.put_subject(&mut w, &p, b, &l, true)?;
        w.apply(&self.db)?;
        self.log(
            now,
            AuditEntry::new(AuditEvent::Enroll)
                .subject(&p)
                .outcome(AuditOutcome::Ok),
        )
    }

    /// Is `probe` the enrolled person? Returns [`Decision`] and nothing else.
    ///
    /// Errors: [`Error::NotEnrolled`] for an unknown or revoked subject;
    /// [`Error::PurposeNotConsented`]; [`Error::ConsentExpired`] or
    /// [`Error::RetentionExpired`] when the subject is past its deadline, in
    /// which case it is destroyed before this returns; [`Error::LockedOut`]
    /// during the wait after repeated failures; [`Error::VerificationDisabled`]
    /// after the hard limit. Every call is audited.
    pub fn verify(&self, subject: &str, purpose: &Purpose, probe: Embedding) -> Result<Decision> {
        check_subject(subject)?;
        let probe = probe.quantize(self.dim)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let now = self.clock.now();
        let (result, must_flush) =
            match self.verify_locked(&p, b, &key, purpose, &probe, now, &guard) {
                Ok((d, flush)) => (Ok(d), flush),
                Err(e) => (Err(e), false),
            };
        let outcome = match &result {
            Ok(Decision::Match) => AuditOutcome::Match,
            Ok(Decision::NoMatch) => AuditOutcome::NoMatch,
            Err(Error::LockedOut { .. }) => AuditOutcome::LockedOut,
            Err(Error::VerificationDisabled) => AuditOutcome::Disabled,
            Err(Error::ConsentExpired) => AuditOutcome::ConsentExpired,
            Err(Error::RetentionExpired) => AuditOutcome::RetentionExpired,
            Err(Error::PurposeNotConsented) => AuditOutcome::PurposeNotConsented,
            Err(Error::NotEnrolled) => AuditOutcome::NotEnrolled,
            Err(_) => AuditOutcome::Error,
        };
        self.log(
            now,
            AuditEntry::new(AuditEvent::Verify)
                .subject(&p)
                .purpose(purpose)
                .outcome(outcome),
        )?;
        if must_flush || self.durability == Durability::Immediate {
            self.flush()?;
        }
        result
    }

    /// Revoke `subject`: its records are removed durably, then (with
    /// [`ShredPolicy::Immediate`], the default) the KEK of its bucket is
    /// rotated so that no copy of the data files can be decrypted for it.
    /// After this returns the subject is unknown to every API; enrolling it
    /// again creates a new DEK.
    pub fn revoke(&self, subject: &str) -> Result<ShredReceipt> {
        check_subject(subject)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        if !self.db.records.contains_key(key)? {
            return Err(Error::NotEnrolled);
        }
        self.revoke_locked(b, &p, &guard)
    }

    /// Replace `subject`'s consent (new purposes, expiry, evidence). Counts
    /// as an interaction for the inactivity limit.
    pub fn renew_consent(&self, subject: &str, consent: Consent) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.clock.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        l.payload.consent = consent;
        l.state.last_interaction = now.unix_secs();
        let status = self.status(&l.payload.consent, &l.state);
        self.commit_subject(
            &p,
            b,
            &l,
            true,
            now,
            AuditEntry::new(AuditEvent::ConsentRenewed),
        )?;
        Ok(status)
    }

    /// Withdraw one purpose. Withdrawing the last purpose revokes the
    /// subject (and shreds it, under the immediate policy).
    pub fn withdraw_purpose(&self, subject: &str, purpose: &Purpose) -> Result<Withdrawal> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        if !l.payload.consent.withdraw(purpose) {
            return Err(Error::PurposeNotConsented);
        }
        let entry = AuditEntry::new(AuditEvent::PurposeWithdrawn).purpose(purpose);
        if l.payload.consent.purposes().next().is_none() {
            drop(l);
            self.log(now, entry.subject(&p).outcome(AuditOutcome::Ok))?;
            return self.revoke_locked(b, &p, &guard).map(Withdrawal::Revoked);
        }
        let remaining = l.payload.consent.purposes().cloned().collect();
        self.commit_subject(&p, b, &l, true, now, entry)?;
        Ok(Withdrawal::Remaining(remaining))
    }

    /// The subject's consent and deadlines. A subject past its deadline is
    /// destroyed and reported as expired.
    pub fn consent_status(&self, subject: &str) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let l = self.load_live(&p, b, &key, now, &guard)?;
        Ok(self.status(&l.payload.consent, &l.state))
    }

    /// The verify steps that run under the bucket lock. Returns the
    /// decision and whether the state change must be flushed now.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn verify_locked(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        purpose: &Purpose,
        probe: &Template,
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<(Decision, bool)> {
        let l = self.load_live(p, b, key, now, guard)?;
        if !l.payload.consent.permits(purpose) {
            return Err(Error::PurposeNotConsented);
        }
        let st = l.state;
        if st.failures >= self.attempts.hard_limit {
            return Err(Error::VerificationDisabled);
        }
        if st.failures >= self.attempts.soft_limit {
            let until =
                Timestamp::from_unix_secs(st.last_failure).saturating_add(self.attempts.wait);
            if now < until {
                return Err(Error::LockedOut { until });
            }
        }
        let decision = matcher::decide(&l.payload.templates, probe, self.threshold);
        let mut next = st;
        match decision {
            Decision::Match => {
                next.failures = 0;
                // Day granularity: at most one write per subject per day.
                if day_of(now.unix_secs()) != day_of(st.last_interaction) {
                    next.last_interaction = now.unix_secs();
                }
            }
            Decision::NoMatch => {
                next.failures = st.failures.saturating_add(1);
                next.last_failure = now.unix_secs();
            }
        }
        if next != st {
            let mut w = Writes::default();
            self.put_subject(&mut w, p, b, &Loaded { state: next, ..l }, false)?;
            w.apply(&self.db)?;
        }
        // A failure must survive a crash: otherwise crashing the service
        // would reset the counter.
        Ok((decision, next.failures > st.failures))
    }

    /// Destroy a subject, then log and flush its revocation.
    pub(super) fn revoke_locked(
        &self,
        b: u32,
        p: &Pseudonym,
        guard: &BucketGuard<'_>,
    ) -> Result<ShredReceipt> {
        let revoked_at = self.clock.now();
        let status = if self.destroy(b, &[*p], guard)? {
            ShredStatus::Shredded {
                at: self.clock.now(),
            }
        } else {
            ShredStatus::Pending
        };
        let outcome = match status {
            ShredStatus::Shredded { .. } => AuditOutcome::Shredded,
            ShredStatus::Pending => AuditOutcome::ShredPending,
        };
        self.log(
            revoked_at,
            AuditEntry::new(AuditEvent::Revoke)
                .subject(p)
                .outcome(outcome),
        )?;
        self.flush()?;
        Ok(ShredReceipt { revoked_at, status })
    }
}
