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
        let guard = self.lock(b)?;
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
    /// purpose not consented) costs beyond the load it already made: the
    /// comparison, its result thrown away, the re-seal a `NoMatch` makes,
    /// and a rotation of the bucket, as a `NoMatch` would.
    pub(super) fn refusal_cost(
        &self,
        p: &Pseudonym,
        b: u32,
        l: &Loaded,
        probe: &Template,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        match &l.payload.split {
            Some(s) => self.split_cost(p, s, &l.sealed_templates, probe, true),
            None => {
                let _ = std::hint::black_box(matcher::decide(
                    &l.payload.templates,
                    probe,
                    self.fixed_threshold(),
                ));
            }
        }
        reseal_cost(&AeadKey::new(&l.dek), &l.payload, &l.state)?;
        self.rotate_many(&[(b, Vec::new())], &[guard], true, None, true)
    }

    /// What a verify of an unknown subject costs: as much as an enrolled
    /// subject's `NoMatch`. The reads a record load makes (a record-sized
    /// value, the key table and its entry, the retention pointer); a DEK
    /// unwrap; the decoding and opening of a one-template stand-in subject
    /// sealed under a key that exists only in memory; the comparison
    /// against it; the re-seal; and a rotation of the bucket the pseudonym
    /// falls in. No storage is created for the unknown id.
    pub(super) fn decoy(
        &self,
        p: &Pseudonym,
        b: u32,
        probe: &Template,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        let d = &self.decoy;
        let _ = std::hint::black_box(self.db.get(Table::Records, storage::DECOY_KEY)?);
        if let Some(t) = self.db.get(Table::Keys, &storage::key_table_key(b))? {
            let _ = std::hint::black_box(DekTable::find(&t, p));
        }
        let _ = std::hint::black_box(
            self.db
                .get(Table::Records, &storage::deadline_ptr_key(b, p))?,
        );
        let _ = std::hint::black_box(d.key.open(b"bioseal/decoy-dek", &d.wrapped));
        let rec = SubjectRecord::decode(&d.record)?;
        let plain = d
            .key
            .open(b"bioseal/decoy", &rec.payload)
            .map_err(|_| Error::tampered("decoy"))?;
        let payload = SubjectPayload::decode(&plain, self.dim)?;
        let state = d
            .key
            .open(b"bioseal/decoy-state", &rec.state)
            .map_err(|_| Error::tampered("decoy"))?;
        let state = SubjectState::decode(&state)?;
        let _ = std::hint::black_box(matcher::decide(
            &payload.templates,
            probe,
            self.fixed_threshold(),
        ));
        reseal_cost(&d.key, &payload, &state)?;
        self.rotate_many(&[(b, Vec::new())], &[guard], true, None, true)
    }
}

/// The sealing a re-key makes (payload and state encoded and sealed),
/// thrown away.
fn reseal_cost(key: &AeadKey, payload: &SubjectPayload, state: &SubjectState) -> Result<()> {
    let mut p = key.seal(b"bioseal/decoy", &payload.encode()?)?;
    let mut s = key.seal(b"bioseal/decoy-state", &state.encode()?)?;
    std::hint::black_box((&p, &s));
    p.zeroize();
    s.zeroize();
    Ok(())
}

/// Stand-ins for the work of a refused or unknown-subject verify: a
/// one-template subject record and a wrapped key, sealed under a key made
/// at open that exists only in memory.
pub(super) struct Decoy {
    key: AeadKey,
    wrapped: Vec<u8>,
    /// An encoded subject record.
    pub(super) record: Vec<u8>,
    /// As many stand-in templates as a subject may hold, for a split
    /// subject's comparison that does not happen.
    pub(super) templates: Vec<Template>,
}

impl Decoy {
    pub(super) fn new(dim: usize) -> Result<Decoy> {
        let key = AeadKey::new(&*random::<32>()?);
        let template = Embedding::new((0..dim).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect())
            .quantize(dim)?;
        let payload = SubjectPayload {
            consent: Consent::new([Purpose::IDENTITY_VERIFICATION])
                .expires_at(Timestamp::from_unix_secs(1))
                .evidence([0; 32]),
            templates: vec![template],
            split: None,
        };
        let state = SubjectState {
            failures: 0,
            last_failure: 0,
            last_interaction: 0,
        };
        let record = SubjectRecord {
            templates: Vec::new(),
            payload: key.seal(b"bioseal/decoy", &payload.encode()?)?,
            state: key.seal(b"bioseal/decoy-state", &state.encode()?)?,
        }
        .encode();
        let wrapped = key.seal(b"bioseal/decoy-dek", random::<32>()?.as_ref())?;
        let templates = (0..64)
            .map(|_| {
                Embedding::new((0..dim).map(|i| if i == 1 { 1.0 } else { 0.0 }).collect())
                    .quantize(dim)
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Decoy {
            key,
            wrapped,
            record,
            templates,
        })
    }
}
