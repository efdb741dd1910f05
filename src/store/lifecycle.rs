//! Enroll, verify, revoke and consent changes: the calls a service makes
//! about one subject.

use super::*;

impl Store {
    /// Enroll `subject` with its first template under `consent`. The consent
    /// must name at least one purpose, an evidence digest and an expiry in
    /// the future within the store's maximum lifetime. Durable when it
    /// returns.
    ///
    /// A subject that is already enrolled is refused with
    /// [`Error::AlreadyEnrolled`] and nothing changes (not its templates,
    /// consent or failure counter; the refusal is audited): more templates
    /// come only through [`Store::add_template`], consent changes only
    /// through [`Store::renew_consent`] and [`Store::withdraw_purpose`], and
    /// a disabled subject comes back only through [`Store::reset_attempts`]
    /// or revoke and a new enrollment. A subject past its deadline is
    /// destroyed first and then enrolled anew.
    pub fn enroll(&self, subject: &str, embedding: Embedding, consent: Consent) -> Result<()> {
        self.enroll_staged(subject, embedding, consent, None)?;
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
            let r = self.enroll_staged(subject.as_ref(), embedding, consent, None);
            if let Err(e @ (Error::Storage(_) | Error::Io(_))) = r {
                return Err(e);
            }
            out.push(r);
        }
        self.flush()?;
        Ok(out)
    }

    /// Everything [`Store::enroll`] does except the final sync; with
    /// `user_key`, in split custody ([`Store::enroll_with`]).
    pub(super) fn enroll_staged(
        &self,
        subject: &str,
        embedding: Embedding,
        consent: Consent,
        user_key: Option<&UserKey>,
    ) -> Result<()> {
        check_subject(subject)?;
        let template = embedding.quantize(self.dim)?;
        let now = self.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        if let Some(l) = self.load_subject(&p, b, &key)? {
            match self.overdue(&l, now) {
                Some(reason) => {
                    drop(l);
                    self.destroy_expired(b, &p, reason, &guard)?;
                }
                None => {
                    self.log(
                        now,
                        AuditEntry::new(AuditEvent::Enroll)
                            .subject(&p)
                            .outcome(AuditOutcome::AlreadyEnrolled),
                    )?;
                    return Err(Error::AlreadyEnrolled);
                }
            }
        }
        let state = SubjectState {
            failures: 0,
            last_failure: 0,
            last_interaction: now.unix_secs(),
        };
        let mut w = Writes::default();
        let dek = random::<32>()?;
        // The key table first: a record must never exist without its DEK
        // (an entry without a record is harmless, and the bucket's next
        // rotation drops it).
        w.put_table(b, self.table_with(&p, b, &dek)?);
        let mut l = Loaded {
            dek,
            payload: SubjectPayload {
                consent,
                templates: Vec::new(),
                split: None,
            },
            state,
            sealed_payload: Vec::new(),
            sealed_templates: Vec::new(),
            index_day: None,
        };
        self.put_templates(&p, &mut l, vec![template], user_key, true)?;
        self.put_subject(&mut w, &p, b, &l, true)?;
        w.apply(&*self.db)?;
        // Durable by the caller's flush.
        self.db.relax();
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
    /// [`Error::LockedOut`] during the wait after repeated failures and
    /// [`Error::VerificationDisabled`] after the hard limit (both checked
    /// before the purpose); [`Error::PurposeNotConsented`];
    /// [`Error::ConsentExpired`] or [`Error::RetentionExpired`] when the
    /// subject is past its deadline, in which case it is destroyed before
    /// this returns. Every call is audited.
    ///
    /// A `NoMatch` is written as a change that must not be undone: the
    /// subject is re-sealed under a fresh DEK and its bucket's KEK rotated
    /// (three syncs), so no older version of its record counts fewer
    /// failures. An unknown subject, a locked-out or disabled one and an
    /// unconsented purpose cost the same (a rotation of the bucket), so
    /// that latency does not tell who is enrolled (SECURITY.md §11).
    pub fn verify(&self, subject: &str, purpose: &Purpose, probe: Embedding) -> Result<Decision> {
        self.verify_and(subject, purpose, probe, None, None)
    }

    /// Add a template to an enrolled subject, but only if `probe` (a fresh
    /// capture) matches first. The attempt is a verification in every
    /// respect: it counts under the attempt limits and is audited; on
    /// `NoMatch` nothing is added. Never resets a counter beyond what a
    /// match does, never touches consent. Returns the decision; the template
    /// was added exactly when it is [`Decision::Match`]. Durable when it
    /// returns. [`Error::TooManyTemplates`] (checked before the comparison,
    /// no attempt spent) when the subject holds the configured maximum.
    pub fn add_template(
        &self,
        subject: &str,
        purpose: &Purpose,
        probe: Embedding,
        new: Embedding,
    ) -> Result<Decision> {
        let new = new.quantize(self.dim)?;
        self.verify_and(subject, purpose, probe, Some(new), None)
    }

    /// A verification, adding `add` to the templates on a match; with
    /// `user_key` for a split-custody subject.
    pub(super) fn verify_and(
        &self,
        subject: &str,
        purpose: &Purpose,
        probe: Embedding,
        add: Option<Template>,
        user_key: Option<&UserKey>,
    ) -> Result<Decision> {
        check_subject(subject)?;
        let probe = probe.quantize(self.dim)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        let now = self.now();
        let adding = add.is_some();
        let result = self.verify_locked(&p, b, &key, purpose, &probe, add, user_key, now, &guard);
        let outcome = match &result {
            Ok(Decision::Match) => AuditOutcome::Match,
            Ok(Decision::NoMatch) => AuditOutcome::NoMatch,
            Err(e) => refusal_outcome(e),
        };
        self.log(
            now,
            AuditEntry::new(AuditEvent::Verify)
                .subject(&p)
                .purpose(purpose)
                .outcome(outcome),
        )?;
        let added = adding && matches!(result, Ok(Decision::Match));
        if added {
            self.log(
                now,
                AuditEntry::new(AuditEvent::TemplateAdded)
                    .subject(&p)
                    .purpose(purpose)
                    .outcome(AuditOutcome::Ok),
            )?;
        }
        if added || self.durability == Durability::Immediate {
            self.flush()?;
        } else {
            self.db.relax();
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
        let guard = self.lock(b)?;
        if self.db.get(Table::Records, &key)?.is_none() {
            return Err(Error::NotEnrolled);
        }
        self.revoke_locked(b, &p, &guard)
    }

    /// Replace `subject`'s consent (new purposes, expiry, evidence). Counts
    /// as an interaction for the inactivity limit. Written irreversibly (the
    /// subject re-keyed, its bucket rotated): no older version of the record
    /// restores the previous consent.
    pub fn renew_consent(&self, subject: &str, consent: Consent) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.now();
        let consent = consent.accept(now, self.max_consent_lifetime)?;
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        self.ledger_consent_change(&p, now)?;
        l.payload.consent = consent;
        l.state.last_interaction = now.unix_secs();
        let status = self.status(&l);
        self.commit_subject(
            &p,
            b,
            l,
            now,
            AuditEntry::new(AuditEvent::ConsentRenewed),
            &guard,
        )?;
        Ok(status)
    }

    /// Withdraw one purpose, irreversibly (the subject re-keyed, its bucket
    /// rotated). Withdrawing the last purpose revokes the subject (and
    /// shreds it, under the immediate policy).
    pub fn withdraw_purpose(&self, subject: &str, purpose: &Purpose) -> Result<Withdrawal> {
        check_subject(subject)?;
        let now = self.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
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
        self.ledger_consent_change(&p, now)?;
        self.commit_subject(&p, b, l, now, entry, &guard)?;
        Ok(Withdrawal::Remaining(remaining))
    }

    /// The subject's consent and deadlines. A subject past its deadline is
    /// destroyed and reported as expired.
    pub fn consent_status(&self, subject: &str) -> Result<ConsentStatus> {
        check_subject(subject)?;
        let now = self.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        let l = self.load_live(&p, b, &key, now, &guard)?;
        Ok(self.status(&l))
    }

    /// The verify steps that run under the bucket lock: load, attempt
    /// limits, purpose, the comparison, and the state change (a failure
    /// re-keys and rotates; see [`Store::verify`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn verify_locked(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        purpose: &Purpose,
        probe: &Template,
        add: Option<Template>,
        user_key: Option<&UserKey>,
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<Decision> {
        let mut l = match self.load_live(p, b, key, now, guard) {
            Ok(l) => l,
            Err(Error::NotEnrolled) => {
                self.decoy(p, b, probe, guard)?;
                return Err(Error::NotEnrolled);
            }
            Err(e) => return Err(e),
        };
        let held = match &l.payload.split {
            Some(s) => s.count as usize,
            None => l.payload.templates.len(),
        };
        if l.payload.split.is_none() && user_key.is_some() {
            // Costs what any refusal costs (a rotation), so that latency
            // does not tell a server-custody subject from an unknown one.
            self.refusal_cost(p, b, &l, probe, guard)?;
            return Err(Error::NotSplitCustody);
        }
        if add.is_some() && held >= self.max_templates {
            return Err(Error::TooManyTemplates {
                max: self.max_templates,
            });
        }
        let allowed = self.attempt_allowed(&l.state, now).and_then(|()| {
            if l.payload.consent.permits(purpose) {
                Ok(())
            } else {
                Err(Error::PurposeNotConsented)
            }
        });
        if let Err(e) = allowed {
            self.refusal_cost(p, b, &l, probe, guard)?;
            return Err(e);
        }
        let mut templates = match self.take_templates(p, &mut l, user_key) {
            Ok(t) => t,
            Err(Error::WrongUserKey) => {
                // What a comparison and a `NoMatch` cost, and a failure
                // counted as a `NoMatch` counts it.
                if let Some(s) = &l.payload.split {
                    self.split_cost(p, s, &l.sealed_templates, probe, false);
                }
                self.count_failure(p, b, l, now, guard)?;
                return Err(Error::WrongUserKey);
            }
            Err(e) => return Err(e),
        };
        let decision = matcher::decide(&templates, probe, self.fixed_threshold());
        let st = l.state;
        match decision {
            Decision::Match => {
                l.state.failures = 0;
                // Day granularity: at most one write per subject per day.
                if day_of(now.unix_secs()) != day_of(st.last_interaction) {
                    l.state.last_interaction = now.unix_secs();
                }
                let reseal = match add {
                    Some(t) => {
                        templates.push(t);
                        true
                    }
                    None => false,
                };
                self.put_templates(p, &mut l, templates, user_key, reseal)?;
                // Lowering the counter or adding a template need not be
                // made irreversible: an older version spliced back only
                // counts more failures or holds fewer templates.
                if reseal || l.state != st {
                    let mut w = Writes::default();
                    self.put_subject(&mut w, p, b, &l, reseal)?;
                    w.apply(&*self.db)?;
                }
            }
            Decision::NoMatch => {
                self.split_digest_cost(&l);
                self.put_templates(p, &mut l, templates, user_key, false)?;
                self.count_failure(p, b, l, now, guard)?;
            }
        }
        Ok(decision)
    }

    /// Destroy a subject, then log and flush its revocation.
    pub(super) fn revoke_locked(
        &self,
        b: u32,
        p: &Pseudonym,
        guard: &BucketGuard<'_>,
    ) -> Result<ShredReceipt> {
        let revoked_at = self.now();
        let status = if self.destroy(b, &[*p], guard)? {
            ShredStatus::Shredded { at: self.now() }
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
        Ok(ShredReceipt {
            revoked_at,
            status,
            backups_inert_by: self.backups_inert_by(),
        })
    }
}

/// The audit outcome of a refused verify (or user-key change).
pub(super) fn refusal_outcome(e: &Error) -> AuditOutcome {
    match e {
        Error::LockedOut { .. } => AuditOutcome::LockedOut,
        Error::VerificationDisabled => AuditOutcome::Disabled,
        Error::ConsentExpired => AuditOutcome::ConsentExpired,
        Error::RetentionExpired => AuditOutcome::RetentionExpired,
        Error::PurposeNotConsented => AuditOutcome::PurposeNotConsented,
        Error::NotEnrolled => AuditOutcome::NotEnrolled,
        Error::TooManyTemplates { .. } => AuditOutcome::TooManyTemplates,
        Error::WrongUserKey => AuditOutcome::WrongUserKey,
        Error::NotSplitCustody => AuditOutcome::NotSplitCustody,
        _ => AuditOutcome::Error,
    }
}
