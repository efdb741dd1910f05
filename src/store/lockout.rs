//! Attempt limits and oracle resistance: the failed-attempt checks, the
//! operator reset, and what a refused or unknown-subject verify costs.

use super::*;

impl Store {
    /// Operator reset of a subject's failed-attempt counter (re-enables
    /// verification after the hard limit). Audited; written irreversibly
    /// like every state change except a match.
    pub fn reset_attempts(&self, subject: &str) -> Result<()> {
        check_subject(subject)?;
        let now = self.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        l.state.failures = 0;
        self.commit_subject(
            &p,
            b,
            l,
            now,
            AuditEntry::new(AuditEvent::AttemptsReset),
            &guard,
        )
    }

    /// Whether the attempt limits allow a comparison now:
    /// [`Error::VerificationDisabled`] at the hard limit,
    /// [`Error::LockedOut`] during the wait after the soft limit.
    pub(super) fn attempt_allowed(&self, st: &SubjectState, now: Timestamp) -> Result<()> {
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
        Ok(())
    }

    /// What a refused verify of an enrolled subject (locked out, disabled,
    /// purpose not consented) costs: the comparison, its result thrown
    /// away, and a rotation of the bucket, as a `NoMatch` would.
    pub(super) fn refusal_cost(
        &self,
        b: u32,
        l: &Loaded,
        probe: &Template,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        let _ = std::hint::black_box(matcher::decide(
            &l.payload.templates,
            probe,
            self.fixed_threshold(),
        ));
        let mut sealed =
            std::hint::black_box(AeadKey::new(&l.dek).seal(b"bioseal/decoy", &self.decoy_payload)?);
        sealed.zeroize();
        self.rotate_many(&[(b, Vec::new())], &[guard], true)
    }

    /// What a verify of an unknown subject costs: as much as an enrolled
    /// subject's `NoMatch` (a DEK unwrap and payload open, stand-ins of the
    /// same size; the comparison against a stand-in template; a re-seal;
    /// and a rotation of the bucket the pseudonym falls in), without
    /// creating any storage for the unknown id.
    pub(super) fn decoy(
        &self,
        p: &Pseudonym,
        b: u32,
        probe: &Template,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        // The reads a record load and its re-seal make: the key table and
        // its entry, the retention pointer.
        if let Some(t) = self.db.keys.get(storage::key_table_key(b))? {
            let _ = std::hint::black_box(DekTable::find(&t, p));
        }
        let _ = std::hint::black_box(self.db.records.get(storage::deadline_ptr_key(b, p))?);
        let dek = random::<32>()?;
        let key = AeadKey::new(&dek);
        let wrapped = key.seal(b"bioseal/decoy-dek", dek.as_ref())?;
        let _ = std::hint::black_box(key.open(b"bioseal/decoy-dek", &wrapped));
        let sealed = key.seal(b"bioseal/decoy", &self.decoy_payload)?;
        let _ = std::hint::black_box(key.open(b"bioseal/decoy", &sealed));
        let state = key.seal(b"bioseal/decoy-state", &[0u8; 20])?;
        let _ = std::hint::black_box(key.open(b"bioseal/decoy-state", &state));
        let _ = std::hint::black_box(matcher::decide(
            std::slice::from_ref(&self.decoy_template),
            probe,
            self.fixed_threshold(),
        ));
        let mut resealed = key.seal(b"bioseal/decoy", &self.decoy_payload)?;
        resealed.zeroize();
        let _ = std::hint::black_box(key.seal(b"bioseal/decoy-state", &[0u8; 20])?);
        self.rotate_many(&[(b, Vec::new())], &[guard], true)
    }
}
