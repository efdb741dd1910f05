//! AES-256-GCM with random 96-bit nonces. Sealed format: `nonce || ct || tag`.

use crate::error::Result;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use std::fmt;
use zeroize::Zeroizing;

pub(crate) const NONCE_LEN: usize = 12;
pub(crate) const TAG_LEN: usize = 16;
/// Bytes a seal adds to its plaintext.
pub(crate) const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// An AES-256-GCM key. The `aes`/`polyval` `zeroize` features make the key
/// schedule wipe itself on drop.
pub(crate) struct AeadKey(Aes256Gcm);

/// Authentication failed: wrong key, wrong associated data, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpenError;

impl AeadKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        AeadKey(Aes256Gcm::new(key.into()))
    }

    /// Seal `plaintext` under a fresh random nonce.
    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        let nonce = super::random::<NONCE_LEN>()?;
        self.seal_with_nonce(&nonce, aad, plaintext)
    }

    /// Seal under `nonce`, which the caller drew from the system RNG (one
    /// draw for many nonces saves a system call per seal; see
    /// [`super::random_nonces`]).
    pub(crate) fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(plaintext);
        let tag = self
            .0
            .encrypt_in_place_detached(
                Nonce::from_slice(nonce.as_ref()),
                aad,
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| std::io::Error::other("AES-GCM refused to seal (message too long)"))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Open a sealed message into a buffer that is wiped on drop.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = Zeroizing::new(ct.to_vec());
        self.0
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                aad,
                &mut buf,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError)?;
        Ok(buf)
    }
}

impl fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AeadKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_every_alteration_fails() {
        let k = AeadKey::new(&[1u8; 32]);
        let sealed = k.seal(b"aad", b"hello template").expect("seal");
        assert_eq!(sealed.len(), 14 + OVERHEAD);
        assert_eq!(
            &k.open(b"aad", &sealed).expect("open")[..],
            b"hello template"
        );
        assert_eq!(k.open(b"aaD", &sealed), Err(OpenError));
        assert_eq!(
            AeadKey::new(&[2u8; 32]).open(b"aad", &sealed),
            Err(OpenError)
        );
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(b"aad", &t), Err(OpenError), "byte {i}");
        }
        assert_eq!(k.open(b"aad", &sealed[..OVERHEAD - 1]), Err(OpenError));
        let again = k.seal(b"aad", b"hello template").expect("seal");
        assert_ne!(sealed[..NONCE_LEN], again[..NONCE_LEN], "nonces are fresh");
        assert_eq!(format!("{k:?}"), "AeadKey([REDACTED])");
    }
}
