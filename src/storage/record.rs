//! Subject records: a fixed binary envelope around a sealed, bincode-encoded
//! payload.
//!
//! ```text
//! 0        format version (1)
//! 1..9     KEK generation the DEK is wrapped under (u64 BE)
//! 9..69    wrapped DEK: nonce 12 | AES-256-GCM(DEK) 32 | tag 16
//!          associated data "bioseal/v1/dek" | store id | pseudonym | bucket | generation
//! 69..     payload: nonce 12 | AES-256-GCM_DEK(bincode(SubjectPayload)) | tag 16
//!          associated data "bioseal/v1/subject" | store id | pseudonym | format version
//! ```

use crate::consent::Consent;
use crate::crypto::aead::OVERHEAD;
use crate::crypto::pseudonym::Pseudonym;
use crate::embedding::Template;
use crate::error::{Error, Result};
use bincode::Options;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub(crate) const RECORD_VERSION: u8 = 1;
pub(crate) const WRAPPED_DEK_LEN: usize = 32 + OVERHEAD;
const HEAD_LEN: usize = 1 + 8 + WRAPPED_DEK_LEN;
/// Upper bound on a decoded payload (64 templates of 4096 dimensions fit).
const MAX_PAYLOAD: u64 = 1 << 20;

/// The outer, non-secret envelope of a subject record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectRecord {
    pub(crate) generation: u64,
    pub(crate) wrapped_dek: [u8; WRAPPED_DEK_LEN],
    pub(crate) payload: Vec<u8>,
}

impl SubjectRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEAD_LEN + self.payload.len());
        v.push(RECORD_VERSION);
        v.extend_from_slice(&self.generation.to_be_bytes());
        v.extend_from_slice(&self.wrapped_dek);
        v.extend_from_slice(&self.payload);
        v
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEAD_LEN + OVERHEAD {
            return Err(Error::tampered("subject record (too short)"));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(Error::tampered("subject record (unknown format version)"));
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&bytes[1..9]);
        let mut wrapped_dek = [0u8; WRAPPED_DEK_LEN];
        wrapped_dek.copy_from_slice(&bytes[9..HEAD_LEN]);
        Ok(SubjectRecord {
            generation: u64::from_be_bytes(g),
            wrapped_dek,
            payload: bytes[HEAD_LEN..].to_vec(),
        })
    }
}

/// Associated data of a wrapped DEK.
pub(crate) fn dek_aad(store_id: &[u8; 16], p: &Pseudonym, bucket: u32, generation: u64) -> Vec<u8> {
    [
        b"bioseal/v1/dek".as_slice(),
        store_id,
        &p.0,
        &bucket.to_be_bytes(),
        &generation.to_be_bytes(),
    ]
    .concat()
}

/// Associated data of a sealed payload.
pub(crate) fn payload_aad(store_id: &[u8; 16], p: &Pseudonym) -> Vec<u8> {
    [
        b"bioseal/v1/subject".as_slice(),
        store_id,
        &p.0,
        &[RECORD_VERSION],
    ]
    .concat()
}

/// Associated data of a sealed subject state.
pub(crate) fn state_aad(store_id: &[u8; 16], p: &Pseudonym) -> Vec<u8> {
    [
        b"bioseal/v1/state".as_slice(),
        store_id,
        &p.0,
        &[RECORD_VERSION],
    ]
    .concat()
}

/// A subject's mutable state, sealed under its DEK in its own record so that
/// `verify` can update it without rewriting the templates, and so that it is
/// shredded with the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) struct SubjectState {
    /// Consecutive failed verifications.
    pub(crate) failures: u32,
    /// Time of the last failed verification (Unix seconds).
    pub(crate) last_failure: u64,
    /// First successful interaction of the latest day with one (Unix seconds).
    pub(crate) last_interaction: u64,
}

impl SubjectState {
    pub(crate) fn encode(&self) -> Result<Zeroizing<Vec<u8>>> {
        let c = codec();
        let mut buf = Zeroizing::new(Vec::with_capacity(32));
        c.serialize_into(&mut *buf, self)
            .map_err(|_| Error::Config("subject state encoding".into()))?;
        Ok(buf)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        codec()
            .deserialize(bytes)
            .map_err(|_| Error::tampered("subject state"))
    }
}

/// What a subject's DEK seals: consent and templates.
#[derive(Serialize, Deserialize)]
pub(crate) struct SubjectPayload {
    pub(crate) consent: Consent,
    pub(crate) templates: Vec<Template>,
}

fn codec() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_PAYLOAD)
        .reject_trailing_bytes()
}

impl SubjectPayload {
    /// Encode into a buffer sized up front (no reallocation leaves an
    /// unwiped copy behind) and wiped on drop.
    pub(crate) fn encode(&self) -> Result<Zeroizing<Vec<u8>>> {
        let c = codec();
        let size = c
            .serialized_size(self)
            .map_err(|_| Error::Config("subject payload too large".into()))?;
        let mut buf = Zeroizing::new(Vec::with_capacity(size as usize));
        c.serialize_into(&mut *buf, self)
            .map_err(|_| Error::Config("subject payload too large".into()))?;
        Ok(buf)
    }

    /// Decode and check it against the store's dimension.
    pub(crate) fn decode(bytes: &[u8], dim: usize) -> Result<Self> {
        let p: SubjectPayload = codec()
            .deserialize(bytes)
            .map_err(|_| Error::tampered("subject payload"))?;
        if p.templates.is_empty()
            || p.templates.iter().any(|t| t.values().len() != dim)
            || p.consent.purposes().next().is_none()
        {
            return Err(Error::tampered("subject payload"));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::consent::Purpose;

    #[test]
    fn record_roundtrip_and_short_input() {
        let r = SubjectRecord {
            generation: 7,
            wrapped_dek: [5u8; WRAPPED_DEK_LEN],
            payload: vec![9u8; 40],
        };
        let e = r.encode();
        assert_eq!(SubjectRecord::decode(&e).expect("decode"), r);
        for n in 0..HEAD_LEN + OVERHEAD {
            assert!(SubjectRecord::decode(&e[..n]).is_err(), "length {n}");
        }
        let mut v2 = e.clone();
        v2[0] = 2;
        assert!(matches!(
            SubjectRecord::decode(&v2),
            Err(Error::Tampered { .. })
        ));
    }

    #[test]
    fn payload_roundtrip_and_dimension_check() {
        let p = SubjectPayload {
            consent: Consent::new([Purpose::IDENTITY_VERIFICATION])
                .expires_at(Timestamp::from_unix_secs(10)),
            templates: vec![Template::from_raw(vec![1, -2, 3])],
        };
        let bytes = p.encode().expect("encode");
        let q = SubjectPayload::decode(&bytes, 3).expect("decode");
        assert_eq!(q.templates[0].values(), &[1, -2, 3]);
        assert_eq!(q.consent, p.consent);
        assert!(SubjectPayload::decode(&bytes, 4).is_err());
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(
            SubjectPayload::decode(&longer, 3).is_err(),
            "trailing bytes"
        );
    }
}
