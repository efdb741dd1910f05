//! Attempt limits: the failed-attempt counter, its checks and its reset.

use super::*;

impl Store {
    /// Operator reset of a subject's failed-attempt counter (re-enables
    /// verification after the hard limit). Audited.
    pub fn reset_attempts(&self, subject: &str) -> Result<()> {
        check_subject(subject)?;
        let now = self.clock.now();
        let (p, b, key) = self.locate(subject);
        let guard = self.lock(b);
        let mut l = self.load_live(&p, b, &key, now, &guard)?;
        l.state.failures = 0;
        self.commit_subject(
            &p,
            b,
            &l,
            false,
            now,
            AuditEntry::new(AuditEvent::AttemptsReset),
        )
    }
}
