//! Split custody: a subject's templates sealed under a key that needs a
//! secret only the person holds.
//!
//! The template key of a split-custody subject is
//!
//! ```text
//! K_t = HKDF-SHA-256(salt = server half, ikm = user key,
//!                    info = "bioseal/v1/split" | store id | pseudonym)
//! ```
//!
//! where the *server half* is 32 random bytes kept in the subject's payload
//! (sealed under its DEK, so shredded with it) and the *user key* is 32
//! bytes the caller supplies at enrollment and at every verify (a passkey's
//! WebAuthn PRF output, a secret in a QR code the person keeps, a device
//! keystore key). bioseal never stores the user key. The templates are
//! sealed under `K_t` in their own section of the record; the payload under
//! the DEK keeps consent, the server half, the template count and the
//! SHA-256 of the sealed templates, which is all consent checks, lockout,
//! retention, sweep and revoke need.

use super::aead::AeadKey;
use super::pseudonym::Pseudonym;
use crate::error::{Error, Result};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// Who can open a subject's templates, chosen at enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Custody {
    /// The server's keys alone open the templates (the default).
    Server,
    /// The templates open only with the server's keys *and* the person's
    /// [`UserKey`]: the operator, holding every key and file it has, cannot
    /// open them (SECURITY.md §17).
    Split,
}

/// The person's 32-byte secret for a split-custody subject. Wiped on drop;
/// prints as `[REDACTED]`; no `Clone`.
///
/// It must be 32 uniformly random bytes (a WebAuthn PRF output, a random
/// secret in a QR code, a device keystore key), never something derived from
/// a PIN or a password: anyone holding the server's keys can test a guess
/// against the sealed templates, so only a secret that cannot be guessed
/// protects them.
///
/// ```
/// use bioseal::UserKey;
/// let mut secret = [7u8; 32]; // in practice: a WebAuthn PRF output
/// secret[0] = 1;
/// let k = UserKey::from_bytes(secret).expect("32 bytes, not all equal");
/// assert_eq!(format!("{k:?}"), "UserKey([REDACTED])");
/// assert!(UserKey::from_bytes([0u8; 32]).is_err()); // all bytes equal
/// assert!(UserKey::parse(&[1u8; 31]).is_err());      // neither 32 bytes nor 64 hex digits
/// ```
pub struct UserKey(Zeroizing<[u8; 32]>);

impl UserKey {
    /// A user key from 32 bytes. Refuses a key whose bytes are all equal
    /// (an all-zero buffer is the usual mistake) with
    /// [`Error::InvalidUserKey`].
    pub fn from_bytes(mut bytes: [u8; 32]) -> Result<UserKey> {
        let k = Zeroizing::new(bytes);
        bytes.zeroize();
        if k.iter().all(|&b| b == k[0]) {
            return Err(Error::InvalidUserKey("all 32 bytes are equal"));
        }
        Ok(UserKey(k))
    }

    /// A user key from a file's contents: exactly 32 raw bytes, or 64
    /// hexadecimal digits (surrounding whitespace ignored).
    pub fn parse(contents: &[u8]) -> Result<UserKey> {
        let k = super::parse_key32(contents).map_err(Error::InvalidUserKey)?;
        UserKey::from_bytes(*k)
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserKey([REDACTED])")
    }
}

/// The template key of a split-custody subject (see the module docs).
pub(crate) fn template_key(
    server_half: &[u8; 32],
    user_key: &[u8; 32],
    store_id: &[u8; 16],
    p: &Pseudonym,
) -> Zeroizing<[u8; 32]> {
    // On the stack: this runs on every split-custody verify.
    let mut info = [0u8; 16 + 16 + 32];
    info[..16].copy_from_slice(b"bioseal/v1/split");
    info[16..32].copy_from_slice(store_id);
    info[32..].copy_from_slice(&p.0);
    super::hkdf32(server_half, user_key, &info)
}

/// Associated data of a split subject's sealed templates.
pub(crate) fn templates_aad(store_id: &[u8; 16], p: &Pseudonym) -> [u8; 20 + 16 + 32] {
    let mut aad = [0u8; 20 + 16 + 32];
    aad[..20].copy_from_slice(b"bioseal/v1/templates");
    aad[20..36].copy_from_slice(store_id);
    aad[36..].copy_from_slice(&p.0);
    aad
}

/// Seal encoded templates under the template key.
pub(crate) fn seal_templates(
    key: &[u8; 32],
    store_id: &[u8; 16],
    p: &Pseudonym,
    encoded: &[u8],
) -> Result<Vec<u8>> {
    AeadKey::new(key).seal(&templates_aad(store_id, p), encoded)
}

/// Open sealed templates; `None` when the key is wrong (the only way a
/// sealed blob whose digest the payload vouches for fails to open).
pub(crate) fn open_templates(
    key: &[u8; 32],
    store_id: &[u8; 16],
    p: &Pseudonym,
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    AeadKey::new(key)
        .open(&templates_aad(store_id, p), sealed)
        .ok()
}

/// SHA-256 of a sealed templates blob, which the payload keeps so that an
/// altered blob is told apart from a wrong user key.
pub(crate) fn digest(sealed: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, sealed);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_raw_and_hex_and_refuse_the_rest() {
        let raw: Vec<u8> = (0u8..32).collect();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let a = UserKey::parse(&raw).expect("raw");
        let b = UserKey::parse(format!("  {hex}\n").as_bytes()).expect("hex");
        let c = UserKey::parse(hex.to_uppercase().as_bytes()).expect("HEX");
        assert_eq!(a.bytes(), b.bytes());
        assert_eq!(a.bytes(), c.bytes());
        assert_eq!(a.bytes()[31], 31);
        for bad in [
            &raw[..31],
            &hex.as_bytes()[..63],
            &[b'g'; 64][..],
            &[b'0'; 64][..],
            &[0u8; 33][..],
        ] {
            assert!(
                matches!(UserKey::parse(bad), Err(Error::InvalidUserKey(_))),
                "{} bytes accepted",
                bad.len()
            );
        }
    }

    #[test]
    fn the_key_depends_on_both_halves_and_the_subject() {
        let p = Pseudonym([3; 32]);
        let k = template_key(&[1; 32], &[2; 32], &[0; 16], &p);
        assert_ne!(*k, *template_key(&[9; 32], &[2; 32], &[0; 16], &p));
        assert_ne!(*k, *template_key(&[1; 32], &[9; 32], &[0; 16], &p));
        assert_ne!(*k, *template_key(&[1; 32], &[2; 32], &[1; 16], &p));
        assert_ne!(
            *k,
            *template_key(&[1; 32], &[2; 32], &[0; 16], &Pseudonym([4; 32]))
        );
        let sealed = seal_templates(&k, &[0; 16], &p, b"templates").expect("seal");
        assert_eq!(
            open_templates(&k, &[0; 16], &p, &sealed)
                .as_deref()
                .map(|v| &v[..]),
            Some(&b"templates"[..])
        );
        assert!(open_templates(&[1; 32], &[0; 16], &p, &sealed).is_none());
        assert!(open_templates(&k, &[0; 16], &Pseudonym([4; 32]), &sealed).is_none());
    }
}
