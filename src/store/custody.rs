//! Split custody: the calls that take the person's user key, and the
//! taking out and putting back of a subject's templates in either custody
//! (see [`crate::crypto::custody`] for the key derivation and SECURITY.md
//! §17 for what it protects).

use super::*;
use crate::crypto::custody;
use crate::storage::record::{decode_templates, encode_templates, SplitHalf};
use lifecycle::refusal_outcome;

impl Store {
    /// Enroll `subject` in split custody: as [`Store::enroll`], but its
    /// templates are sealed under a key derived (HKDF-SHA-256) from a
    /// server-held half and `user_key`, which the person keeps and bioseal
    /// never stores. Every later [`Store::verify_with`] and
    /// [`Store::add_template_with`] needs the same key; consent, lockout,
    /// retention, sweep, revoke and the audit log work without it.
    pub fn enroll_with(
        &self,
        subject: &str,
        embedding: Embedding,
        consent: Consent,
        user_key: &UserKey,
    ) -> Result<()> {
        self.enroll_staged(subject, embedding, consent, Some(user_key))?;
        self.flush()
    }

    /// [`Store::verify`] for a split-custody subject, with the person's
    /// user key. A wrong key is [`Error::WrongUserKey`]: counted as a
    /// failed attempt under the attempt limits (written irreversibly, as a
    /// `NoMatch` is), audited, and costing what a `NoMatch` costs; the
    /// templates are never opened, so it says nothing about whether the
    /// face would have matched. The attempt limits, the purpose and the
    /// deadlines are checked first, without the key. A server-custody
    /// subject is [`Error::NotSplitCustody`] (no attempt spent; it costs a
    /// refusal's rotation, so that latency does not tell it from an unknown
    /// subject).
    /// [`Store::verify`] (no key) on a split-custody subject is a
    /// `WrongUserKey`.
    pub fn verify_with(
        &self,
        subject: &str,
        purpose: &Purpose,
        probe: Embedding,
        user_key: &UserKey,
    ) -> Result<Decision> {
        self.verify_and(subject, purpose, probe, None, Some(user_key))
    }

    /// [`Store::add_template`] for a split-custody subject: the new
    /// template is sealed with the others under the key derived from
    /// `user_key`.
    pub fn add_template_with(
        &self,
        subject: &str,
        purpose: &Purpose,
        probe: Embedding,
        new: Embedding,
        user_key: &UserKey,
    ) -> Result<Decision> {
        let new = new.quantize(self.dim)?;
        self.verify_and(subject, purpose, probe, Some(new), Some(user_key))
    }

    /// Change a split-custody subject's user key from `old` to `new`: the
    /// templates are opened with `old` and sealed under a new server half
    /// and `new`, and the change is written irreversibly (the subject
    /// re-keyed, its bucket rotated), so no copy of an older record opens
    /// with `old` any more; like a consent change it enters the revocation
    /// ledger (a restore of an older backup removes the subject). A wrong
    /// `old` is [`Error::WrongUserKey`], counted as a failed attempt; the
    /// attempt limits are checked first. Counts as an interaction. Every
    /// refusal (unknown subject, server custody, locked out) costs a bucket
    /// rotation, as a wrong key does, so that latency tells nothing.
    ///
    /// The person can also shred their templates alone, by discarding the
    /// key: nothing bioseal holds opens them without it.
    pub fn rekey(&self, subject: &str, old: &UserKey, new: &UserKey) -> Result<()> {
        check_subject(subject)?;
        let now = self.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        let result = self.rekey_locked(&p, b, &key, old, new, now, &guard);
        // The successful change logs itself (with its re-key, durably).
        if let Err(e) = &result {
            self.log(
                now,
                AuditEntry::new(AuditEvent::UserKeyChanged)
                    .subject(&p)
                    .outcome(refusal_outcome(e)),
            )?;
            self.flush()?;
        }
        result
    }

    /// Move a server-custody subject to split custody under `user_key` (an
    /// existing user's migration, with the person's key at hand): its
    /// templates are sealed under a new server half and the key, and the
    /// change is written irreversibly (re-key and rotation), so no older
    /// record of the subject opens any more; like a consent change it
    /// enters the revocation ledger (a restore of an older backup removes
    /// the subject rather than bring back its server-custody templates).
    /// Copies of the keyring of the current epoch (backups, dumps) still
    /// open the old records until the epoch rolls, as for a revocation
    /// (SECURITY.md §15, §17). A subject already in split custody is
    /// [`Error::AlreadySplitCustody`] (its key changes with
    /// [`Store::rekey`]). Audited.
    pub fn move_to_split_custody(&self, subject: &str, user_key: &UserKey) -> Result<()> {
        check_subject(subject)?;
        let now = self.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b)?;
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        if l.payload.split.is_some() {
            return Err(Error::AlreadySplitCustody);
        }
        let templates = self.take_templates(&p, &mut l, None)?;
        self.put_templates(&p, &mut l, templates, Some(user_key), true)?;
        self.ledger_consent_change(&p, now)?;
        self.commit_subject(
            &p,
            b,
            l,
            now,
            AuditEntry::new(AuditEvent::CustodyMovedToSplit),
            &guard,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rekey_locked(
        &self,
        p: &Pseudonym,
        b: u32,
        key: &[u8],
        old: &UserKey,
        new: &UserKey,
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        // Every refusal costs a rotation, as a wrong key does, so that
        // latency does not tell who is enrolled or in which custody.
        let stand_in = &self.decoy.templates[0];
        let mut l = match self.load_live(p, b, key, now, guard) {
            Ok(l) => l,
            Err(Error::NotEnrolled) => {
                self.decoy(p, b, stand_in, guard)?;
                return Err(Error::NotEnrolled);
            }
            Err(e) => return Err(e),
        };
        let refused = match &l.payload.split {
            None => Err(Error::NotSplitCustody),
            Some(_) => self.attempt_allowed(&l.state, now),
        };
        if let Err(e) = refused {
            self.refusal_cost(p, b, &l, stand_in, guard)?;
            return Err(e);
        }
        let templates = match self.take_templates(p, &mut l, Some(old)) {
            Ok(t) => t,
            Err(Error::WrongUserKey) => {
                self.count_failure(p, b, l, now, guard)?;
                return Err(Error::WrongUserKey);
            }
            Err(e) => return Err(e),
        };
        // A new server half: the templates under the old key exist only in
        // records that the re-key below leaves unopenable.
        l.payload.split = None;
        self.put_templates(p, &mut l, templates, Some(new), true)?;
        l.state.last_interaction = now.unix_secs();
        self.ledger_consent_change(p, now)?;
        self.commit_subject(
            p,
            b,
            l,
            now,
            AuditEntry::new(AuditEvent::UserKeyChanged),
            guard,
        )
    }

    /// Take a subject's templates out of `l` for a comparison. Server
    /// custody: from its payload (a user key given is
    /// [`Error::NotSplitCustody`]). Split custody: opened with `user_key`;
    /// a missing or wrong key is [`Error::WrongUserKey`], a templates
    /// section that the payload's digest does not vouch for is
    /// [`Error::Tampered`]. A missing key costs what a wrong one does.
    pub(super) fn take_templates(
        &self,
        p: &Pseudonym,
        l: &mut Loaded,
        user_key: Option<&UserKey>,
    ) -> Result<Vec<Template>> {
        match &l.payload.split {
            Some(s) => self.open_split(p, s, &l.sealed_templates, user_key),
            None => match user_key {
                None => Ok(std::mem::take(&mut l.payload.templates)),
                Some(_) => Err(Error::NotSplitCustody),
            },
        }
    }

    /// Open a split-custody subject's sealed templates with `user_key`
    /// (none: the derivation runs with a zero key and fails like a wrong
    /// one).
    fn open_split(
        &self,
        p: &Pseudonym,
        s: &SplitHalf,
        sealed: &[u8],
        user_key: Option<&UserKey>,
    ) -> Result<Vec<Template>> {
        let store_id = self.keyring.header().store_id;
        let user = user_key.map_or(&[0u8; 32], UserKey::bytes);
        let k = custody::template_key(&s.server_half, user, &store_id, p);
        match custody::open_templates(&k, &store_id, p, sealed) {
            // Opened: the section is authentic (the AEAD binds it to the
            // subject and store; the count to the payload). No digest on
            // the matching path: it would cost a SHA-256 of the section.
            Some(plain) if user_key.is_some() => decode_templates(&plain, self.dim, s.count),
            // Not opened: an altered section, or a wrong key; the digest
            // the payload keeps tells which.
            _ if custody::digest(sealed) != s.digest => {
                Err(Error::tampered("subject templates (digest)"))
            }
            _ => Err(Error::WrongUserKey),
        }
    }

    /// The digest a wrong key's check computes, on a split subject's
    /// `NoMatch`, so that the two cost the same.
    pub(super) fn split_digest_cost(&self, l: &Loaded) {
        if l.payload.split.is_some() {
            let _ = std::hint::black_box(custody::digest(&l.sealed_templates));
        }
    }

    /// Put `templates` back into `l`. Server custody (no split half and no
    /// user key): into its payload. Split custody: when `changed`, sealed
    /// under the key derived from its server half (a fresh one if it has
    /// none: a new enrollment or a user-key change) and `user_key`, the
    /// payload's count and digest updated; otherwise the sealed section is
    /// kept as it is.
    pub(super) fn put_templates(
        &self,
        p: &Pseudonym,
        l: &mut Loaded,
        templates: Vec<Template>,
        user_key: Option<&UserKey>,
        changed: bool,
    ) -> Result<()> {
        let user_key = match (&l.payload.split, user_key) {
            (None, None) => {
                l.payload.templates = templates;
                return Ok(());
            }
            (Some(_), _) if !changed => return Ok(()),
            (_, Some(k)) => k,
            (Some(_), None) => return Err(Error::WrongUserKey),
        };
        let server_half = match &l.payload.split {
            Some(s) => s.server_half,
            None => *random::<32>()?,
        };
        let store_id = self.keyring.header().store_id;
        let k = custody::template_key(&server_half, user_key.bytes(), &store_id, p);
        let sealed = custody::seal_templates(&k, &store_id, p, &encode_templates(&templates)?)?;
        l.payload.split = Some(SplitHalf {
            server_half,
            count: templates.len() as u32,
            digest: custody::digest(&sealed),
        });
        l.sealed_templates = sealed;
        Ok(())
    }

    /// What a split-custody subject's comparison costs when its templates
    /// are not opened, the result thrown away: with `derive` (a refusal,
    /// which never tries the key) the wrong-key check itself (key
    /// derivation, a failed open, the digest); always a comparison against
    /// as many stand-in templates as it holds.
    pub(super) fn split_cost(
        &self,
        p: &Pseudonym,
        s: &SplitHalf,
        sealed: &[u8],
        probe: &Template,
        derive: bool,
    ) {
        if derive {
            let _ = std::hint::black_box(self.open_split(p, s, sealed, None));
        }
        let n = (s.count as usize).min(self.decoy.templates.len());
        let _ = std::hint::black_box(matcher::decide(
            &self.decoy.templates[..n],
            probe,
            self.fixed_threshold(),
        ));
    }

    /// Count a failed attempt (a `NoMatch` or a wrong user key), written
    /// irreversibly: the subject re-sealed under a fresh DEK, its bucket
    /// rotated.
    pub(super) fn count_failure(
        &self,
        p: &Pseudonym,
        b: u32,
        mut l: Loaded,
        now: Timestamp,
        guard: &BucketGuard<'_>,
    ) -> Result<()> {
        l.state.failures = l.state.failures.saturating_add(1);
        l.state.last_failure = now.unix_secs();
        // Durable before the answer, and irreversible: crashing the service
        // or splicing an older record back must not give back an attempt.
        self.rekey_subject(p, b, l, guard)
    }
}
