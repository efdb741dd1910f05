//! The audit log: every enrollment, verification, revocation, expiry, sweep,
//! shred, consent change, attempt reset and key rotation, hash-chained and
//! MACed. It holds pseudonyms, purposes, outcomes and counts: never a
//! template, a score, a key or a subject id.
//!
//! Entry `i` is sealed as `sealed_i` = AES-256-GCM(bincode(entry)) under
//! the audit sealing key (associated data: the sequence number), so that
//! purposes and times are not readable at rest, and chained by
//! `mac_i = HMAC-SHA-256(audit MAC key, "bioseal/v1/audit" || mac_{i-1} || sealed_i)`
//! with `mac_{-1}` = 32 zero bytes. Both keys are HKDF-derived from the audit
//! key in the keyring.
//!
//! Storage: sled tree `audit` holds segments of up to 256 consecutive
//! entries. Key: the first entry's sequence number (u64 BE). Value: the
//! entries, each `len (u32 BE) || sealed_i || mac_i` with `len` counting
//! `sealed_i || mac_i`.
//!
//! `append` only hands out the sequence number and queues the entry (a
//! verify holds the audit lock for well under a microsecond); the drainer
//! (the store's flusher thread, every durable operation, every reader)
//! seals, chains and writes queued entries in order, one sled insert per
//! segment. Drains are serialised, so a crash loses at most a suffix of the
//! log, never a middle entry.
//!
//! Each MAC covers its predecessor, so an edited, dropped, reordered or
//! inserted entry breaks the chain at that entry. Dropping the newest
//! entries leaves a valid shorter chain: record [`AuditHead`]s outside the
//! store and check them with [`AuditLog::verify_against`].

use crate::clock::Timestamp;
use crate::consent::Purpose;
use crate::crypto::aead::AeadKey;
use crate::crypto::hkdf32;
use crate::crypto::pseudonym::Pseudonym;
use crate::error::{Error, Result};
use crate::storage::{Backend, Table, Writes};
use bincode::Options;
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
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
    /// A template was added after a matching probe.
    TemplateAdded,
    /// The store was opened on data older than the keyring's high-water
    /// mark, by the operator's explicit choice (`count`: marks rolled back).
    RollbackAccepted,
    /// The match threshold kept in the keyring was changed.
    ThresholdChanged,
    /// The operator confirmed a clock reading more than the maximum jump
    /// past the latest time seen (`count`: seconds jumped).
    ClockJumpAccepted,
    /// The key epoch was rolled (`count`: the new epoch): the keyring
    /// re-sealed under its root key and the old epoch's destroyed.
    EpochRolled,
    /// A backup was taken (`count`: records copied).
    BackupTaken,
    /// The store was restored from a backup and the revocation ledger
    /// replayed (`count`: ledger entries replayed).
    Restored,
    /// A split-custody subject's user key was changed (the templates
    /// re-sealed under a new server half and the new user key).
    UserKeyChanged,
    /// A server-custody subject was moved to split custody.
    CustodyMovedToSplit,
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
    /// Refused: the subject is already enrolled (an enrollment over it).
    AlreadyEnrolled,
    /// Refused: the subject holds the maximum number of templates.
    TooManyTemplates,
    /// Refused and counted as a failed attempt: a split-custody subject's
    /// user key was missing or wrong.
    WrongUserKey,
    /// Refused: a user key was given for a server-custody subject.
    NotSplitCustody,
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
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    db: Arc<dyn Backend>,
    key: hmac::Key,
    /// HKDF input of the per-segment sealing keys: each segment (one sled
    /// value, at most 256 entries) is sealed under its own key, derived
    /// from its first sequence number, so no key seals more than 256
    /// entries (random 96-bit nonces stay far inside their budget).
    seal_root: zeroize::Zeroizing<[u8; 32]>,
    /// Next sequence number, and entries not yet sealed and written.
    queue: Mutex<Queue>,
    /// MAC of the last written entry and the number of entries written.
    /// Held for a whole drain, which serialises drains.
    chain: Mutex<([u8; 32], u64)>,
}

struct Queue {
    next_seq: u64,
    entries: Vec<AuditEntry>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("key", &format_args!("[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// Entries per sled value.
const SEGMENT: usize = 256;
/// Queued entries at which `append` asks the flusher to drain, so that the
/// sealing and MAC work runs off the caller's thread.
pub(crate) const WAKE_AT: usize = 1024;
/// Queued entries that make `append` drain by itself (the flusher normally
/// drains first).
const QUEUE_LIMIT: usize = 8192;

const MAC_LEN: usize = 32;

fn codec() -> impl Options + Copy {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(4096)
        .reject_trailing_bytes()
}

fn mac(key: &hmac::Key, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    crate::crypto::hmac256(key, &[b"bioseal/v1/audit", prev, body])
}

/// Open entry `seq` under its segment's key.
fn open_entry(key: &AeadKey, seq: u64, sealed: &[u8]) -> Result<AuditEntry> {
    let body = key
        .open(&entry_aad(seq), sealed)
        .map_err(|_| Error::AuditChainBroken { seq })?;
    codec()
        .deserialize(&body)
        .map_err(|_| Error::AuditChainBroken { seq })
}

/// The sealing key of the segment whose first entry is `first`.
fn segment_key(root: &[u8; 32], first: u64) -> AeadKey {
    AeadKey::new(&hkdf32(
        &first.to_be_bytes(),
        root,
        b"bioseal/v2/audit-segment",
    ))
}

fn entry_aad(seq: u64) -> [u8; 28] {
    let mut a = [0u8; 28];
    a[..20].copy_from_slice(b"bioseal/v1/audit-ent");
    a[20..].copy_from_slice(&seq.to_be_bytes());
    a
}

/// An entry's `sealed` and `mac` parts, borrowed from its segment.
type RawEntry<'a> = (&'a [u8], &'a [u8]);

/// Split a segment into its entries; the flag is false when a length field
/// is malformed (the entries before it are returned).
fn entries_of(value: &[u8]) -> (Vec<RawEntry<'_>>, bool) {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return (out, false);
        }
        let (l, r) = rest.split_at(4);
        let len = u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize;
        if len <= MAC_LEN || len > r.len() {
            return (out, false);
        }
        let (entry, r) = r.split_at(len);
        out.push(entry.split_at(len - MAC_LEN));
        rest = r;
    }
    (out, true)
}

/// The next sequence number and the MAC of the last stored entry.
fn tail(db: &dyn Backend) -> Result<(u64, [u8; 32])> {
    Ok(match db.last(Table::Audit, None)? {
        None => (0, [0u8; 32]),
        Some((k, v)) => {
            let first: [u8; 8] = k
                .as_slice()
                .try_into()
                .map_err(|_| Error::AuditChainBroken { seq: 0 })?;
            // A damaged last segment is reported by verify_chain;
            // appending goes on after what parses, so that new events
            // are not lost.
            let (entries, _) = entries_of(&v);
            let mut last = [0u8; 32];
            if let Some((_, m)) = entries.last() {
                last.copy_from_slice(m);
            }
            (
                u64::from_be_bytes(first).saturating_add(entries.len() as u64),
                last,
            )
        }
    })
}

impl Inner {
    /// Seal, chain and write every queued entry, in order (not flushed: the
    /// caller flushes).
    ///
    /// Shared mode (several replicas on one database): one global sequence.
    /// The drain takes the audit lock, continues the chain from the stored
    /// tail (whoever wrote it), numbers its entries from there and writes
    /// them in one statement. A failed write puts the entries back at the
    /// front of the queue: nothing acknowledged is dropped from the log.
    pub(crate) fn drain(&self) -> Result<()> {
        if self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .is_empty()
        {
            return Ok(());
        }
        // The database's lock before this process's mutex: a thread holding
        // the (transaction-long) lock may come back for the mutex.
        let _lock = self.db.lock_audit()?;
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries =
            std::mem::take(&mut self.queue.lock().unwrap_or_else(|e| e.into_inner()).entries);
        if entries.is_empty() {
            return Ok(());
        }
        let r = self.write_entries(&mut chain, &mut entries);
        if r.is_err() {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            entries.append(&mut q.entries);
            q.entries = entries;
        }
        r
    }

    fn write_entries(&self, chain: &mut ([u8; 32], u64), entries: &mut [AuditEntry]) -> Result<()> {
        let mut next = *chain;
        if self.db.shared() {
            let (seq, mac) = tail(&*self.db)?;
            next = (mac, seq);
            for (i, e) in entries.iter_mut().enumerate() {
                e.seq = seq + i as u64;
            }
        }
        let mut w = Writes::default();
        for segment in entries.chunks(SEGMENT) {
            let mut value = Vec::with_capacity(segment.len() * 160);
            let nonces = crate::crypto::random_nonces(segment.len())?;
            let key = segment_key(&self.seal_root, segment[0].seq);
            for (e, nonce) in segment.iter().zip(&nonces) {
                let body = codec()
                    .serialize(e)
                    .map_err(|_| Error::Config("audit entry encoding".into()))?;
                let sealed = key.seal_with_nonce(nonce, &entry_aad(e.seq), &body)?;
                let m = mac(&self.key, &next.0, &sealed);
                value.extend_from_slice(&((sealed.len() + MAC_LEN) as u32).to_be_bytes());
                value.extend_from_slice(&sealed);
                value.extend_from_slice(&m);
                next = (m, e.seq + 1);
            }
            // One insert per segment (sled: no batch, whose write lock
            // would stall every concurrent read; PostgreSQL: one statement
            // for all).
            w.put(Table::Audit, segment[0].seq.to_be_bytes(), Some(value));
        }
        self.db.apply(w, false)?;
        *chain = next;
        Ok(())
    }

    /// The head of what has been written (drained) so far.
    pub(crate) fn head(&self) -> AuditHead {
        let chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        AuditHead {
            entries: chain.1,
            last_mac: chain.0,
        }
    }
}

impl AuditLog {
    /// Whether the stored log holds the entry `anchor` ends at, unchanged
    /// (one segment read: for `Store::open`'s rollback check).
    pub(crate) fn holds(&self, anchor: &AuditHead) -> Result<bool> {
        let Some(last) = anchor.entries.checked_sub(1) else {
            return Ok(true);
        };
        let Some((k, v)) = self
            .inner
            .db
            .last(Table::Audit, Some(&last.to_be_bytes()))?
        else {
            return Ok(false);
        };
        let Ok(first) = <[u8; 8]>::try_from(k.as_ref()) else {
            return Ok(false);
        };
        let (entries, _) = entries_of(&v);
        let i = last - u64::from_be_bytes(first);
        Ok(usize::try_from(i)
            .ok()
            .and_then(|i| entries.get(i))
            .is_some_and(|(_, m)| bool::from(m.ct_eq(&anchor.last_mac))))
    }

    pub(crate) fn open(db: Arc<dyn Backend>, audit_key: &[u8; 32]) -> Result<Self> {
        let (next_seq, last) = tail(&*db)?;
        let mac_key = hkdf32(b"bioseal", audit_key, b"bioseal/v1/audit-mac");
        let seal_key = hkdf32(b"bioseal", audit_key, b"bioseal/v1/audit-seal");
        Ok(AuditLog {
            inner: Arc::new(Inner {
                db,
                key: hmac::Key::new(hmac::HMAC_SHA256, mac_key.as_ref()),
                seal_root: seal_key,
                queue: Mutex::new(Queue {
                    next_seq,
                    entries: Vec::new(),
                }),
                chain: Mutex::new((last, next_seq)),
            }),
        })
    }

    /// Append an entry (time and sequence number are filled in). Queued;
    /// written by the next drain and durable at the next flush (see
    /// `Durability`). Returns true when the queue has just reached the mark
    /// at which the flusher should drain it.
    pub(crate) fn append(&self, time: Timestamp, mut entry: AuditEntry) -> Result<bool> {
        let len = {
            let mut q = self.inner.queue.lock().unwrap_or_else(|e| e.into_inner());
            entry.seq = q.next_seq;
            entry.time = time;
            q.next_seq += 1;
            q.entries.push(entry);
            q.entries.len()
        };
        if len >= QUEUE_LIMIT {
            self.inner.drain()?;
        }
        Ok(len == WAKE_AT)
    }

    /// The drainer, for the store's flusher thread and its flushes.
    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    /// Visit every stored entry in order, checking sequence numbers,
    /// decoding and (if `check_mac`) the MAC chain; `f` gets each entry and
    /// its MAC. Returns the head, or the first broken sequence number.
    fn walk(&self, check_mac: bool, mut f: impl FnMut(&AuditEntry, &[u8])) -> Result<AuditHead> {
        self.inner.drain()?;
        let mut prev = [0u8; 32];
        let mut expected = 0u64;
        self.inner.db.scan(Table::Audit, &[], None, &mut |k, v| {
            let broken = Error::AuditChainBroken { seq: expected };
            if k != expected.to_be_bytes() {
                return Err(broken);
            }
            let (entries, well_formed) = entries_of(v);
            let key = segment_key(&self.inner.seal_root, expected);
            for (sealed, m) in entries {
                if check_mac && !bool::from(mac(&self.inner.key, &prev, sealed).ct_eq(m)) {
                    return Err(Error::AuditChainBroken { seq: expected });
                }
                let entry = open_entry(&key, expected, sealed)?;
                if entry.seq != expected {
                    return Err(Error::AuditChainBroken { seq: expected });
                }
                f(&entry, m);
                prev.copy_from_slice(m);
                expected += 1;
            }
            if !well_formed {
                return Err(Error::AuditChainBroken { seq: expected });
            }
            Ok(true)
        })?;
        Ok(AuditHead {
            entries: expected,
            last_mac: prev,
        })
    }

    /// Walk the whole log: sequence numbers from 0 without gaps, each entry
    /// decodes, carries its own sequence number, and its MAC chains from the
    /// previous one. Returns the head, or [`Error::AuditChainBroken`] naming
    /// the first entry that fails.
    pub fn verify_chain(&self) -> Result<AuditHead> {
        self.walk(true, |_, _| {})
    }

    /// [`AuditLog::verify_chain`], and check that the log still contains the
    /// entry an earlier head ended at, unchanged: detects truncation and
    /// rollback past that point.
    pub fn verify_against(&self, anchor: &AuditHead) -> Result<AuditHead> {
        let target = anchor.entries.checked_sub(1);
        let mut found = false;
        let head = self.walk(true, |e, m| {
            if Some(e.seq) == target {
                found = bool::from(m.ct_eq(&anchor.last_mac));
            }
        })?;
        match target {
            Some(t) if !found => Err(Error::AuditChainBroken {
                seq: t.min(head.entries),
            }),
            _ => Ok(head),
        }
    }

    /// All entries, in time order (checks decoding and sequence, not the
    /// MACs).
    pub fn entries(&self) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        self.walk(false, |e, _| out.push(e.clone()))?;
        // Shared mode: replicas drain in turn, so the sequence can run a
        // little out of time order; readers get time order (stable).
        out.sort_by_key(|e| e.time);
        Ok(out)
    }

    /// Write the log as JSON lines, one entry per line, for compliance
    /// review. Verifies the chain first and refuses to export a broken one.
    /// Returns the number of lines.
    pub fn export(&self, mut out: impl Write) -> Result<u64> {
        let mut lines = Vec::new();
        let head = self.walk(true, |e, m| {
            lines.push(ExportLine {
                seq: e.seq,
                time: e.time.unix_secs(),
                event: e.event,
                subject: e.subject.map(|p| hex(&p)),
                purpose: e.purpose.as_ref().map(|p| p.as_str().to_owned()),
                outcome: e.outcome,
                bucket: e.bucket,
                generation: e.generation,
                count: e.count,
                mac: hex(m),
            })
        })?;
        // Time order (see `entries`); `seq` and `mac` give the chain order.
        lines.sort_by_key(|l| l.time);
        for line in &lines {
            serde_json::to_writer(&mut out, line).map_err(|e| Error::Io(e.into()))?;
            out.write_all(b"\n")?;
        }
        Ok(head.entries)
    }
}

#[derive(Serialize)]
struct ExportLine {
    seq: u64,
    time: u64,
    event: AuditEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<String>,
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

/// Helpers for the store's unit tests of the per-segment keys.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// The most entries any stored segment holds.
    pub(crate) fn max_entries(segments: &[(Vec<u8>, Vec<u8>)]) -> usize {
        segments
            .iter()
            .map(|(_, v)| entries_of(v).0.len())
            .max()
            .unwrap_or(0)
    }

    /// Whether the first entry of the second segment opens under its own
    /// segment key and not under the first segment's.
    pub(crate) fn cross_open_fails(log: &AuditLog, segments: &[(Vec<u8>, Vec<u8>)]) -> bool {
        let first = |k: &[u8]| u64::from_be_bytes(k.try_into().unwrap_or([0; 8]));
        let (k0, k1) = (first(&segments[0].0), first(&segments[1].0));
        let (entries, _) = entries_of(&segments[1].1);
        let Some((sealed, _)) = entries.first() else {
            return false;
        };
        let own = segment_key(&log.inner.seal_root, k1);
        let other = segment_key(&log.inner.seal_root, k0);
        open_entry(&own, k1, sealed).is_ok() && open_entry(&other, k1, sealed).is_err()
    }
}
