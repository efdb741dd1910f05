//! Subject records and bucket key tables.
//!
//! A subject record is a fixed envelope around two values sealed under the
//! subject's DEK: the bincode-encoded payload (consent, and the templates of
//! a server-custody subject) and the state (failure counter, last failure,
//! last interaction); between them, for a split-custody subject, its
//! templates sealed under the key derived from the server half and the
//! person's user key ([`crate::crypto::custody`]). One record, so that a
//! verify reads one value; a state change rewrites the record with the
//! payload's and templates' sealed bytes unchanged.
//!
//! ```text
//! 0          format version (4)
//! 1..5       payload length L (u32 BE), at least 28
//! 5..5+L     payload: nonce 12 | AES-256-GCM_DEK(bincode(SubjectPayload)) | tag 16
//!            associated data "bioseal/v1/subject" | store id | pseudonym | format version
//! +4         templates length T (u32 BE): 0 (server custody) or at least 28
//! +T         split custody: nonce 12 | AES-256-GCM_Kt(bincode(templates)) | tag 16
//!            associated data "bioseal/v1/templates" | store id | pseudonym
//! ..end      state: nonce 12 | AES-256-GCM_DEK(SubjectState) | tag 16
//!            associated data "bioseal/v1/state" | store id | pseudonym
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
use zeroize::{Zeroize, Zeroizing};

pub(crate) const RECORD_VERSION: u8 = 4;
const RECORD_HEAD: usize = 1 + 4;
pub(crate) const WRAPPED_DEK_LEN: usize = 32 + OVERHEAD;
const TABLE_VERSION: u8 = 1;
const TABLE_HEAD: usize = 1 + 8;
const ENTRY_LEN: usize = 32 + WRAPPED_DEK_LEN;
/// Upper bound on a decoded payload (64 templates of 4096 dimensions fit).
const MAX_PAYLOAD: u64 = 1 << 20;

/// The outer, non-secret envelope of a subject record: its sealed values,
/// not decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectRecord {
    pub(crate) payload: Vec<u8>,
    /// A split-custody subject's sealed templates; empty in server custody.
    pub(crate) templates: Vec<u8>,
    pub(crate) state: Vec<u8>,
}

impl SubjectRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(
            RECORD_HEAD + 4 + self.payload.len() + self.templates.len() + self.state.len(),
        );
        v.push(RECORD_VERSION);
        // A payload (and sealed templates) is at most MAX_PAYLOAD plus the
        // AEAD overhead.
        v.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.payload);
        v.extend_from_slice(&(self.templates.len() as u32).to_be_bytes());
        v.extend_from_slice(&self.templates);
        v.extend_from_slice(&self.state);
        v
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < RECORD_HEAD + 4 + 2 * OVERHEAD {
            return Err(Error::tampered("subject record (too short)"));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(Error::tampered("subject record (unknown format version)"));
        }
        let (payload, rest) = split_section(&bytes[1..])
            .filter(|(p, _)| p.len() >= OVERHEAD)
            .ok_or(Error::tampered("subject record (payload length)"))?;
        let (templates, state) = split_section(rest)
            .filter(|(t, s)| (t.is_empty() || t.len() >= OVERHEAD) && s.len() >= OVERHEAD)
            .ok_or(Error::tampered("subject record (templates length)"))?;
        Ok(SubjectRecord {
            payload: payload.to_vec(),
            templates: templates.to_vec(),
            state: state.to_vec(),
        })
    }
}

/// Split `bytes` after a u32 BE length prefix and that many bytes.
fn split_section(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let n = u32::from_be_bytes(*len) as usize;
    (rest.len() >= n).then(|| rest.split_at(n))
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

/// What a subject's DEK seals: consent, and the templates (server custody)
/// or what is needed to open them with the person's user key (split
/// custody).
#[derive(Serialize, Deserialize)]
pub(crate) struct SubjectPayload {
    pub(crate) consent: Consent,
    /// Server custody: the templates. Split custody: empty (they are in
    /// the record's templates section, sealed under the derived key).
    pub(crate) templates: Vec<Template>,
    pub(crate) split: Option<SplitHalf>,
}

/// The server's part of a split-custody subject: the server half of its
/// template key, how many templates it holds (so that a refused or
/// wrong-key verify costs what a comparison would), and the SHA-256 of its
/// sealed templates (so that an altered section is `Tampered`, not a wrong
/// user key).
#[derive(Serialize, Deserialize)]
pub(crate) struct SplitHalf {
    #[serde(with = "bytes32")]
    pub(crate) server_half: [u8; 32],
    pub(crate) count: u32,
    #[serde(with = "bytes32")]
    pub(crate) digest: [u8; 32],
}

/// A 32-byte array as one byte string: serde's default for arrays is a
/// tuple of 32 elements, decoded one by one, which costs a split-custody
/// verify about 0.3 µs (measured with `perf`).
mod bytes32 {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = [u8; 32];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes")
            }
            fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<[u8; 32], E> {
                b.try_into().map_err(|_| E::invalid_length(b.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl Drop for SplitHalf {
    fn drop(&mut self) {
        self.server_half.zeroize();
    }
}

/// Encode templates alone (a split subject's sealed section) into a buffer
/// wiped on drop.
pub(crate) fn encode_templates(templates: &[Template]) -> Result<Zeroizing<Vec<u8>>> {
    let c = codec();
    let size = c
        .serialized_size(templates)
        .map_err(|_| Error::Config("templates too large".into()))?;
    let mut buf = Zeroizing::new(Vec::with_capacity(size as usize));
    c.serialize_into(&mut *buf, templates)
        .map_err(|_| Error::Config("templates too large".into()))?;
    Ok(buf)
}

/// Decode a split subject's opened templates, checked against the count
/// its payload vouches for and the store's dimension.
pub(crate) fn decode_templates(bytes: &[u8], dim: usize, count: u32) -> Result<Vec<Template>> {
    let t: Vec<Template> = codec()
        .deserialize(bytes)
        .map_err(|_| Error::tampered("subject templates"))?;
    if t.len() != count as usize || t.iter().any(|t| t.values().len() != dim) {
        return Err(Error::tampered("subject templates"));
    }
    Ok(t)
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
        let templates_ok = match &p.split {
            None => !p.templates.is_empty(),
            Some(s) => p.templates.is_empty() && (1..=64).contains(&s.count),
        };
        if !templates_ok
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
        for t in [0usize, 50] {
            let r = SubjectRecord {
                payload: vec![9u8; 40],
                templates: vec![7u8; t],
                state: vec![8u8; 30],
            };
            let e = r.encode();
            assert_eq!(e.len(), RECORD_HEAD + 4 + 70 + t);
            assert_eq!(SubjectRecord::decode(&e).expect("decode"), r);
            // Every truncation that leaves the state shorter than a seal fails.
            for n in 0..RECORD_HEAD + 4 + 40 + t + OVERHEAD {
                assert!(SubjectRecord::decode(&e[..n]).is_err(), "length {n}");
            }
            let mut v2 = e.clone();
            v2[0] = 3;
            assert!(matches!(
                SubjectRecord::decode(&v2),
                Err(Error::Tampered { .. })
            ));
            // Payload lengths below a seal, or past the end, are refused.
            for l in [0u32, 27, 43 + t as u32 + 4, u32::MAX] {
                let mut v = e.clone();
                v[1..RECORD_HEAD].copy_from_slice(&l.to_be_bytes());
                assert!(
                    matches!(SubjectRecord::decode(&v), Err(Error::Tampered { .. })),
                    "payload length field {l}"
                );
            }
            // Templates lengths that are neither 0 nor a seal, or leave the
            // state short, are refused.
            let at = RECORD_HEAD + 40;
            for l in [1u32, 27, t as u32 + 3, u32::MAX] {
                let mut v = e.clone();
                v[at..at + 4].copy_from_slice(&l.to_be_bytes());
                assert!(
                    matches!(SubjectRecord::decode(&v), Err(Error::Tampered { .. })),
                    "templates length field {l}"
                );
            }
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
            split: None,
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

    #[test]
    fn split_payload_and_templates_codec() {
        let split = |templates: Vec<Template>, count| SubjectPayload {
            consent: Consent::new([Purpose::IDENTITY_VERIFICATION]),
            templates,
            split: Some(SplitHalf {
                server_half: [5; 32],
                count,
                digest: [6; 32],
            }),
        };
        let ok = split(Vec::new(), 2).encode().expect("encode");
        let q = SubjectPayload::decode(&ok, 3).expect("decode");
        assert_eq!(
            q.split.as_ref().map(|s| (s.count, s.server_half[0])),
            Some((2, 5))
        );
        // A split payload holds no templates, and vouches for 1 to 64.
        for bad in [
            split(vec![Template::from_raw(vec![1, 2, 3])], 1),
            split(Vec::new(), 0),
            split(Vec::new(), 65),
        ] {
            let b = bad.encode().expect("encode");
            assert!(SubjectPayload::decode(&b, 3).is_err());
        }
        let t = vec![
            Template::from_raw(vec![1, 2, 3]),
            Template::from_raw(vec![4, 5, 6]),
        ];
        let e = encode_templates(&t).expect("encode");
        let d = decode_templates(&e, 3, 2).expect("decode");
        assert_eq!(d[1].values(), &[4, 5, 6]);
        assert!(decode_templates(&e, 3, 1).is_err(), "count");
        assert!(decode_templates(&e, 4, 2).is_err(), "dimension");
        assert!(decode_templates(&e[..e.len() - 1], 3, 2).is_err());
    }
}
