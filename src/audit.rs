//! The audit log: every enrollment, verification, revocation, expiry, sweep,
//! shred, consent change, attempt reset and key rotation, hash-chained and
//! MACed. It holds pseudonyms, purposes, outcomes and counts: never a
//! template, a score, a key or a subject id.
//!
//! Entry `i` is stored in sled tree `audit` under its sequence number (u64
//! BE) as `sealed_i || mac_i`, where `sealed_i` is `bincode(entry)` sealed
//! with AES-256-GCM under the audit sealing key (associated data: the
//! sequence number), so that purposes and times are not readable at rest, and
//! `mac_i = HMAC-SHA-256(audit MAC key, "bioseal/v1/audit" || mac_{i-1} || sealed_i)`
//! with `mac_{-1}` = 32 zero bytes. Both keys are HKDF-derived from the audit
//! key in the keyring. Each MAC covers its predecessor, so an
//! edited, dropped, reordered or inserted entry breaks the chain at that
//! entry. Dropping the newest entries leaves a valid shorter chain: record
//! [`AuditHead`]s outside the store and check them with
//! [`AuditLog::verify_against`].

use crate::clock::Timestamp;
use crate::consent::Purpose;
use crate::crypto::aead::AeadKey;
use crate::crypto::hkdf32;
use crate::crypto::pseudonym::Pseudonym;
use crate::error::{Error, Result};
use bincode::Options;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::sync::Mutex;
use subtle::ConstantTimeEq;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditEvent {
    /// A template was enrolled.
    Enroll,
    /// A verification was asked for.
    Verify,
    /// A subject was revoked.
    Revoke,
    /// A subject was destroyed because its consent expired or it was
    /// inactive too long.
    Expire,
    /// A retention sweep ran (`count`: subjects expired).
    Sweep,
    /// Pending shreds were completed (`count`: buckets rotated).
    Shred,
    /// A consent was renewed or replaced.
    ConsentRenewed,
    /// A purpose was withdrawn.
    PurposeWithdrawn,
    /// A bucket KEK was rotated (`bucket`, `generation`).
    KeyRotation,
    /// An operator reset a subject's failed-attempt counter.
    AttemptsReset,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditOutcome {
    /// Done.
    Ok,
    /// Verification matched.
    Match,
    /// Verification did not match.
    NoMatch,
    /// Refused: waiting period after repeated failures.
    LockedOut,
    /// Refused: verification disabled after too many failures.
    Disabled,
    /// Refused and destroyed: consent expired.
    ConsentExpired,
    /// Refused and destroyed: inactive past the retention limit.
    RetentionExpired,
    /// Refused: purpose not consented.
    PurposeNotConsented,
    /// Refused: no such subject.
    NotEnrolled,
    /// Refused: invalid probe, or stored data failed to open.
    Error,
    /// Revoked; the shred is pending.
    ShredPending,
    /// Revoked and shredded.
    Shredded,
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number, from 0, without gaps.
    pub seq: u64,
    /// When.
    pub time: Timestamp,
    /// What.
    pub event: AuditEvent,
    /// Subject pseudonym (HMAC of the subject id), if the event has a subject.
    pub subject: Option<[u8; 32]>,
    /// Purpose, for verifications and consent changes.
    pub purpose: Option<Purpose>,
    /// Outcome.
    pub outcome: Option<AuditOutcome>,
    /// Bucket, for key rotations.
    pub bucket: Option<u32>,
    /// KEK generation, for key rotations.
    pub generation: Option<u64>,
    /// A count, for sweeps and shreds.
    pub count: Option<u64>,
}

impl AuditEntry {
    pub(crate) fn new(event: AuditEvent) -> Self {
        AuditEntry {
            seq: 0,
            time: Timestamp::default(),
            event,
            subject: None,
            purpose: None,
            outcome: None,
            bucket: None,
            generation: None,
            count: None,
        }
    }
    pub(crate) fn subject(mut self, p: &Pseudonym) -> Self {
        self.subject = Some(p.0);
        self
    }
    pub(crate) fn purpose(mut self, p: &Purpose) -> Self {
        self.purpose = Some(p.clone());
        self
    }
    pub(crate) fn outcome(mut self, o: AuditOutcome) -> Self {
        self.outcome = Some(o);
        self
    }
    pub(crate) fn rotation(mut self, bucket: u32, generation: u64) -> Self {
        self.bucket = Some(bucket);
        self.generation = Some(generation);
        self
    }
    pub(crate) fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }
}

/// Where a verified chain ends: record it outside the store to detect later
/// truncation or rollback of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// Number of entries (the next sequence number).
    pub entries: u64,
    /// MAC of the last entry (zeros for an empty log).
    pub last_mac: [u8; 32],
}

/// The store's audit log. Obtain it with [`crate::Store::audit`].
pub struct AuditLog {
    tree: sled::Tree,
    key: hmac::Key,
    seal: AeadKey,
    /// Next sequence number and the MAC of the last entry.
    head: Mutex<(u64, [u8; 32])>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("key", &format_args!("[REDACTED]"))
            .finish_non_exhaustive()
    }
}

const MAC_LEN: usize = 32;

fn codec() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(4096)
        .reject_trailing_bytes()
}

fn mac(key: &hmac::Key, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(b"bioseal/v1/audit");
    ctx.update(prev);
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn entry_aad(seq: u64) -> [u8; 28] {
    let mut a = [0u8; 28];
    a[..20].copy_from_slice(b"bioseal/v1/audit-ent");
    a[20..].copy_from_slice(&seq.to_be_bytes());
    a
}

fn split(value: &[u8]) -> Option<(&[u8], &[u8])> {
    (value.len() > MAC_LEN).then(|| value.split_at(value.len() - MAC_LEN))
}

impl AuditLog {
    pub(crate) fn open(tree: sled::Tree, audit_key: &[u8; 32]) -> Result<Self> {
        let head = match tree.last()? {
            None => (0, [0u8; 32]),
            Some((k, v)) => {
                let mut seq = [0u8; 8];
                if k.len() != 8 {
                    return Err(Error::AuditChainBroken { seq: 0 });
                }
                seq.copy_from_slice(&k);
                // A damaged last entry is reported by verify_chain; appending
                // goes on after it so that new events are not lost.
                let mut last = [0u8; 32];
                if let Some((_, m)) = split(&v) {
                    last.copy_from_slice(m);
                }
                (u64::from_be_bytes(seq).saturating_add(1), last)
            }
        };
        let mac_key = hkdf32(b"bioseal", audit_key, b"bioseal/v1/audit-mac");
        let seal_key = hkdf32(b"bioseal", audit_key, b"bioseal/v1/audit-seal");
        Ok(AuditLog {
            tree,
            key: hmac::Key::new(hmac::HMAC_SHA256, mac_key.as_ref()),
            seal: AeadKey::new(&seal_key),
            head: Mutex::new(head),
        })
    }

    /// Append an entry (time and sequence number are filled in). Written to
    /// sled at once; durable at the next flush.
    pub(crate) fn append(&self, time: Timestamp, mut entry: AuditEntry) -> Result<()> {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        entry.seq = head.0;
        entry.time = time;
        let body = codec()
            .serialize(&entry)
            .map_err(|_| Error::Config("audit entry encoding".into()))?;
        let mut value = self.seal.seal(&entry_aad(entry.seq), &body)?;
        let m = mac(&self.key, &head.1, &value);
        value.extend_from_slice(&m);
        self.tree.insert(entry.seq.to_be_bytes(), value)?;
        *head = (entry.seq + 1, m);
        Ok(())
    }

    /// Walk the whole log: sequence numbers from 0 without gaps, each entry
    /// decodes, carries its own sequence number, and its MAC chains from the
    /// previous one. Returns the head, or [`Error::AuditChainBroken`] naming
    /// the first entry that fails.
    pub fn verify_chain(&self) -> Result<AuditHead> {
        let mut prev = [0u8; 32];
        let mut expected = 0u64;
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let broken = Error::AuditChainBroken { seq: expected };
            if k.as_ref() != expected.to_be_bytes() {
                return Err(broken);
            }
            let (sealed, m) = split(&v).ok_or(Error::AuditChainBroken { seq: expected })?;
            if !bool::from(mac(&self.key, &prev, sealed).ct_eq(m)) {
                return Err(broken);
            }
            if self.open_entry(expected, sealed)?.seq != expected {
                return Err(broken);
            }
            prev.copy_from_slice(m);
            expected += 1;
        }
        Ok(AuditHead {
            entries: expected,
            last_mac: prev,
        })
    }

    /// [`AuditLog::verify_chain`], and check that the log still contains the
    /// entry an earlier head ended at, unchanged: detects truncation and
    /// rollback past that point.
    pub fn verify_against(&self, anchor: &AuditHead) -> Result<AuditHead> {
        let head = self.verify_chain()?;
        if anchor.entries == 0 {
            return Ok(head);
        }
        let last = anchor.entries - 1;
        let ok = match self.tree.get(last.to_be_bytes())? {
            Some(v) => split(&v).is_some_and(|(_, m)| bool::from(m.ct_eq(&anchor.last_mac))),
            None => false,
        };
        if ok {
            Ok(head)
        } else {
            Err(Error::AuditChainBroken {
                seq: last.min(head.entries),
            })
        }
    }

    fn open_entry(&self, seq: u64, sealed: &[u8]) -> Result<AuditEntry> {
        let body = self
            .seal
            .open(&entry_aad(seq), sealed)
            .map_err(|_| Error::AuditChainBroken { seq })?;
        codec()
            .deserialize(&body)
            .map_err(|_| Error::AuditChainBroken { seq })
    }

    /// All entries, in order. Does not verify the chain.
    pub fn entries(&self) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let mut seq = [0u8; 8];
            if k.len() == 8 {
                seq.copy_from_slice(&k);
            }
            let seq = u64::from_be_bytes(seq);
            let (sealed, _) = split(&v).ok_or(Error::AuditChainBroken { seq })?;
            out.push(self.open_entry(seq, sealed)?);
        }
        Ok(out)
    }

    /// Write the log as JSON lines, one entry per line, for compliance
    /// review. Verifies the chain first and refuses to export a broken one.
    /// Returns the number of lines.
    pub fn export(&self, mut out: impl Write) -> Result<u64> {
        self.verify_chain()?;
        let mut n = 0;
        for kv in self.tree.iter() {
            let (_, v) = kv?;
            let (sealed, m) = split(&v).ok_or(Error::AuditChainBroken { seq: n })?;
            let e = self.open_entry(n, sealed)?;
            let line = ExportLine {
                seq: e.seq,
                time: e.time.unix_secs(),
                event: e.event,
                subject: e.subject.map(|p| hex(&p)),
                purpose: e.purpose.as_ref().map(Purpose::as_str),
                outcome: e.outcome,
                bucket: e.bucket,
                generation: e.generation,
                count: e.count,
                mac: hex(m),
            };
            serde_json::to_writer(&mut out, &line).map_err(|e| Error::Io(e.into()))?;
            out.write_all(b"\n")?;
            n += 1;
        }
        Ok(n)
    }
}

#[derive(Serialize)]
struct ExportLine<'a> {
    seq: u64,
    time: u64,
    event: AuditEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<AuditOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bucket: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    mac: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
