//! Cryptography: key newtypes, AEAD, keyed pseudonyms and the keyring.
//!
//! Primitives: AES-256-GCM from `aes-gcm` (key schedules wiped on drop),
//! HKDF/HMAC-SHA-256 and the system RNG from `ring`.

pub(crate) mod aead;
pub(crate) mod keyring;
pub(crate) mod keys;
pub(crate) mod pseudonym;

use crate::error::{Error, Result};
use zeroize::Zeroizing;

/// `N` bytes from the operating system's CSPRNG, in a wiped buffer.
pub(crate) fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    use ring::rand::SecureRandom;
    let mut out = Zeroizing::new([0u8; N]);
    ring::rand::SystemRandom::new()
        .fill(out.as_mut())
        .map_err(|_| {
            Error::Io(std::io::Error::other(
                "system random number generator failed",
            ))
        })?;
    Ok(out)
}

/// HKDF-SHA-256: extract with `salt`, expand with `info` to 32 bytes.
pub(crate) fn hkdf32(salt: &[u8], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let mut out = Zeroizing::new([0u8; 32]);
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
    let infos = [info];
    // expand/fill fail only when the output is longer than 255 hash lengths;
    // 32 bytes never is, and a zero key would then fail every later check.
    if let Ok(okm) = prk.expand(&infos, Len32) {
        let _ = okm.fill(out.as_mut());
    }
    out
}
