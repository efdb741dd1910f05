//! Subject records and bucket key tables.
//!
//! A subject record is a fixed envelope around two values sealed under the
//! subject's DEK: the bincode-encoded payload (consent and templates) and the
//! state (failure counter, last failure, last interaction). One record, so
//! that a verify reads one value; a state change rewrites the record with
//! the payload's sealed bytes unchanged.
//!
//! ```text
//! 0        format version (3)
//! 1..5     payload length L (u32 BE), at least 28
//! 5..5+L   payload: nonce 12 | AES-256-GCM_DEK(bincode(SubjectPayload)) | tag 16
//!          associated data "bioseal/v1/subject" | store id | pseudonym | format version
//! 5+L..    state: nonce 12 | AES-256-GCM_DEK(SubjectState) | tag 16
//!          associated data "bioseal/v1/state" | store id | pseudonym
//! ```
//!
//! The subject's DEK is not in its record but in its bucket's key table, one
//! value per bucket, so that rotating a bucket's KEK rewrites one small value
//! instead of every record of the bucket:
//!
//! ```text
//! 0        table format version (1)
//! 1..9     KEK generation every entry is wrapped under (u64 BE)
//! 9..      entries sorted by pseudonym, each 92 bytes:
//!          pseudonym 32 | wrapped DEK: nonce 12 | AES-256-GCM_KEK(DEK) 32 | tag 16
//!          associated data "bioseal/v1/dek" | store id | pseudonym | bucket | generation
//! ```

use crate::consent::Consent;
use crate::crypto::aead::OVERHEAD;
use crate::crypto::pseudonym::Pseudonym;
use crate::embedding::Template;
use crate::error::{Error, Result};
use bincode::Options;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub(crate) const RECORD_VERSION: u8 = 3;
const RECORD_HEAD: usize = 1 + 4;
pub(crate) const WRAPPED_DEK_LEN: usize = 32 + OVERHEAD;
const TABLE_VERSION: u8 = 1;
const TABLE_HEAD: usize = 1 + 8;
const ENTRY_LEN: usize = 32 + WRAPPED_DEK_LEN;
/// Upper bound on a decoded payload (64 templates of 4096 dimensions fit).
const MAX_PAYLOAD: u64 = 1 << 20;

/// The outer, non-secret envelope of a subject record: its two sealed
/// values, not decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectRecord {
    pub(crate) payload: Vec<u8>,
    pub(crate) state: Vec<u8>,
}

impl SubjectRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(RECORD_HEAD + self.payload.len() + self.state.len());
        v.push(RECORD_VERSION);
        // A payload is at most MAX_PAYLOAD plus the AEAD overhead.
        v.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.payload);
        v.extend_from_slice(&self.state);
        v
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < RECORD_HEAD + 2 * OVERHEAD {
            return Err(Error::tampered("subject record (too short)"));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(Error::tampered("subject record (unknown format version)"));
        }
        let mut l = [0u8; 4];
        l.copy_from_slice(&bytes[1..RECORD_HEAD]);
        let l = u32::from_be_bytes(l) as usize;
        let rest = &bytes[RECORD_HEAD..];
        if l < OVERHEAD || rest.len() < l.saturating_add(OVERHEAD) {
            return Err(Error::tampered("subject record (payload length)"));
        }
        let (payload, state) = rest.split_at(l);
        Ok(SubjectRecord {
            payload: payload.to_vec(),
            state: state.to_vec(),
        })
    }
}

/// A bucket's key table, checked for shape (version, length, strictly
/// increasing pseudonyms) but not decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DekTable {
    pub(crate) generation: u64,
    pub(crate) entries: Vec<([u8; 32], [u8; WRAPPED_DEK_LEN])>,
}

impl DekTable {
    pub(crate) fn new(generation: u64) -> Self {
        DekTable {
            generation,
            entries: Vec::new(),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(TABLE_HEAD + self.entries.len() * ENTRY_LEN);
        v.push(TABLE_VERSION);
        v.extend_from_slice(&self.generation.to_be_bytes());
        for (p, w) in &self.entries {
            v.extend_from_slice(p);
            v.extend_from_slice(w);
        }
        v
    }

    /// Check the shape of an encoded table; returns its generation.
    fn check(bytes: &[u8]) -> Result<u64> {
        if bytes.len() < TABLE_HEAD
            || bytes[0] != TABLE_VERSION
            || !(bytes.len() - TABLE_HEAD).is_multiple_of(ENTRY_LEN)
        {
            return Err(Error::tampered("bucket key table"));
        }
        let mut g = [0u8; 8];
        g.copy_from_slice(&bytes[1..TABLE_HEAD]);
        Ok(u64::from_be_bytes(g))
    }

    fn entry(bytes: &[u8], i: usize) -> &[u8] {
        &bytes[TABLE_HEAD + i * ENTRY_LEN..TABLE_HEAD + (i + 1) * ENTRY_LEN]
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let generation = Self::check(bytes)?;
        let n = (bytes.len() - TABLE_HEAD) / ENTRY_LEN;
        let mut entries: Vec<([u8; 32], [u8; WRAPPED_DEK_LEN])> = Vec::with_capacity(n);
        for i in 0..n {
            let e = Self::entry(bytes, i);
            let mut p = [0u8; 32];
            p.copy_from_slice(&e[..32]);
            let mut w = [0u8; WRAPPED_DEK_LEN];
            w.copy_from_slice(&e[32..]);
            if entries.last().is_some_and(|(q, _)| *q >= p) {
                return Err(Error::tampered("bucket key table (order)"));
            }
            entries.push((p, w));
        }
        Ok(DekTable {
            generation,
            entries,
        })
    }

    /// Find `p`'s wrapped DEK in an encoded table without decoding it all
    /// (binary search over the fixed-size entries). Returns the table's
    /// generation and the wrapped DEK, or `None` if `p` has no entry.
    pub(crate) fn find(
        bytes: &[u8],
        p: &Pseudonym,
    ) -> Result<Option<(u64, [u8; WRAPPED_DEK_LEN])>> {
        let generation = Self::check(bytes)?;
        let (mut lo, mut hi) = (0, (bytes.len() - TABLE_HEAD) / ENTRY_LEN);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = Self::entry(bytes, mid);
            match e[..32].cmp(&p.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    let mut w = [0u8; WRAPPED_DEK_LEN];
                    w.copy_from_slice(&e[32..]);
                    return Ok(Some((generation, w)));
                }
            }
        }
        Ok(None)
    }

    /// Insert or replace `p`'s entry.
    pub(crate) fn put(&mut self, p: &Pseudonym, wrapped: [u8; WRAPPED_DEK_LEN]) {
        match self.entries.binary_search_by(|(q, _)| q.cmp(&p.0)) {
            Ok(i) => self.entries[i].1 = wrapped,
            Err(i) => self.entries.insert(i, (p.0, wrapped)),
        }
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
    fn record_roundtrip_and_malformed_input() {
        let r = SubjectRecord {
            payload: vec![9u8; 40],
            state: vec![8u8; 30],
        };
        let e = r.encode();
        assert_eq!(e.len(), RECORD_HEAD + 70);
        assert_eq!(SubjectRecord::decode(&e).expect("decode"), r);
        // Every truncation that leaves the state shorter than a seal fails.
        for n in 0..RECORD_HEAD + 40 + OVERHEAD {
            assert!(SubjectRecord::decode(&e[..n]).is_err(), "length {n}");
        }
        let mut v2 = e.clone();
        v2[0] = 2;
        assert!(matches!(
            SubjectRecord::decode(&v2),
            Err(Error::Tampered { .. })
        ));
        // Payload lengths below a seal, or past the end, are refused.
        for l in [0u32, 27, 43, u32::MAX] {
            let mut v = e.clone();
            v[1..RECORD_HEAD].copy_from_slice(&l.to_be_bytes());
            assert!(
                matches!(SubjectRecord::decode(&v), Err(Error::Tampered { .. })),
                "length field {l}"
            );
        }
    }

    #[test]
    fn table_put_find_and_shape_checks() {
        let mut t = DekTable::new(3);
        for i in [5u8, 1, 9, 3, 7] {
            t.put(&Pseudonym([i; 32]), [i; WRAPPED_DEK_LEN]);
        }
        t.put(&Pseudonym([3; 32]), [33; WRAPPED_DEK_LEN]);
        let e = t.encode();
        assert_eq!(DekTable::decode(&e).expect("decode"), t);
        assert_eq!(t.entries.len(), 5);
        for i in [1u8, 5, 7, 9] {
            assert_eq!(
                DekTable::find(&e, &Pseudonym([i; 32])).expect("find"),
                Some((3, [i; WRAPPED_DEK_LEN]))
            );
        }
        assert_eq!(
            DekTable::find(&e, &Pseudonym([3; 32])).expect("find"),
            Some((3, [33; WRAPPED_DEK_LEN]))
        );
        for i in [0u8, 2, 4, 10, 255] {
            assert_eq!(DekTable::find(&e, &Pseudonym([i; 32])).expect("find"), None);
        }
        assert!(DekTable::decode(&e[..e.len() - 1]).is_err());
        assert!(DekTable::find(&e[..8], &Pseudonym([1; 32])).is_err());
        let mut swapped = e.clone();
        swapped[9] = 0xff; // first pseudonym now sorts after the second
        assert!(DekTable::decode(&swapped).is_err());
        let mut version = e;
        version[0] = 9;
        assert!(DekTable::find(&version, &Pseudonym([1; 32])).is_err());
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
