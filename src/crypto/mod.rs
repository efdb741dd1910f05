//! Cryptography: key newtypes, AEAD, keyed pseudonyms and the keyring.
//!
//! Primitives: AES-256-GCM from `aes-gcm` (key schedules wiped on drop),
//! HKDF/HMAC-SHA-256 and the system RNG from `ring`.

pub(crate) mod aead;
pub(crate) mod custody;
pub(crate) mod epochs;
pub(crate) mod keyring;
pub(crate) mod keys;
pub(crate) mod medium;
#[cfg(feature = "pkcs11")]
pub(crate) mod pkcs11;
pub(crate) mod pseudonym;

use crate::error::{Error, Result};
use zeroize::Zeroizing;

/// Fill `buf` from the operating system's CSPRNG.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(buf).map_err(|_| {
        Error::Io(std::io::Error::other(
            "system random number generator failed",
        ))
    })
}

/// `n` random 96-bit nonces from one draw of the system RNG: as random as
/// `n` separate draws, with one system call instead of `n`.
pub(crate) fn random_nonces(n: usize) -> Result<Vec<[u8; aead::NONCE_LEN]>> {
    let mut nonces = vec![[0u8; aead::NONCE_LEN]; n];
    fill_random(nonces.as_flattened_mut())?;
    Ok(nonces)
}

/// `N` bytes from the operating system's CSPRNG, in a wiped buffer.
pub(crate) fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>> {
    let mut out = Zeroizing::new([0u8; N]);
    fill_random(out.as_mut())?;
    Ok(out)
}

/// HMAC-SHA-256 under `key` of the concatenation of `parts`.
pub(crate) fn hmac256(key: &ring::hmac::Key, parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// A 32-byte key from a file's or a variable's contents: exactly 32 raw
/// bytes, or 64 hexadecimal digits (surrounding whitespace ignored), into
/// a buffer wiped on drop.
pub(crate) fn parse_key32(bytes: &[u8]) -> std::result::Result<Zeroizing<[u8; 32]>, &'static str> {
    let mut k = Zeroizing::new([0u8; 32]);
    if bytes.len() == 32 {
        k.copy_from_slice(bytes);
        return Ok(k);
    }
    let hex = bytes.trim_ascii();
    if hex.len() != 64 {
        return Err("expected 32 raw bytes or 64 hexadecimal characters");
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let hi = val(pair[0]).ok_or("not hexadecimal")?;
        let lo = val(pair[1]).ok_or("not hexadecimal")?;
        k[i] = (hi << 4) | lo;
    }
    Ok(k)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One RNG draw for many nonces still gives distinct nonces (a
    /// repeated nonce under one key would break AES-GCM), and seals made
    /// with them open.
    #[test]
    fn batched_nonces_are_distinct_and_seal() {
        let nonces = random_nonces(4096).expect("nonces");
        assert_eq!(nonces.len(), 4096);
        let distinct: std::collections::HashSet<_> = nonces.iter().collect();
        assert_eq!(distinct.len(), 4096);
        let key = aead::AeadKey::new(&[9; 32]);
        let sealed = key
            .seal_with_nonce(&nonces[7], b"aad", b"dek bytes")
            .expect("seal");
        assert_eq!(&sealed[..aead::NONCE_LEN], &nonces[7]);
        assert_eq!(&key.open(b"aad", &sealed).expect("open")[..], b"dek bytes");
    }
}
