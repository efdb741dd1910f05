//! Keyed pseudonyms: records are keyed by HMAC-SHA-256(pseudonym key,
//! subject id), never by the subject id.

use ring::hmac;
use std::fmt;

/// HMAC-SHA-256 of a subject id under the store's pseudonym key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Pseudonym(pub(crate) [u8; 32]);

impl Pseudonym {
    /// The bucket this pseudonym falls into, out of `buckets`.
    pub(crate) fn bucket(&self, buckets: u32) -> u32 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        (u64::from_be_bytes(b) % u64::from(buckets)) as u32
    }

    /// Short hexadecimal form for audit entries and diagnostics.
    pub(crate) fn short_hex(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({}…)", self.short_hex())
    }
}

/// The pseudonym key. ring does not wipe its HMAC state on drop; SECURITY.md
/// ("Memory") records this.
pub(crate) struct PseudonymKey(hmac::Key);

impl PseudonymKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        PseudonymKey(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    pub(crate) fn pseudonym(&self, subject: &[u8]) -> Pseudonym {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(b"bioseal/v1/pseudonym\0");
        ctx.update(subject);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        Pseudonym(out)
    }
}

impl fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PseudonymKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_and_spread_over_buckets() {
        let k1 = PseudonymKey::new(&[1; 32]);
        let k2 = PseudonymKey::new(&[2; 32]);
        assert_eq!(k1.pseudonym(b"alice"), k1.pseudonym(b"alice"));
        assert_ne!(k1.pseudonym(b"alice"), k2.pseudonym(b"alice"));
        assert_ne!(k1.pseudonym(b"alice"), k1.pseudonym(b"bob"));
        let mut counts = vec![0u32; 16];
        for i in 0..16_000u32 {
            counts[k1.pseudonym(&i.to_be_bytes()).bucket(16) as usize] += 1;
        }
        // Expected 1000 each; 6 sigma is about 190.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
