//! Consent: what a subject agreed to, and until when. bioseal enforces it:
//! no enrollment without purposes and an expiry, no verification for another
//! purpose or after expiry.

use crate::clock::Timestamp;
use crate::error::ConsentError;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// A named purpose of processing, e.g. identity verification.
///
/// Names are 1–64 characters of `a-z 0-9 . _ -`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Purpose(Cow<'static, str>);

impl Purpose {
    /// Verifying that a person is who they claim to be (1:1 against their own enrollment).
    pub const IDENTITY_VERIFICATION: Purpose = Purpose(Cow::Borrowed("identity-verification"));
    /// Checking that an account is not impersonating the enrolled person.
    pub const IMPERSONATION_CHECK: Purpose = Purpose(Cow::Borrowed("impersonation-check"));

    /// A custom purpose.
    pub fn new(name: impl Into<String>) -> Result<Self, ConsentError> {
        let name = name.into();
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Purpose(Cow::Owned(name)))
        } else {
            Err(ConsentError::InvalidPurpose)
        }
    }

    /// The purpose's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn is_valid(&self) -> bool {
        Purpose::new(self.0.to_string()).is_ok()
    }
}

impl fmt::Debug for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Purpose({})", self.0)
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subject's consent: the purposes it covers, when it expires, and a digest
/// of the signed release that evidences it.
///
/// ```
/// use bioseal::{Consent, Purpose, Timestamp};
/// let c = Consent::new([Purpose::IDENTITY_VERIFICATION])
///     .expires_at(Timestamp::from_unix_secs(2_000_000_000))
///     .evidence([7u8; 32]);
/// assert!(c.permits(&Purpose::IDENTITY_VERIFICATION));
/// assert!(!c.permits(&Purpose::IMPERSONATION_CHECK));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    purposes: BTreeSet<Purpose>,
    expires_at: Option<Timestamp>,
    granted_at: Option<Timestamp>,
    evidence: Option<[u8; 32]>,
    policy_version: u32,
}

impl Consent {
    /// A consent for these purposes. An expiry must be added before enrolling.
    pub fn new(purposes: impl IntoIterator<Item = Purpose>) -> Self {
        Consent {
            purposes: purposes.into_iter().collect(),
            expires_at: None,
            granted_at: None,
            evidence: None,
            policy_version: 1,
        }
    }

    /// When the consent ends (exclusive: at this instant it no longer holds).
    pub fn expires_at(mut self, t: Timestamp) -> Self {
        self.expires_at = Some(t);
        self
    }

    /// SHA-256 of the signed written release (BIPA §15(b)).
    pub fn evidence(mut self, sha256: [u8; 32]) -> Self {
        self.evidence = Some(sha256);
        self
    }

    /// Version of the consent policy text the subject agreed to.
    pub fn policy_version(mut self, v: u32) -> Self {
        self.policy_version = v;
        self
    }

    /// The consented purposes.
    pub fn purposes(&self) -> impl Iterator<Item = &Purpose> {
        self.purposes.iter()
    }

    /// Expiry, if set.
    pub fn expiry(&self) -> Option<Timestamp> {
        self.expires_at
    }

    /// When the store accepted the consent (set at enrollment).
    pub fn granted(&self) -> Option<Timestamp> {
        self.granted_at
    }

    /// The evidence digest, if given.
    pub fn evidence_digest(&self) -> Option<&[u8; 32]> {
        self.evidence.as_ref()
    }

    /// The policy version.
    pub fn policy(&self) -> u32 {
        self.policy_version
    }

    /// Whether `purpose` is among the consented purposes.
    pub fn permits(&self, purpose: &Purpose) -> bool {
        self.purposes.contains(purpose)
    }

    /// Remove `purpose`; returns whether it was there.
    pub(crate) fn withdraw(&mut self, purpose: &Purpose) -> bool {
        self.purposes.remove(purpose)
    }

    /// Whether the consent no longer holds at `now`.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        match self.expires_at {
            Some(t) => now >= t,
            None => true,
        }
    }

    /// Check that this consent may be used to enroll at `now`, and stamp it
    /// with `granted_at = now`.
    pub(crate) fn accept(
        mut self,
        now: Timestamp,
        max_lifetime: Duration,
    ) -> Result<Self, ConsentError> {
        if self.purposes.is_empty() {
            return Err(ConsentError::NoPurpose);
        }
        if !self.purposes.iter().all(Purpose::is_valid) {
            return Err(ConsentError::InvalidPurpose);
        }
        let exp = self.expires_at.ok_or(ConsentError::NoExpiry)?;
        if self.evidence.is_none() {
            return Err(ConsentError::NoEvidence);
        }
        if exp <= now {
            return Err(ConsentError::ExpiryNotInFuture);
        }
        if exp > now.saturating_add(max_lifetime) {
            return Err(ConsentError::LifetimeTooLong {
                max_secs: max_lifetime.as_secs(),
            });
        }
        self.granted_at = Some(now);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 86_400);

    #[test]
    fn purpose_names_are_validated() {
        assert!(Purpose::new("kyc.v2_eu-1").is_ok());
        for bad in ["", "Upper", "has space", "ü", &"x".repeat(65)] {
            assert_eq!(
                Purpose::new(bad),
                Err(ConsentError::InvalidPurpose),
                "{bad:?}"
            );
        }
        assert!(Purpose::IDENTITY_VERIFICATION.is_valid());
        assert!(Purpose::IMPERSONATION_CHECK.is_valid());
    }

    #[test]
    fn accept_requires_purpose_evidence_and_future_expiry_within_lifetime() {
        let now = Timestamp::from_unix_secs(1_000);
        let p = || [Purpose::IDENTITY_VERIFICATION];
        let c = |t: u64| {
            Consent::new(p())
                .expires_at(Timestamp::from_unix_secs(t))
                .evidence([1; 32])
        };
        let no_purpose = Consent::new([])
            .expires_at(Timestamp::from_unix_secs(2_000))
            .evidence([1; 32]);
        assert_eq!(no_purpose.accept(now, YEAR), Err(ConsentError::NoPurpose));
        assert_eq!(
            Consent::new(p()).evidence([1; 32]).accept(now, YEAR),
            Err(ConsentError::NoExpiry)
        );
        let no_evidence = Consent::new(p()).expires_at(Timestamp::from_unix_secs(2_000));
        assert_eq!(no_evidence.accept(now, YEAR), Err(ConsentError::NoEvidence));
        assert_eq!(
            c(1_000).accept(now, YEAR),
            Err(ConsentError::ExpiryNotInFuture)
        );
        assert_eq!(
            c(now.saturating_add(YEAR * 2).unix_secs()).accept(now, YEAR),
            Err(ConsentError::LifetimeTooLong {
                max_secs: YEAR.as_secs()
            })
        );
        let ok = c(1_001).accept(now, YEAR).expect("valid consent");
        assert_eq!(ok.granted(), Some(now));
        assert!(!ok.is_expired(now));
        assert!(
            ok.is_expired(Timestamp::from_unix_secs(1_001)),
            "expiry is exclusive"
        );
    }
}

/// What [`crate::Store::consent_status`] reports: the consent and the
/// deadlines that follow from it. Never template data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentStatus {
    /// Consented purposes.
    pub purposes: Vec<Purpose>,
    /// When the consent was accepted by the store.
    pub granted_at: Option<Timestamp>,
    /// When it expires.
    pub expires_at: Timestamp,
    /// SHA-256 of the signed release.
    pub evidence: Option<[u8; 32]>,
    /// Policy version agreed to.
    pub policy_version: u32,
    /// Last successful interaction (enrollment, renewal or match), at day
    /// granularity: the first of each day is recorded.
    pub last_interaction: Timestamp,
    /// When the subject will be destroyed unless it interacts again: the
    /// earlier of `expires_at` and `last_interaction` + the inactivity limit.
    pub deadline: Timestamp,
    /// Who can open the subject's templates (the operator can read this,
    /// SECURITY.md §17).
    pub custody: crate::Custody,
}
