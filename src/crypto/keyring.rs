//! The keyring file: the only file bioseal overwrites in place. It lives in
//! the key directory, never in the data directory, so that copies and
//! backups of the data do not carry it.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! header, 512 bytes
//!   0..8     magic "BIOSEALK"
//!   8..12    format version (3)
//!   12..16   bucket count B
//!   16..32   store id
//!   32..36   embedding dimension
//!   36..37   model id length (1..=64)
//!   37..101  model id, zero padded
//!   101..109 created at (Unix seconds)
//!   109..117 key epoch e (the provider's root key R_e seals this image)
//!   117..125 epoch started at (Unix seconds)
//!   125..157 key check value: HMAC-SHA-256(kcv key, "bioseal/v3/key-check" | store id | e)
//!   157..249 sealed secrets: nonce 12 | AES-256-GCM(pseudonym key 32 | audit key 32) | tag 16,
//!            associated data = bytes 0..157
//!   249..512 zero
//! state, two copies of 128 bytes at 512 and 768 (A/B: a torn write leaves the other)
//!   0..8     write counter (the copy with the higher valid counter is current)
//!   8..16    high-water mark of the data (see `Store::open`)
//!   16..24   audit head: number of entries
//!   24..56   audit head: MAC of the last entry
//!   56..64   latest time seen (Unix seconds)
//!   64..68   match threshold (cosine, f32 bits)
//!   68..76   revocation ledger length L
//!   76..84   ledger index a restore replays from (all ones: none pending)
//!   84..116  HMAC-SHA-256(state key, "bioseal/v3/keyring-state" | store id | bytes 0..84)
//!   116..128 zero
//! slots, B x 2 x 128 bytes, slot s of bucket b at 1024 + (2b + s) * 128
//!   0..8     generation (0 = empty slot; the whole slot is then zero)
//!   8..20    nonce
//!   20..52   KEK sealed under the slot key
//!   52..68   tag; associated data "bioseal/v1/kek" | store id | b | s | generation
//!   68..128  zero
//! revocation ledger, L units of 128 bytes after the slots (unit i at 1024 + B * 256 + i * 128)
//!   0..8     i
//!   8..16    time (Unix seconds)
//!   16       kind (1: subject destroyed; 2: consent changed)
//!   17..24   zero
//!   24..56   the subject's pseudonym
//!   56..88   HMAC-SHA-256(ledger key, "bioseal/v3/ledger" | store id | bytes 0..56)
//!   88..128  zero
//! ```
//!
//! The keyring key, the key-check key, the state key and the backup key are
//! HKDF-SHA-256 of the epoch's root key (salt: store id, info binding the
//! epoch): rolling the epoch re-seals all of it under the next epoch's key.
//! The data-mark key and the ledger key are HKDF of the sealed audit key,
//! so they survive epoch rolls (the data and the ledger are not re-sealed).
//! The ledger (pseudonyms and times of every destruction and consent change
//! since the epoch began) is what a restore replays; an epoch roll empties
//! it, since no backup of an older epoch can be restored. Each slot is sealed under its own key,
//! HKDF of the keyring key with the bucket, slot and generation, so that no
//! key ever seals more than one KEK (no nonce budget to track). A 128-byte
//! slot or state copy never straddles a 512-byte sector. A rotation writes
//! the new KEK into the free slot and syncs, and later overwrites the old
//! slot with zeros (and the state with the new high-water mark) and syncs:
//! positioned writes on the one file, never a new file and a rename, so the
//! old KEK's bytes are overwritten where they lie (SECURITY.md says what
//! that assumes of the filesystem and device).

use super::aead::{AeadKey, NONCE_LEN, OVERHEAD, TAG_LEN};
use super::keys::{KeyProvider, RootKey};
pub(crate) use super::medium::{FileMedium, Medium};
use super::pseudonym::PseudonymKey;
use super::{hkdf32, hmac256, random};
use crate::error::{Error, Result};
#[cfg(test)]
use std::path::Path;
use std::sync::Arc;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub(crate) const MAGIC: &[u8; 8] = b"BIOSEALK";
pub(crate) const FORMAT_VERSION: u32 = 3;
/// Header and the two state copies: the slots start here.
pub(crate) const HEADER_LEN: usize = 1024;
const HEAD_LEN: usize = 512;
const STATE_OFF: [usize; 2] = [512, 768];
const STATE_LEN: usize = 128;
const STATE_BODY: usize = 84;
const STATE_MAC_END: usize = STATE_BODY + 32;
pub(crate) const SLOT_LEN: usize = 128;
const SLOT_USED: usize = 8 + NONCE_LEN + 32 + TAG_LEN;
pub(crate) const MAX_MODEL_ID: usize = 64;
/// Largest bucket count (a 16 MiB keyring).
pub const MAX_BUCKETS: u32 = 65_536;
const EPOCH_OFF: usize = 109;
const KCV_OFF: usize = 125;
const SECRETS_OFF: usize = 157;
/// A revocation-ledger unit.
pub(crate) const LEDGER_LEN: usize = 128;
const LEDGER_BODY: usize = 56;
const NO_REPLAY: u64 = u64::MAX;
/// What a shared keyring re-sealed by another replica reports.
const ROLLED: &str = "the keyring was re-sealed under another epoch";
const SECRETS_END: usize = SECRETS_OFF + 64 + OVERHEAD;

/// The authenticated, non-secret part of the header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) store_id: [u8; 16],
    pub(crate) buckets: u32,
    pub(crate) dim: u32,
    pub(crate) model_id: String,
}

#[derive(Default)]
struct BucketKeys {
    /// Per slot: the generation and the KEK it holds.
    slots: [Option<(u64, AeadKey)>; 2],
}

impl BucketKeys {
    fn newest(&self) -> Option<(usize, u64)> {
        (0..2)
            .filter_map(|i| self.slots[i].as_ref().map(|(g, _)| (i, *g)))
            .max_by_key(|&(_, g)| g)
    }
    fn both_valid(&self) -> bool {
        self.slots.iter().all(Option::is_some)
    }
}

/// What a lookup of a bucket generation found.
pub(crate) enum Kek<R> {
    /// The KEK exists; here is what the closure returned.
    Found(R),
    /// Older than every live KEK of the bucket: shredded.
    Shredded,
    /// Newer than every KEK of the bucket: the record was altered.
    Unknown,
}

/// The keyring's authenticated, rewritable state (see the layout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KeyringState {
    counter: u64,
    /// High-water mark of the data.
    pub(crate) mark: u64,
    /// Audit head anchored at the last security-relevant event.
    pub(crate) audit_entries: u64,
    pub(crate) audit_mac: [u8; 32],
    /// Latest time seen (Unix seconds).
    pub(crate) last_seen: u64,
    /// The store's match threshold (cosine).
    pub(crate) threshold: f32,
    /// Units in the revocation ledger.
    pub(crate) ledger_len: u64,
    /// A restore in progress: the ledger index it replays from.
    pub(crate) replay_from: Option<u64>,
}

/// What the revocation ledger records of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LedgerKind {
    /// The subject was destroyed (revoked, withdrew its last purpose, expired).
    Destroyed = 1,
    /// The subject's consent changed (a purpose withdrawn, consent renewed).
    ConsentChanged = 2,
}

/// One entry of the revocation ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LedgerEntry {
    pub(crate) time: u64,
    pub(crate) kind: LedgerKind,
    pub(crate) pseudonym: [u8; 32],
}

/// What a security-relevant event records in the keyring: the data's new
/// high-water mark, the audit head made durable with it, and the time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Anchor {
    pub(crate) mark: u64,
    pub(crate) audit_entries: u64,
    pub(crate) audit_mac: [u8; 32],
    pub(crate) now: u64,
}

impl Anchor {
    /// Marks and times only move forward (concurrent rotations may finish
    /// out of order).
    fn apply(&self, st: &mut KeyringState) {
        if self.mark >= st.mark {
            st.mark = self.mark;
            st.audit_entries = self.audit_entries;
            st.audit_mac = self.audit_mac;
        }
        st.last_seen = st.last_seen.max(self.now);
    }
}

/// What the epoch's root key seals: where the image lives and the keys
/// derived for that epoch. Replaced whole by an epoch roll; every write
/// to the image holds it shared, the roll exclusively.
struct Sealing {
    file: Arc<dyn Medium>,
    epoch: u64,
    epoch_started: u64,
    /// HKDF input of the per-slot keys.
    slot_root: Zeroizing<[u8; 32]>,
    state_key: ring::hmac::Key,
    /// MAC key of backup manifests of this epoch.
    backup_key: ring::hmac::Key,
}

/// The opened keyring: keys in memory, file kept open for in-place writes.
pub(crate) struct Keyring {
    sealing: RwLock<Sealing>,
    header: Header,
    /// MAC key of the data's copy of the high-water mark.
    mark_key: ring::hmac::Key,
    /// MAC key of the revocation ledger's units.
    ledger_key: ring::hmac::Key,
    state: std::sync::Mutex<KeyringState>,
    pseudonym: PseudonymKey,
    audit_key: Zeroizing<[u8; 32]>,
    /// The sealed secrets (pseudonym key | audit key), for re-sealing.
    secrets: Zeroizing<[u8; 64]>,
    buckets: Vec<RwLock<BucketKeys>>,
    /// Shared mode: where the key of an epoch another replica rolled to
    /// comes from.
    provider: std::sync::OnceLock<Arc<dyn KeyProvider>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("buckets", &self.header.buckets)
            .field("keys", &format_args!("[REDACTED]"))
            .finish()
    }
}

/// Keys derived from an epoch's root key for one store.
struct Derived {
    seal: AeadKey,
    slot_root: Zeroizing<[u8; 32]>,
    kcv: [u8; 32],
    state_key: ring::hmac::Key,
    backup_key: ring::hmac::Key,
}

fn derive(root: &RootKey, store_id: &[u8; 16], epoch: u64) -> Derived {
    let k = |label: &[u8]| {
        let mut info = label.to_vec();
        info.extend_from_slice(&epoch.to_be_bytes());
        hkdf32(store_id, root.expose(), &info)
    };
    let seal = k(b"bioseal/v3/keyring-seal");
    let kcv_key = k(b"bioseal/v3/key-check");
    let state_key = k(b"bioseal/v3/keyring-state");
    let backup_key = k(b"bioseal/v3/backup");
    let kcv = hmac256(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, kcv_key.as_ref()),
        &[b"bioseal/v3/key-check", store_id, &epoch.to_be_bytes()],
    );
    Derived {
        seal: AeadKey::new(&seal),
        slot_root: hkdf32(store_id, seal.as_ref(), b"bioseal/v2/kek-slots"),
        kcv,
        state_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, state_key.as_ref()),
        backup_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, backup_key.as_ref()),
    }
}

/// Keys derived from the sealed audit key: the same in every epoch.
fn stable_key(audit_key: &[u8; 32], store_id: &[u8; 16], label: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        hkdf32(store_id, audit_key, label).as_ref(),
    )
}

/// The key that seals slot `slot` of bucket `b` at generation `gen`: used
/// for that one KEK only.
fn slot_key(slot_root: &[u8; 32], b: u32, slot: usize, gen: u64) -> AeadKey {
    let mut info = Vec::with_capacity(32);
    info.extend_from_slice(b"bioseal/v2/kek-slot");
    info.extend_from_slice(&b.to_be_bytes());
    info.push(slot as u8);
    info.extend_from_slice(&gen.to_be_bytes());
    AeadKey::new(&hkdf32(b"bioseal", slot_root, &info))
}

fn state_mac(key: &ring::hmac::Key, store_id: &[u8; 16], body: &[u8]) -> [u8; 32] {
    hmac256(key, &[b"bioseal/v3/keyring-state", store_id, body])
}

fn encode_state(key: &ring::hmac::Key, store_id: &[u8; 16], st: &KeyringState) -> [u8; STATE_LEN] {
    let mut b = [0u8; STATE_LEN];
    b[0..8].copy_from_slice(&st.counter.to_be_bytes());
    b[8..16].copy_from_slice(&st.mark.to_be_bytes());
    b[16..24].copy_from_slice(&st.audit_entries.to_be_bytes());
    b[24..56].copy_from_slice(&st.audit_mac);
    b[56..64].copy_from_slice(&st.last_seen.to_be_bytes());
    b[64..68].copy_from_slice(&st.threshold.to_bits().to_be_bytes());
    b[68..76].copy_from_slice(&st.ledger_len.to_be_bytes());
    b[76..84].copy_from_slice(&st.replay_from.unwrap_or(NO_REPLAY).to_be_bytes());
    let m = state_mac(key, store_id, &b[..STATE_BODY]);
    b[STATE_BODY..STATE_MAC_END].copy_from_slice(&m);
    b
}

fn decode_state(key: &ring::hmac::Key, store_id: &[u8; 16], b: &[u8]) -> Option<KeyringState> {
    let m = state_mac(key, store_id, &b[..STATE_BODY]);
    if !bool::from(m.ct_eq(&b[STATE_BODY..STATE_MAC_END]))
        || b[STATE_MAC_END..].iter().any(|&x| x != 0)
    {
        return None;
    }
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_be_bytes(a)
    };
    let mut audit_mac = [0u8; 32];
    audit_mac.copy_from_slice(&b[24..56]);
    let mut t = [0u8; 4];
    t.copy_from_slice(&b[64..68]);
    Some(KeyringState {
        counter: u64_at(0),
        mark: u64_at(8),
        audit_entries: u64_at(16),
        audit_mac,
        last_seen: u64_at(56),
        threshold: f32::from_bits(u32::from_be_bytes(t)),
        ledger_len: u64_at(68),
        replay_from: Some(u64_at(76)).filter(|&r| r != NO_REPLAY),
    })
}

/// The current state copy of a keyring image: the valid one with the
/// higher counter.
fn current_state(key: &ring::hmac::Key, store_id: &[u8; 16], buf: &[u8]) -> Result<KeyringState> {
    // The gaps after each copy are zero; a short file is no keyring.
    if buf.len() < HEADER_LEN
        || STATE_OFF
            .iter()
            .any(|&o| buf[o + STATE_LEN..o + 256].iter().any(|&x| x != 0))
    {
        return Err(Error::tampered("keyring state"));
    }
    STATE_OFF
        .iter()
        .filter_map(|&o| decode_state(key, store_id, &buf[o..o + STATE_LEN]))
        .max_by_key(|st| st.counter)
        .ok_or(Error::tampered("keyring state"))
}

fn slot_offset(bucket: u32, slot: usize) -> u64 {
    (HEADER_LEN + (bucket as usize * 2 + slot) * SLOT_LEN) as u64
}

fn slot_aad(store_id: &[u8; 16], bucket: u32, slot: usize, gen: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(14 + 16 + 4 + 1 + 8);
    a.extend_from_slice(b"bioseal/v1/kek");
    a.extend_from_slice(store_id);
    a.extend_from_slice(&bucket.to_be_bytes());
    a.push(slot as u8);
    a.extend_from_slice(&gen.to_be_bytes());
    a
}

fn lock_read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // No code path panics while holding these locks; recover if one ever did.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn lock_write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Keyring {
    /// Create a new keyring file at `path` (which must not exist), epoch 0.
    #[cfg(test)]
    pub(crate) fn create(
        path: &Path,
        root: &RootKey,
        buckets: u32,
        model_id: &str,
        dim: u32,
        now: u64,
        threshold: f32,
    ) -> Result<Keyring> {
        let image = Keyring::image(root, 0, buckets, model_id, dim, now, threshold)?;
        Keyring::load(Arc::new(FileMedium::create(path, &image)?), root)
    }

    /// Open the keyring file at `path` with the key of its epoch. A wrong
    /// root key is detected before any slot is read, and nothing is written.
    #[cfg(test)]
    pub(crate) fn open(path: &Path, root: &RootKey) -> Result<Keyring> {
        Keyring::load(Arc::new(FileMedium::open(path)?), root)
    }

    /// Open the image in `medium` with the root key of the epoch its header
    /// names, from `provider`.
    pub(crate) fn load_from(
        medium: Arc<dyn Medium>,
        provider: &dyn KeyProvider,
    ) -> Result<Keyring> {
        let buf = medium.read_all()?;
        let root = provider.epoch_key(image_epoch(&buf)?)?;
        Keyring::parse(medium, buf, &root)
    }

    /// A new keyring image: fresh store id, secrets and one KEK per bucket,
    /// sealed under `root`, the key of `epoch`.
    pub(crate) fn image(
        root: &RootKey,
        epoch: u64,
        buckets: u32,
        model_id: &str,
        dim: u32,
        now: u64,
        threshold: f32,
    ) -> Result<Vec<u8>> {
        if model_id.is_empty() || model_id.len() > MAX_MODEL_ID {
            return Err(Error::Config(format!(
                "model id must be 1-{MAX_MODEL_ID} bytes"
            )));
        }
        if !(1..=MAX_BUCKETS).contains(&buckets) {
            return Err(Error::Config(format!(
                "bucket count must be 1-{MAX_BUCKETS}"
            )));
        }
        let header = Header {
            store_id: *random::<16>()?,
            buckets,
            dim,
            model_id: model_id.to_owned(),
        };
        let state = KeyringState {
            counter: 1,
            mark: 0,
            audit_entries: 0,
            audit_mac: [0; 32],
            last_seen: now,
            threshold,
            ledger_len: 0,
            replay_from: None,
        };
        let mut keks = Vec::with_capacity(buckets as usize);
        for _ in 0..buckets {
            keks.push([Some((1, random::<32>()?)), None]);
        }
        seal_image(
            root,
            &header,
            (epoch, now),
            now,
            &*random::<64>()?,
            &state,
            &keks,
        )
    }

    /// Open the keyring image in `medium`. A wrong root key is detected
    /// before any slot is read, and nothing is written.
    #[cfg(test)]
    pub(crate) fn load(medium: Arc<dyn Medium>, root: &RootKey) -> Result<Keyring> {
        let buf = medium.read_all()?;
        Keyring::parse(medium, buf, root)
    }

    /// [`Keyring::load`] of the image `buf` that `medium` holds.
    fn parse(medium: Arc<dyn Medium>, buf: Vec<u8>, root: &RootKey) -> Result<Keyring> {
        let (header, d, secrets, epoch) = parse_header(&buf, root)?;
        let state = current_state(&d.state_key, &header.store_id, &buf)?;
        check_len(&header, &state, buf.len())?;
        let mut bucket_keys = Vec::with_capacity(header.buckets as usize);
        for b in 0..header.buckets {
            let off = slot_offset(b, 0) as usize;
            let keys = parse_bucket(
                &d.slot_root,
                &header.store_id,
                b,
                &buf[off..off + 2 * SLOT_LEN],
            )?;
            bucket_keys.push(RwLock::new(keys));
        }
        let (pk, ak) = split_secrets(&secrets);
        let keyring = Keyring {
            sealing: RwLock::new(Sealing {
                file: medium,
                epoch: epoch.0,
                epoch_started: epoch.1,
                slot_root: d.slot_root,
                state_key: d.state_key,
                backup_key: d.backup_key,
            }),
            mark_key: stable_key(&ak, &header.store_id, b"bioseal/v3/data-mark"),
            ledger_key: stable_key(&ak, &header.store_id, b"bioseal/v3/ledger"),
            header,
            state: std::sync::Mutex::new(state),
            pseudonym: PseudonymKey::new(&pk),
            audit_key: ak,
            secrets,
            buckets: bucket_keys,
            provider: std::sync::OnceLock::new(),
        };
        // Every ledger unit the state counts must be intact.
        keyring.read_ledger_from(&buf)?;
        Ok(keyring)
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// Shared mode: the provider to take a newer epoch's key from when
    /// another replica rolls the epoch.
    pub(crate) fn share_provider(&self, provider: Arc<dyn KeyProvider>) {
        let _ = self.provider.set(provider);
    }

    /// Shared mode: if `head` (the stored image from offset 0, at least
    /// the first unit) names another epoch than the cached one, another
    /// replica rolled it: take that epoch's key from the provider, check
    /// the stored header against it and use its keys from now on (the
    /// KEKs are the same). Returns whether it did.
    fn adopt_if_rolled(&self, head: &[u8]) -> Result<bool> {
        let epoch = be_u64(
            head.get(EPOCH_OFF..EPOCH_OFF + 8)
                .ok_or(Error::tampered("keyring header"))?,
        );
        if epoch == lock_read(&self.sealing).epoch {
            return Ok(false);
        }
        let provider = self.provider.get().ok_or(Error::KeyUnavailable {
            what: "the keyring was re-sealed under another epoch",
        })?;
        let mut sealing = lock_write(&self.sealing);
        if sealing.epoch == epoch {
            return Ok(true);
        }
        let root = provider.epoch_key(epoch)?;
        let buf = sealing.file.read_at(0, HEADER_LEN)?;
        let (header, d, _, started) = parse_header(&buf, &root)?;
        if header.store_id != self.header.store_id {
            return Err(Error::StoreMismatch);
        }
        let st = current_state(&d.state_key, &header.store_id, &buf)?;
        *sealing = Sealing {
            file: sealing.file.clone(),
            epoch: started.0,
            epoch_started: started.1,
            slot_root: d.slot_root,
            state_key: d.state_key,
            backup_key: d.backup_key,
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        Ok(true)
    }

    /// The epoch whose root key seals the keyring, and when it started.
    pub(crate) fn epoch(&self) -> (u64, u64) {
        let s = lock_read(&self.sealing);
        (s.epoch, s.epoch_started)
    }

    pub(crate) fn pseudonym_key(&self) -> &PseudonymKey {
        &self.pseudonym
    }

    pub(crate) fn audit_key(&self) -> &[u8; 32] {
        &self.audit_key
    }

    fn bucket(&self, b: u32) -> Result<&RwLock<BucketKeys>> {
        self.buckets
            .get(b as usize)
            .ok_or(Error::tampered("bucket index out of range"))
    }

    /// Run `f` with the KEK of generation `gen` of bucket `b`.
    pub(crate) fn with_kek<R>(
        &self,
        b: u32,
        gen: u64,
        f: impl FnOnce(&AeadKey) -> R,
    ) -> Result<Kek<R>> {
        let keys = lock_read(self.bucket(b)?);
        if let Some((_, k)) = keys.slots.iter().flatten().find(|(g, _)| *g == gen) {
            return Ok(Kek::Found(f(k)));
        }
        let newest = keys.newest().map_or(0, |(_, g)| g);
        Ok(if gen != 0 && gen < newest {
            Kek::Shredded
        } else {
            Kek::Unknown
        })
    }

    /// Run `f` with the newest KEK of bucket `b` and its generation.
    pub(crate) fn with_newest<R>(&self, b: u32, f: impl FnOnce(u64, &AeadKey) -> R) -> Result<R> {
        let keys = lock_read(self.bucket(b)?);
        let (slot, gen) = keys
            .newest()
            .ok_or(Error::tampered("keyring slot (bucket has no key)"))?;
        let (_, k) = keys.slots[slot]
            .as_ref()
            .ok_or(Error::tampered("keyring slot"))?;
        Ok(f(gen, k))
    }

    /// Buckets whose rotation was interrupted (both slots hold a key).
    pub(crate) fn interrupted(&self) -> Vec<u32> {
        (0..self.header.buckets)
            .filter(|&b| {
                self.buckets
                    .get(b as usize)
                    .is_some_and(|l| lock_read(l).both_valid())
            })
            .collect()
    }

    /// Whether bucket `b` is mid-rotation.
    pub(crate) fn is_rotating(&self, b: u32) -> Result<bool> {
        Ok(lock_read(self.bucket(b)?).both_valid())
    }

    /// First step of a rotation: seal a fresh KEK (generation + 1) into the
    /// bucket's free slot and sync. See [`Keyring::begin_rotations`].
    #[cfg(test)]
    pub(crate) fn begin_rotation(&self, b: u32) -> Result<u64> {
        let gens = self.begin_rotations(&[b], &[])?;
        gens.first()
            .copied()
            .ok_or(Error::tampered("keyring rotation state"))
    }

    /// First step of rotating several distinct buckets: seal a fresh KEK
    /// (the bucket's generation plus one) into each bucket's free slot, then
    /// one sync for all of them. Returns the new generations in the order of
    /// `buckets`. Subjects the rotation destroys (`ledger`) enter the
    /// revocation ledger in the same sync, before any of their data goes.
    pub(crate) fn begin_rotations(
        &self,
        buckets: &[u32],
        ledger: &[LedgerEntry],
    ) -> Result<Vec<u64>> {
        let sealing = lock_read(&self.sealing);
        let mut fresh = Vec::with_capacity(buckets.len());
        let mut writes = Vec::with_capacity(buckets.len());
        for &b in buckets {
            let lock = self.bucket(b)?;
            let (free, gen) = {
                let keys = lock_read(lock);
                if keys.both_valid() {
                    return Err(Error::tampered("keyring rotation already in progress"));
                }
                let (slot, gen) = keys.newest().ok_or(Error::tampered("keyring slot"))?;
                (1 - slot, gen + 1)
            };
            let kek = random::<32>()?;
            let bytes = seal_slot(
                &sealing.slot_root,
                &self.header.store_id,
                b,
                free,
                gen,
                &kek,
            )?;
            writes.push((slot_offset(b, free), bytes.to_vec()));
            fresh.push((lock, free, gen, AeadKey::new(&kek)));
        }
        if ledger.is_empty() {
            sealing.file.write(&writes)?;
        } else {
            self.write_state(&sealing, writes, ledger, |_| {})?;
        }
        crate::failpoint::hit("rotation:new-slot-synced");
        Ok(fresh
            .into_iter()
            .map(|(lock, free, gen, key)| {
                lock_write(lock).slots[free] = Some((gen, key));
                gen
            })
            .collect())
    }

    /// Last step of a rotation: overwrite the older slot with zeros in place
    /// and sync; from then on that KEK exists nowhere.
    #[cfg(test)]
    pub(crate) fn finish_rotation(&self, b: u32) -> Result<()> {
        self.finish_rotations(&[b], None)
    }

    /// [`Keyring::finish_rotation`] for several buckets, with one sync;
    /// with `anchor`, the state (high-water mark, audit head, time) is
    /// updated by the same sync.
    pub(crate) fn finish_rotations(&self, buckets: &[u32], anchor: Option<Anchor>) -> Result<()> {
        let sealing = lock_read(&self.sealing);
        let mut zeroed = Vec::with_capacity(buckets.len());
        let mut writes = Vec::with_capacity(buckets.len());
        for &b in buckets {
            let lock = self.bucket(b)?;
            let old = {
                let keys = lock_read(lock);
                if !keys.both_valid() {
                    continue;
                }
                let (newest, _) = keys.newest().ok_or(Error::tampered("keyring slot"))?;
                1 - newest
            };
            writes.push((slot_offset(b, old), vec![0u8; SLOT_LEN]));
            zeroed.push((lock, old));
        }
        match anchor {
            Some(a) => self.write_state(&sealing, writes, &[], |st| a.apply(st))?,
            None if zeroed.is_empty() => return Ok(()),
            None => sealing.file.write(&writes)?,
        }
        for (lock, old) in zeroed {
            lock_write(lock).slots[old] = None;
        }
        Ok(())
    }

    /// The current state.
    pub(crate) fn state(&self) -> KeyringState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the state: the new copy is written over the older one in
    /// place and synced.
    /// Shared mode: under the state lock, from the state as stored (another
    /// replica may have changed it).
    pub(crate) fn update_state(&self, f: impl Fn(&mut KeyringState)) -> Result<()> {
        // Shared mode, outside the bucket locks an epoch roll waits for:
        // another replica may have rolled it since; adopt it and write again.
        for _ in 0..2 {
            let sealing = lock_read(&self.sealing);
            match self.write_state(&sealing, Vec::new(), &[], &f) {
                Err(Error::KeyUnavailable { what }) if what == ROLLED => {
                    drop(sealing);
                    let head = lock_read(&self.sealing).file.read_at(0, SLOT_LEN)?;
                    self.adopt_if_rolled(&head)?;
                }
                other => return other,
            }
        }
        Err(Error::KeyUnavailable { what: ROLLED })
    }

    /// Append `entries` to the revocation ledger (durable on return).
    pub(crate) fn append_ledger(&self, entries: &[LedgerEntry]) -> Result<()> {
        let sealing = lock_read(&self.sealing);
        self.write_state(&sealing, Vec::new(), entries, |_| {})
    }

    /// Write `writes`, the ledger units of `ledger` and the state as `f`
    /// changes it, durable together (the state last).
    fn write_state(
        &self,
        sealing: &Sealing,
        mut writes: Vec<(u64, Vec<u8>)>,
        ledger: &[LedgerEntry],
        f: impl FnOnce(&mut KeyringState),
    ) -> Result<()> {
        // The database's lock before this process's mutex (see the audit
        // log's drain).
        let _remote = sealing.file.lock_state()?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if sealing.file.shared() {
            *st = self.stored_state(sealing)?;
        }
        let mut next = *st;
        f(&mut next);
        for e in ledger {
            let i = next.ledger_len;
            writes.push((self.ledger_offset(i), self.encode_ledger(i, e).to_vec()));
            next.ledger_len += 1;
        }
        next.counter = st.counter + 1;
        let off = STATE_OFF[(next.counter % 2) as usize];
        writes.push((
            off as u64,
            encode_state(&sealing.state_key, &self.header.store_id, &next).to_vec(),
        ));
        sealing.file.write(&writes)?;
        *st = next;
        Ok(())
    }

    /// The current state as stored (with the header: an image sealed
    /// under another epoch, rolled by another replica, is reported as
    /// `KeyUnavailable` with [`ROLLED`]).
    fn stored_state(&self, sealing: &Sealing) -> Result<KeyringState> {
        let buf = sealing.file.read_at(0, HEADER_LEN)?;
        if image_epoch(&buf)? != sealing.epoch {
            return Err(Error::KeyUnavailable { what: ROLLED });
        }
        current_state(&sealing.state_key, &self.header.store_id, &buf)
    }

    fn ledger_offset(&self, i: u64) -> u64 {
        slot_offset(self.header.buckets, 0) + i * LEDGER_LEN as u64
    }

    fn encode_ledger(&self, i: u64, e: &LedgerEntry) -> [u8; LEDGER_LEN] {
        let mut u = [0u8; LEDGER_LEN];
        u[0..8].copy_from_slice(&i.to_be_bytes());
        u[8..16].copy_from_slice(&e.time.to_be_bytes());
        u[16] = e.kind as u8;
        u[24..56].copy_from_slice(&e.pseudonym);
        let m = hmac256(
            &self.ledger_key,
            &[
                b"bioseal/v3/ledger",
                &self.header.store_id,
                &u[..LEDGER_BODY],
            ],
        );
        u[LEDGER_BODY..LEDGER_BODY + 32].copy_from_slice(&m);
        u
    }

    /// The ledger units that `buf` (a whole image) holds, as the state
    /// counts them; a missing, moved or altered unit is `Tampered`.
    fn read_ledger_from(&self, buf: &[u8]) -> Result<Vec<LedgerEntry>> {
        let st = self.state();
        let mut out = Vec::with_capacity(st.ledger_len as usize);
        for i in 0..st.ledger_len {
            let off = self.ledger_offset(i) as usize;
            let u = buf
                .get(off..off + LEDGER_LEN)
                .ok_or(Error::tampered("revocation ledger (missing entries)"))?;
            let kind = match u[16] {
                1 => LedgerKind::Destroyed,
                2 => LedgerKind::ConsentChanged,
                _ => return Err(Error::tampered("revocation ledger")),
            };
            let mut pseudonym = [0u8; 32];
            pseudonym.copy_from_slice(&u[24..56]);
            let e = LedgerEntry {
                time: be_u64(&u[8..16]),
                kind,
                pseudonym,
            };
            if !bool::from(self.encode_ledger(i, &e).ct_eq(u)) {
                return Err(Error::tampered("revocation ledger"));
            }
            out.push(e);
        }
        Ok(out)
    }

    /// The whole revocation ledger, as stored.
    pub(crate) fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        let sealing = lock_read(&self.sealing);
        let buf = sealing.file.read_all()?;
        drop(sealing);
        self.read_ledger_from(&buf)
    }

    /// The image as stored, read under the sealing (no write interleaves);
    /// with the epoch that seals it. For backups.
    pub(crate) fn snapshot(&self) -> Result<(Vec<u8>, u64)> {
        let sealing = lock_read(&self.sealing);
        let _st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok((sealing.file.read_all()?, sealing.epoch))
    }

    /// HMAC under this epoch's backup key.
    pub(crate) fn backup_mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        hmac256(&lock_read(&self.sealing).backup_key, parts)
    }

    /// Roll the epoch: re-seal the whole image (header, state, every KEK
    /// slot as it stands) under `next`, the root key of `epoch`, with an
    /// empty revocation ledger, and replace the stored image atomically.
    /// Every write to the keyring waits while this runs.
    pub(crate) fn reseal(&self, next: &RootKey, epoch: u64, now: u64) -> Result<()> {
        let mut sealing = lock_write(&self.sealing);
        if epoch <= sealing.epoch {
            return Err(Error::KeyProvider(format!(
                "epoch {epoch} is not after the current epoch {}",
                sealing.epoch
            )));
        }
        let buf = sealing.file.read_all()?;
        let mut st = current_state(&sealing.state_key, &self.header.store_id, &buf)?;
        st.counter += 1;
        st.ledger_len = 0;
        st.replay_from = None;
        let keks = raw_slots(&sealing.slot_root, &self.header, &buf)?;
        let created = be_u64(&buf[101..109]);
        let image = seal_image(
            next,
            &self.header,
            (epoch, now),
            created,
            &self.secrets,
            &st,
            &keks,
        )?;
        let file = sealing.file.replace(&image)?;
        let d = derive(next, &self.header.store_id, epoch);
        *sealing = Sealing {
            file,
            epoch,
            epoch_started: now,
            slot_root: d.slot_root,
            state_key: d.state_key,
            backup_key: d.backup_key,
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        Ok(())
    }

    /// Shared mode: re-read the KEK slots of `buckets` (the caller holds
    /// their locks; another replica may have rotated them). The state is
    /// re-read where it is changed (`update_state`, under its own lock).
    /// Embedded mode: nothing to do, this process wrote them.
    pub(crate) fn refresh(&self, buckets: &[u32]) -> Result<()> {
        if !lock_read(&self.sealing).file.shared() {
            return Ok(());
        }
        // The header's first unit came with the slots (`slot_ranges`).
        let head = lock_read(&self.sealing).file.read_at(0, SLOT_LEN)?;
        self.adopt_if_rolled(&head)?;
        let sealing = lock_read(&self.sealing);
        for &b in buckets {
            let lock = self.bucket(b)?;
            let bytes = sealing.file.read_at(slot_offset(b, 0), 2 * SLOT_LEN)?;
            let keys = parse_bucket(&sealing.slot_root, &self.header.store_id, b, &bytes)?;
            *lock_write(lock) = keys;
        }
        Ok(())
    }

    /// Shared mode: re-read every bucket's slots and the state (for
    /// counts over all buckets, such as `Store::stats`).
    pub(crate) fn refresh_all(&self) -> Result<()> {
        if !lock_read(&self.sealing).file.shared() {
            return Ok(());
        }
        let buf = lock_read(&self.sealing).file.read_all()?;
        self.adopt_if_rolled(&buf)?;
        let sealing = lock_read(&self.sealing);
        let st = current_state(&sealing.state_key, &self.header.store_id, &buf)?;
        check_len(&self.header, &st, buf.len())?;
        for b in 0..self.header.buckets {
            let off = slot_offset(b, 0) as usize;
            let keys = parse_bucket(
                &sealing.slot_root,
                &self.header.store_id,
                b,
                &buf[off..off + 2 * SLOT_LEN],
            )?;
            *lock_write(self.bucket(b)?) = keys;
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        Ok(())
    }

    /// The byte ranges of the KEK slots of `buckets` (what `refresh`
    /// reads).
    pub(crate) fn slot_ranges(&self, buckets: &[u32]) -> Vec<(u64, usize)> {
        // The header's first unit too: it names the epoch (`refresh`).
        std::iter::once((0, SLOT_LEN))
            .chain(buckets.iter().map(|&b| (slot_offset(b, 0), 2 * SLOT_LEN)))
            .collect()
    }

    /// The MAC of the data's copy of high-water mark `mark`.
    pub(crate) fn mark_mac(&self, mark: u64) -> [u8; 32] {
        hmac256(
            &self.mark_key,
            &[
                b"bioseal/v3/data-mark",
                &self.header.store_id,
                &mark.to_be_bytes(),
            ],
        )
    }

    /// Lowest and highest live generation over all buckets.
    pub(crate) fn generation_range(&self) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        for l in &self.buckets {
            for (g, _) in lock_read(l).slots.iter().flatten() {
                lo = lo.min(*g);
                hi = hi.max(*g);
            }
        }
        (lo, hi)
    }
}

fn split_secrets(s: &[u8; 64]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let mut a = Zeroizing::new([0u8; 32]);
    let mut b = Zeroizing::new([0u8; 32]);
    a.copy_from_slice(&s[..32]);
    b.copy_from_slice(&s[32..]);
    (a, b)
}

type HeaderParts = (Header, Derived, Zeroizing<[u8; 64]>, (u64, u64));

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The epoch an image's header names (not yet authenticated: the key
/// check of that epoch's root key authenticates it).
pub(crate) fn image_epoch(buf: &[u8]) -> Result<u64> {
    if buf.len() < HEAD_LEN || &buf[0..8] != MAGIC {
        return Err(Error::tampered("keyring header (not a bioseal keyring)"));
    }
    Ok(be_u64(&buf[EPOCH_OFF..EPOCH_OFF + 8]))
}

/// The image is as long as its header and state say: header, slots and the
/// ledger units the state counts. Units past them (an append a power cut
/// interrupted before the state that counts them) are ignored.
fn check_len(header: &Header, st: &KeyringState, len: usize) -> Result<()> {
    let slots_end = HEADER_LEN + header.buckets as usize * 2 * SLOT_LEN;
    let min = (st.ledger_len as usize)
        .checked_mul(LEDGER_LEN)
        .and_then(|l| l.checked_add(slots_end))
        .ok_or(Error::tampered("keyring length"))?;
    if len < min || !(len - slots_end).is_multiple_of(LEDGER_LEN) {
        return Err(Error::tampered("keyring length"));
    }
    Ok(())
}

/// Every bucket's slots opened to raw KEKs (for re-sealing).
type RawSlots = Vec<[Option<(u64, Zeroizing<[u8; 32]>)>; 2]>;

fn raw_slots(slot_root: &[u8; 32], header: &Header, buf: &[u8]) -> Result<RawSlots> {
    let mut out = Vec::with_capacity(header.buckets as usize);
    for b in 0..header.buckets {
        let mut pair: [Option<(u64, Zeroizing<[u8; 32]>)>; 2] = [None, None];
        for (s, slot) in pair.iter_mut().enumerate() {
            let off = slot_offset(b, s) as usize;
            let bytes = buf
                .get(off..off + SLOT_LEN)
                .ok_or(Error::tampered("keyring length"))?;
            *slot = open_slot(slot_root, &header.store_id, b, s, bytes)?;
        }
        out.push(pair);
    }
    Ok(out)
}

/// A whole image sealed under `root` (epoch and its start in `epoch`):
/// header, one current state copy, every slot, no ledger.
fn seal_image(
    root: &RootKey,
    header: &Header,
    epoch: (u64, u64),
    created: u64,
    secrets: &[u8; 64],
    state: &KeyringState,
    keks: &RawSlots,
) -> Result<Vec<u8>> {
    let store_id = header.store_id;
    let d = derive(root, &store_id, epoch.0);
    let mut buf = vec![0u8; HEADER_LEN + header.buckets as usize * 2 * SLOT_LEN];
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    buf[12..16].copy_from_slice(&header.buckets.to_be_bytes());
    buf[16..32].copy_from_slice(&store_id);
    buf[32..36].copy_from_slice(&header.dim.to_be_bytes());
    let model = header.model_id.as_bytes();
    buf[36] = model.len() as u8;
    buf[37..37 + model.len()].copy_from_slice(model);
    buf[101..109].copy_from_slice(&created.to_be_bytes());
    buf[EPOCH_OFF..EPOCH_OFF + 8].copy_from_slice(&epoch.0.to_be_bytes());
    buf[EPOCH_OFF + 8..KCV_OFF].copy_from_slice(&epoch.1.to_be_bytes());
    buf[KCV_OFF..SECRETS_OFF].copy_from_slice(&d.kcv);
    let sealed = d.seal.seal(&buf[..SECRETS_OFF], secrets)?;
    buf[SECRETS_OFF..SECRETS_END].copy_from_slice(&sealed);
    let off = STATE_OFF[(state.counter % 2) as usize];
    buf[off..off + STATE_LEN].copy_from_slice(&encode_state(&d.state_key, &store_id, state));
    for (b, pair) in (0u32..).zip(keks) {
        for (s, slot) in pair.iter().enumerate() {
            if let Some((gen, kek)) = slot {
                let off = slot_offset(b, s) as usize;
                buf[off..off + SLOT_LEN].copy_from_slice(&seal_slot(
                    &d.slot_root,
                    &store_id,
                    b,
                    s,
                    *gen,
                    kek,
                )?);
            }
        }
    }
    Ok(buf)
}

/// The image a restore writes: the backup's image (sealed under `root`,
/// the current epoch's key), with the live keyring's revocation ledger and
/// a replay pending from `replay_from` (the ledger's length when the backup
/// was taken).
pub(crate) fn restored_image(
    backup: &[u8],
    root: &RootKey,
    live: &Keyring,
    replay_from: u64,
) -> Result<Vec<u8>> {
    let (header, d, secrets, epoch) = parse_header(backup, root)?;
    if header.store_id != live.header.store_id {
        return Err(Error::StoreMismatch);
    }
    let mut st = current_state(&d.state_key, &header.store_id, backup)?;
    check_len(&header, &st, backup.len())?;
    let live_buf = lock_read(&live.sealing).file.read_all()?;
    let live_st = live.state();
    if replay_from > live_st.ledger_len {
        return Err(Error::tampered("backup manifest (ledger position)"));
    }
    let keks = raw_slots(&d.slot_root, &header, backup)?;
    st.counter = st.counter.max(live_st.counter) + 1;
    st.ledger_len = live_st.ledger_len;
    st.replay_from = Some(replay_from);
    // The live ledger was written under the live keyring's state; its
    // units are MAC'd with the ledger key, which both share.
    live.read_ledger_from(&live_buf)?;
    let mut image = seal_image(
        root,
        &header,
        epoch,
        be_u64(&backup[101..109]),
        &secrets,
        &st,
        &keks,
    )?;
    let from = live.ledger_offset(0) as usize;
    let to = live.ledger_offset(live_st.ledger_len) as usize;
    image.extend_from_slice(
        live_buf
            .get(from..to)
            .ok_or(Error::tampered("revocation ledger (missing entries)"))?,
    );
    Ok(image)
}

fn parse_header(buf: &[u8], root: &RootKey) -> Result<HeaderParts> {
    if buf.len() < HEAD_LEN {
        return Err(Error::tampered("keyring header (file too short)"));
    }
    if &buf[0..8] != MAGIC {
        return Err(Error::tampered("keyring header (not a bioseal keyring)"));
    }
    let be32 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&buf[r]);
        u32::from_be_bytes(a)
    };
    match be32(8..12) {
        1 => return Err(Error::LegacyLayout(
            "this keyring has format 1 (bioseal before the key directory); it cannot be opened \
                 by this version: re-create the store and enroll again"
                .into(),
        )),
        2 => {
            return Err(Error::LegacyLayout(
                "this keyring has format 2 (bioseal before key epochs); it cannot be opened \
                 by this version: re-create the store and enroll again"
                    .into(),
            ))
        }
        FORMAT_VERSION => {}
        _ => return Err(Error::tampered("keyring header (unknown format version)")),
    }
    let buckets = be32(12..16);
    if !(1..=MAX_BUCKETS).contains(&buckets) {
        return Err(Error::tampered("keyring header (bucket count)"));
    }
    let mut store_id = [0u8; 16];
    store_id.copy_from_slice(&buf[16..32]);
    let dim = be32(32..36);
    let mlen = buf[36] as usize;
    if mlen == 0 || mlen > MAX_MODEL_ID || buf[37 + mlen..101].iter().any(|&b| b != 0) {
        return Err(Error::tampered("keyring header (model id)"));
    }
    let model_id = std::str::from_utf8(&buf[37..37 + mlen])
        .map_err(|_| Error::tampered("keyring header (model id)"))?
        .to_owned();
    let epoch = be_u64(&buf[EPOCH_OFF..EPOCH_OFF + 8]);
    let started = be_u64(&buf[EPOCH_OFF + 8..KCV_OFF]);
    let d = derive(root, &store_id, epoch);
    if !bool::from(d.kcv.ct_eq(&buf[KCV_OFF..SECRETS_OFF])) {
        return Err(Error::WrongRootKey);
    }
    let secrets = d
        .seal
        .open(&buf[..SECRETS_OFF], &buf[SECRETS_OFF..SECRETS_END])
        .map_err(|_| Error::tampered("keyring header"))?;
    if buf[SECRETS_END..HEAD_LEN].iter().any(|&b| b != 0) || secrets.len() != 64 {
        return Err(Error::tampered("keyring header"));
    }
    let mut s = Zeroizing::new([0u8; 64]);
    s.copy_from_slice(&secrets);
    Ok((
        Header {
            store_id,
            buckets,
            dim,
            model_id,
        },
        d,
        s,
        (epoch, started),
    ))
}

fn seal_slot(
    slot_root: &[u8; 32],
    store_id: &[u8; 16],
    b: u32,
    slot: usize,
    gen: u64,
    kek: &[u8; 32],
) -> Result<[u8; SLOT_LEN]> {
    let sealed = slot_key(slot_root, b, slot, gen).seal(&slot_aad(store_id, b, slot, gen), kek)?;
    let mut out = [0u8; SLOT_LEN];
    out[..8].copy_from_slice(&gen.to_be_bytes());
    out[8..SLOT_USED].copy_from_slice(&sealed);
    Ok(out)
}

/// A slot opened to its generation and raw KEK (`None`: an empty slot).
fn open_slot(
    slot_root: &[u8; 32],
    store_id: &[u8; 16],
    b: u32,
    slot: usize,
    bytes: &[u8],
) -> Result<Option<(u64, Zeroizing<[u8; 32]>)>> {
    if bytes.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let gen = be_u64(&bytes[..8]);
    if gen == 0 || bytes[SLOT_USED..].iter().any(|&x| x != 0) {
        return Err(Error::tampered("keyring slot"));
    }
    let kek = Zeroizing::new(
        slot_key(slot_root, b, slot, gen)
            .open(&slot_aad(store_id, b, slot, gen), &bytes[8..SLOT_USED])
            .map_err(|_| Error::tampered("keyring slot"))?,
    );
    let mut k = Zeroizing::new([0u8; 32]);
    if kek.len() != 32 {
        return Err(Error::tampered("keyring slot"));
    }
    k.copy_from_slice(&kek);
    Ok(Some((gen, k)))
}

fn parse_slot(
    slot_root: &[u8; 32],
    store_id: &[u8; 16],
    b: u32,
    slot: usize,
    bytes: &[u8],
) -> Result<Option<(u64, AeadKey)>> {
    Ok(open_slot(slot_root, store_id, b, slot, bytes)?.map(|(g, k)| (g, AeadKey::new(&k))))
}

/// Both slots of bucket `b` (`bytes`: 256 bytes): at least one key, no
/// two of one generation.
fn parse_bucket(
    slot_root: &[u8; 32],
    store_id: &[u8; 16],
    b: u32,
    bytes: &[u8],
) -> Result<BucketKeys> {
    let mut keys = BucketKeys::default();
    for s in 0..2 {
        keys.slots[s] = parse_slot(
            slot_root,
            store_id,
            b,
            s,
            &bytes[s * SLOT_LEN..(s + 1) * SLOT_LEN],
        )?;
    }
    match (&keys.slots[0], &keys.slots[1]) {
        (None, None) => Err(Error::tampered("keyring slot (bucket has no key)")),
        (Some((g0, _)), Some((g1, _))) if g0 == g1 => {
            Err(Error::tampered("keyring slot (duplicate generation)"))
        }
        _ => Ok(keys),
    }
}

/// Parse a keyring image with `root`, returning only whether it opens.
/// Used by the decoding property tests and the fuzz target.
#[doc(hidden)]
pub fn parse_image(buf: &[u8], root: &RootKey) -> Result<u32> {
    let (header, d, _, _) = parse_header(buf, root)?;
    let st = current_state(&d.state_key, &header.store_id, buf)?;
    check_len(&header, &st, buf.len())?;
    for b in 0..header.buckets {
        for s in 0..2 {
            let off = slot_offset(b, s) as usize;
            parse_slot(
                &d.slot_root,
                &header.store_id,
                b,
                s,
                &buf[off..off + SLOT_LEN],
            )?;
        }
    }
    Ok(header.buckets)
}

/// Every KEK a keyring image holds, opened with `root` as its epoch's root
/// key (`None` if it does not open the image). For the forensic tools.
pub(crate) fn image_keks(buf: &[u8], root: &RootKey) -> Option<Vec<Zeroizing<[u8; 32]>>> {
    let (header, d, _, _) = parse_header(buf, root).ok()?;
    let slots = raw_slots(&d.slot_root, &header, buf).ok()?;
    Some(
        slots
            .into_iter()
            .flat_map(|pair| pair.into_iter().flatten().map(|(_, k)| k))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_ring(dir: &Path, buckets: u32) -> (Keyring, RootKey) {
        let root = RootKey::from_bytes([3u8; 32]);
        let k =
            Keyring::create(&dir.join("keyring"), &root, buckets, "m", 4, 0, 0.5).expect("create");
        (k, root)
    }

    #[test]
    fn rotation_overwrites_old_slot_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, root) = new_ring(dir.path(), 4);
        let path = dir.path().join("keyring");
        let before = std::fs::read(&path).expect("read");
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).expect("meta"));
        assert_eq!(k.begin_rotation(2).expect("begin"), 2);
        assert!(k.is_rotating(2).expect("state"));
        assert_eq!(k.interrupted(), vec![2]);
        assert!(k.begin_rotation(2).is_err(), "one rotation at a time");
        k.finish_rotation(2).expect("finish");
        let after = std::fs::read(&path).expect("read");
        #[cfg(unix)]
        assert_eq!(
            ino,
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).expect("meta")),
            "same inode: written in place, not renamed"
        );
        let old = slot_offset(2, 0) as usize;
        let new = slot_offset(2, 1) as usize;
        assert_ne!(before[old..old + SLOT_LEN], [0u8; SLOT_LEN]);
        assert_eq!(
            after[old..old + SLOT_LEN],
            [0u8; SLOT_LEN],
            "old slot zeroed"
        );
        assert_ne!(after[new..new + SLOT_LEN], [0u8; SLOT_LEN]);
        // Only bucket 2's slots changed.
        let differing: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(differing.iter().all(|&i| i >= old && i < new + SLOT_LEN));
        assert!(matches!(
            k.with_kek(2, 1, |_| ()).expect("lookup"),
            Kek::Shredded
        ));
        assert!(matches!(
            k.with_kek(2, 2, |_| ()).expect("lookup"),
            Kek::Found(())
        ));
        assert!(matches!(
            k.with_kek(2, 3, |_| ()).expect("lookup"),
            Kek::Unknown
        ));
        drop(k);
        let k = Keyring::open(&path, &root).expect("reopen");
        assert_eq!(k.with_newest(2, |g, _| g).expect("newest"), 2);
        assert_eq!(k.generation_range(), (1, 2));
    }

    #[test]
    fn wrong_root_key_and_tampering_are_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, root) = new_ring(dir.path(), 2);
        drop(k);
        let path = dir.path().join("keyring");
        let wrong = RootKey::from_bytes([4u8; 32]);
        assert!(matches!(
            Keyring::open(&path, &wrong),
            Err(Error::WrongRootKey)
        ));
        let good = std::fs::read(&path).expect("read");
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            match parse_image(&bad, &root) {
                Err(Error::Tampered { .. }) => {}
                // The state copy not yet written (a fresh keyring writes
                // the other one): a flip there leaves it invalid, and the
                // current copy is used.
                Ok(_) if (STATE_OFF[0]..STATE_OFF[0] + STATE_LEN).contains(&i) => {}
                // The store id, the epoch and key check value feed the
                // key check.
                Err(Error::WrongRootKey)
                    if (16..32).contains(&i)
                        || (EPOCH_OFF..EPOCH_OFF + 8).contains(&i)
                        || (KCV_OFF..SECRETS_OFF).contains(&i) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_image(&good[..good.len() - 1], &root),
            Err(Error::Tampered { .. })
        ));
        assert_eq!(parse_image(&good, &root).expect("valid"), 2);
    }

    #[test]
    fn ledger_is_authenticated_and_reseal_moves_everything_to_the_next_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (k, root) = new_ring(dir.path(), 3);
        let path = dir.path().join("keyring");
        let e = |n: u8| LedgerEntry {
            time: 100 + u64::from(n),
            kind: LedgerKind::Destroyed,
            pseudonym: [n; 32],
        };
        k.append_ledger(&[e(1), e(2)]).expect("append");
        k.begin_rotations(&[1], &[e(3)]).expect("begin");
        assert_eq!(k.ledger().expect("ledger"), vec![e(1), e(2), e(3)]);
        drop(k);
        let k = Keyring::open(&path, &root).expect("reopen");
        assert_eq!(k.ledger().expect("ledger").len(), 3);
        assert!(k.is_rotating(1).expect("rotating"), "slot kept");
        let good = std::fs::read(&path).expect("read");
        let ledger_at = slot_offset(3, 0) as usize;
        for i in [ledger_at + 3, ledger_at + 30, ledger_at + LEDGER_LEN + 60] {
            let mut bad = good.clone();
            bad[i] ^= 1;
            assert!(
                parse_image(&bad, &root).is_ok(),
                "parse_image checks no ledger"
            );
            std::fs::write(&path, &bad).expect("write");
            assert!(matches!(
                Keyring::open(&path, &root),
                Err(Error::Tampered { .. })
            ));
        }
        // A ledger cut short is refused, not read as shorter.
        std::fs::write(&path, &good[..good.len() - LEDGER_LEN]).expect("write");
        assert!(matches!(
            Keyring::open(&path, &root),
            Err(Error::Tampered { .. })
        ));
        std::fs::write(&path, &good).expect("write");
        let k = Keyring::open(&path, &root).expect("reopen");
        let kek_of = |k: &Keyring, b: u32, g: u64| match k
            .with_kek(b, g, |key| key.seal(b"aad", b"x").expect("seal"))
        {
            Ok(Kek::Found(sealed)) => sealed,
            _ => panic!("no KEK {b}/{g}"),
        };
        let sealed = kek_of(&k, 2, 1);
        let next = RootKey::from_bytes([9u8; 32]);
        k.reseal(&next, 5, 777).expect("reseal");
        assert_eq!(k.epoch(), (5, 777));
        assert_eq!(
            k.ledger().expect("ledger"),
            vec![],
            "a roll empties the ledger"
        );
        drop(k);
        assert!(matches!(
            Keyring::open(&path, &root),
            Err(Error::WrongRootKey)
        ));
        let k = Keyring::open(&path, &next).expect("open under the next epoch");
        assert_eq!(k.epoch(), (5, 777));
        assert!(
            k.is_rotating(1).expect("rotating"),
            "both slots carried over"
        );
        // The same KEKs, re-sealed: what they sealed still opens.
        let opened = k.with_kek(2, 1, |key| key.open(b"aad", &sealed).is_ok());
        assert!(matches!(opened, Ok(Kek::Found(true))));
        let _ = kek_of(&k, 2, 1);
        // Nothing of the old sealing is left in the file.
        let after = std::fs::read(&path).expect("read");
        for b in 0..3u32 {
            for s in 0..2 {
                let off = slot_offset(b, s) as usize;
                if good[off..off + SLOT_LEN] != [0u8; SLOT_LEN] {
                    assert_ne!(good[off..off + SLOT_LEN], after[off..off + SLOT_LEN]);
                }
            }
        }
    }
}
