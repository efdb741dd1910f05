//! The keyring file: the only file bioseal overwrites in place. It lives in
//! the key directory, never in the data directory, so that copies and
//! backups of the data do not carry it.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! header, 512 bytes
//!   0..8     magic "BIOSEALK"
//!   8..12    format version (2)
//!   12..16   bucket count B
//!   16..32   store id
//!   32..36   embedding dimension
//!   36..37   model id length (1..=64)
//!   37..101  model id, zero padded
//!   101..109 created at (Unix seconds)
//!   109..141 key check value: HMAC-SHA-256(kcv key, "bioseal/v1/key-check" || store id)
//!   141..233 sealed secrets: nonce 12 | AES-256-GCM(pseudonym key 32 | audit key 32) | tag 16,
//!            associated data = bytes 0..141
//!   233..512 zero
//! state, two copies of 128 bytes at 512 and 768 (A/B: a torn write leaves the other)
//!   0..8     write counter (the copy with the higher valid counter is current)
//!   8..16    high-water mark of the data (see `Store::open`)
//!   16..24   audit head: number of entries
//!   24..56   audit head: MAC of the last entry
//!   56..64   latest time seen (Unix seconds)
//!   64..68   match threshold (cosine, f32 bits)
//!   68..100  HMAC-SHA-256(state key, "bioseal/v2/keyring-state" | store id | bytes 0..68)
//!   100..128 zero
//! slots, B x 2 x 128 bytes, slot s of bucket b at 1024 + (2b + s) * 128
//!   0..8     generation (0 = empty slot; the whole slot is then zero)
//!   8..20    nonce
//!   20..52   KEK sealed under the slot key
//!   52..68   tag; associated data "bioseal/v1/kek" | store id | b | s | generation
//!   68..128  zero
//! ```
//!
//! The keyring key, the key-check key and the state key are HKDF-SHA-256 of
//! the root key (salt: store id). Each slot is sealed under its own key,
//! HKDF of the keyring key with the bucket, slot and generation, so that no
//! key ever seals more than one KEK (no nonce budget to track). A 128-byte
//! slot or state copy never straddles a 512-byte sector. A rotation writes
//! the new KEK into the free slot and syncs, and later overwrites the old
//! slot with zeros (and the state with the new high-water mark) and syncs:
//! positioned writes on the one file, never a new file and a rename, so the
//! old KEK's bytes are overwritten where they lie (SECURITY.md says what
//! that assumes of the filesystem and device).

use super::aead::{AeadKey, NONCE_LEN, OVERHEAD, TAG_LEN};
use super::keys::RootKey;
use super::pseudonym::PseudonymKey;
use super::{hkdf32, hmac256, random};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub(crate) const MAGIC: &[u8; 8] = b"BIOSEALK";
pub(crate) const FORMAT_VERSION: u32 = 2;
/// Header and the two state copies: the slots start here.
pub(crate) const HEADER_LEN: usize = 1024;
const HEAD_LEN: usize = 512;
const STATE_OFF: [usize; 2] = [512, 768];
const STATE_LEN: usize = 128;
const STATE_BODY: usize = 68;
const STATE_MAC_END: usize = STATE_BODY + 32;
pub(crate) const SLOT_LEN: usize = 128;
const SLOT_USED: usize = 8 + NONCE_LEN + 32 + TAG_LEN;
pub(crate) const MAX_MODEL_ID: usize = 64;
/// Largest bucket count (a 16 MiB keyring).
pub const MAX_BUCKETS: u32 = 65_536;
const KCV_OFF: usize = 109;
const SECRETS_OFF: usize = 141;
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

/// The opened keyring: keys in memory, file kept open for in-place writes.
pub(crate) struct Keyring {
    /// Where the image lives.
    file: Arc<dyn Medium>,
    header: Header,
    /// HKDF input of the per-slot keys.
    slot_root: Zeroizing<[u8; 32]>,
    state_key: ring::hmac::Key,
    /// MAC key of the data's copy of the high-water mark.
    mark_key: ring::hmac::Key,
    state: std::sync::Mutex<KeyringState>,
    pseudonym: PseudonymKey,
    audit_key: Zeroizing<[u8; 32]>,
    buckets: Vec<RwLock<BucketKeys>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("buckets", &self.header.buckets)
            .field("keys", &format_args!("[REDACTED]"))
            .finish()
    }
}

/// Keys derived from the root key for one store.
struct Derived {
    seal: AeadKey,
    slot_root: Zeroizing<[u8; 32]>,
    kcv: [u8; 32],
    state_key: ring::hmac::Key,
    mark_key: ring::hmac::Key,
}

fn derive(root: &RootKey, store_id: &[u8; 16]) -> Derived {
    let seal = hkdf32(store_id, root.expose(), b"bioseal/v1/keyring-seal");
    let kcv_key = hkdf32(store_id, root.expose(), b"bioseal/v1/key-check");
    let state_key = hkdf32(store_id, root.expose(), b"bioseal/v2/keyring-state");
    let mark_key = hkdf32(store_id, root.expose(), b"bioseal/v2/data-mark");
    let kcv = hmac256(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, kcv_key.as_ref()),
        &[b"bioseal/v1/key-check", store_id],
    );
    Derived {
        seal: AeadKey::new(&seal),
        slot_root: hkdf32(store_id, seal.as_ref(), b"bioseal/v2/kek-slots"),
        kcv,
        state_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, state_key.as_ref()),
        mark_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, mark_key.as_ref()),
    }
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
    hmac256(key, &[b"bioseal/v2/keyring-state", store_id, body])
}

fn encode_state(key: &ring::hmac::Key, store_id: &[u8; 16], st: &KeyringState) -> [u8; STATE_LEN] {
    let mut b = [0u8; STATE_LEN];
    b[0..8].copy_from_slice(&st.counter.to_be_bytes());
    b[8..16].copy_from_slice(&st.mark.to_be_bytes());
    b[16..24].copy_from_slice(&st.audit_entries.to_be_bytes());
    b[24..56].copy_from_slice(&st.audit_mac);
    b[56..64].copy_from_slice(&st.last_seen.to_be_bytes());
    b[64..68].copy_from_slice(&st.threshold.to_bits().to_be_bytes());
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

/// Where a keyring image lives: a file in the key directory (embedded
/// mode) or rows in the shared database (shared mode). Positioned writes
/// of whole 128-byte units, durable together: the layout above is the same
/// in both.
pub(crate) trait Medium: Send + Sync {
    /// The whole image.
    fn read_all(&self) -> Result<Vec<u8>>;
    /// `len` bytes at `off`.
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>>;
    /// Overwrite the bytes at each offset in place; durable when this
    /// returns (a file: written, then one `fdatasync`; the database: one
    /// statement).
    fn write(&self, writes: &[(u64, Vec<u8>)]) -> Result<()>;
    /// Exclusive access to the state copies across processes (`None`: one
    /// process owns the keyring).
    fn lock_state(&self) -> Result<Option<crate::storage::RemoteLock>>;
    /// Whether other processes change this keyring (cached keys and state
    /// must then be re-read under the locks).
    fn shared(&self) -> bool;
}

/// The keyring file: written whole and renamed into place once, then only
/// overwritten in place.
pub(crate) struct FileMedium(File);

impl FileMedium {
    /// Write a new keyring file at `path` (which must not exist).
    pub(crate) fn create(path: &Path, image: &[u8]) -> Result<FileMedium> {
        if path.exists() {
            return Err(Error::Config(format!(
                "{} already exists: a key directory holds the keyring of one store",
                path.display()
            )));
        }
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(image)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        FileMedium::open(path)
    }

    /// Open an existing keyring file.
    pub(crate) fn open(path: &Path) -> Result<FileMedium> {
        Ok(FileMedium(
            OpenOptions::new().read(true).write(true).open(path)?,
        ))
    }
}

impl Medium for FileMedium {
    fn read_all(&self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        (&self.0).read_to_end(&mut buf)?;
        Ok(buf)
    }
    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.0.read_exact_at(&mut buf, off)?;
        Ok(buf)
    }
    fn write(&self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        for (off, bytes) in writes {
            self.0.write_all_at(bytes, *off)?;
        }
        Ok(self.0.sync_data()?)
    }
    fn lock_state(&self) -> Result<Option<crate::storage::RemoteLock>> {
        Ok(None)
    }
    fn shared(&self) -> bool {
        false
    }
}

impl Keyring {
    /// Create a new keyring file at `path` (which must not exist).
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
        let image = Keyring::image(root, buckets, model_id, dim, now, threshold)?;
        Keyring::load(Arc::new(FileMedium::create(path, &image)?), root)
    }

    /// Open the keyring file at `path`. A wrong root key is detected before
    /// any slot is read, and nothing is written.
    pub(crate) fn open(path: &Path, root: &RootKey) -> Result<Keyring> {
        Keyring::load(Arc::new(FileMedium::open(path)?), root)
    }

    /// A new keyring image: fresh store id, secrets and one KEK per bucket.
    pub(crate) fn image(
        root: &RootKey,
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
        let store_id = *random::<16>()?;
        let d = derive(root, &store_id);
        let (seal, kcv) = (&d.seal, d.kcv);
        let mut buf = vec![0u8; HEADER_LEN + buckets as usize * 2 * SLOT_LEN];
        buf[0..8].copy_from_slice(MAGIC);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        buf[12..16].copy_from_slice(&buckets.to_be_bytes());
        buf[16..32].copy_from_slice(&store_id);
        buf[32..36].copy_from_slice(&dim.to_be_bytes());
        buf[36] = model_id.len() as u8;
        buf[37..37 + model_id.len()].copy_from_slice(model_id.as_bytes());
        buf[101..109].copy_from_slice(&now.to_be_bytes());
        buf[KCV_OFF..SECRETS_OFF].copy_from_slice(&kcv);
        let secrets = random::<64>()?;
        let sealed = seal.seal(&buf[..SECRETS_OFF], secrets.as_ref())?;
        buf[SECRETS_OFF..SECRETS_END].copy_from_slice(&sealed);
        let state = KeyringState {
            counter: 1,
            mark: 0,
            audit_entries: 0,
            audit_mac: [0; 32],
            last_seen: now,
            threshold,
        };
        buf[STATE_OFF[1]..STATE_OFF[1] + STATE_LEN].copy_from_slice(&encode_state(
            &d.state_key,
            &store_id,
            &state,
        ));

        for b in 0..buckets {
            let kek = random::<32>()?;
            let off = slot_offset(b, 0) as usize;
            buf[off..off + SLOT_LEN].copy_from_slice(&seal_slot(
                &d.slot_root,
                &store_id,
                b,
                0,
                1,
                &kek,
            )?);
        }
        Ok(buf)
    }

    /// Open the keyring image in `medium`. A wrong root key is detected
    /// before any slot is read, and nothing is written.
    pub(crate) fn load(medium: Arc<dyn Medium>, root: &RootKey) -> Result<Keyring> {
        let buf = medium.read_all()?;
        let (header, d, secrets) = parse_header(&buf, root)?;
        let state = current_state(&d.state_key, &header.store_id, &buf)?;
        let expected_len = HEADER_LEN + header.buckets as usize * 2 * SLOT_LEN;
        if buf.len() != expected_len {
            return Err(Error::tampered("keyring length"));
        }
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
        Ok(Keyring {
            file: medium,
            header,
            slot_root: d.slot_root,
            state_key: d.state_key,
            mark_key: d.mark_key,
            state: std::sync::Mutex::new(state),
            pseudonym: PseudonymKey::new(&pk),
            audit_key: ak,
            buckets: bucket_keys,
        })
    }

    pub(crate) fn header(&self) -> &Header {
        &self.header
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
        let gens = self.begin_rotations(&[b])?;
        gens.first()
            .copied()
            .ok_or(Error::tampered("keyring rotation state"))
    }

    /// First step of rotating several distinct buckets: seal a fresh KEK
    /// (the bucket's generation plus one) into each bucket's free slot, then
    /// one sync for all of them. Returns the new generations in the order of
    /// `buckets`.
    pub(crate) fn begin_rotations(&self, buckets: &[u32]) -> Result<Vec<u64>> {
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
            let bytes = seal_slot(&self.slot_root, &self.header.store_id, b, free, gen, &kek)?;
            writes.push((slot_offset(b, free), bytes.to_vec()));
            fresh.push((lock, free, gen, AeadKey::new(&kek)));
        }
        self.file.write(&writes)?;
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
            Some(a) => self.update_state_with(writes, |st| a.apply(st))?,
            None if zeroed.is_empty() => return Ok(()),
            None => self.file.write(&writes)?,
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
    /// place and synced (with any slot writes before it).
    /// Shared mode: under the state lock, from the state as stored (another
    /// replica may have changed it).
    pub(crate) fn update_state(&self, f: impl FnOnce(&mut KeyringState)) -> Result<()> {
        self.update_state_with(Vec::new(), f)
    }

    /// [`Keyring::update_state`], with slot writes made durable together
    /// with the state (written before it).
    fn update_state_with(
        &self,
        mut writes: Vec<(u64, Vec<u8>)>,
        f: impl FnOnce(&mut KeyringState),
    ) -> Result<()> {
        // The database's lock before this process's mutex (see the audit
        // log's drain).
        let _remote = self.file.lock_state()?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.file.shared() {
            *st = self.stored_state()?;
        }
        let mut next = *st;
        f(&mut next);
        next.counter = st.counter + 1;
        let off = STATE_OFF[(next.counter % 2) as usize];
        writes.push((
            off as u64,
            encode_state(&self.state_key, &self.header.store_id, &next).to_vec(),
        ));
        self.file.write(&writes)?;
        *st = next;
        Ok(())
    }

    /// The current state as stored.
    fn stored_state(&self) -> Result<KeyringState> {
        let mut buf = vec![0u8; HEADER_LEN];
        let from = STATE_OFF[0];
        buf[from..].copy_from_slice(&self.file.read_at(from as u64, HEADER_LEN - from)?);
        current_state(&self.state_key, &self.header.store_id, &buf)
    }

    /// Shared mode: re-read the KEK slots of `buckets` (the caller holds
    /// their locks; another replica may have rotated them). The state is
    /// re-read where it is changed (`update_state`, under its own lock).
    /// Embedded mode: nothing to do, this process wrote them.
    pub(crate) fn refresh(&self, buckets: &[u32]) -> Result<()> {
        if !self.file.shared() {
            return Ok(());
        }
        for &b in buckets {
            let lock = self.bucket(b)?;
            let bytes = self.file.read_at(slot_offset(b, 0), 2 * SLOT_LEN)?;
            let keys = self.parse_bucket(b, &bytes)?;
            *lock_write(lock) = keys;
        }
        Ok(())
    }

    /// Shared mode: re-read every bucket's slots and the state (for
    /// counts over all buckets, such as `Store::stats`).
    pub(crate) fn refresh_all(&self) -> Result<()> {
        if !self.file.shared() {
            return Ok(());
        }
        let buf = self.file.read_all()?;
        if buf.len() != HEADER_LEN + self.header.buckets as usize * 2 * SLOT_LEN {
            return Err(Error::tampered("keyring length"));
        }
        for b in 0..self.header.buckets {
            let off = slot_offset(b, 0) as usize;
            let keys = self.parse_bucket(b, &buf[off..off + 2 * SLOT_LEN])?;
            *lock_write(self.bucket(b)?) = keys;
        }
        let st = current_state(&self.state_key, &self.header.store_id, &buf)?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = st;
        Ok(())
    }

    /// The byte ranges of the KEK slots of `buckets` (what `refresh`
    /// reads).
    pub(crate) fn slot_ranges(&self, buckets: &[u32]) -> Vec<(u64, usize)> {
        buckets
            .iter()
            .map(|&b| (slot_offset(b, 0), 2 * SLOT_LEN))
            .collect()
    }

    /// The two slots of bucket `b` (`bytes`: both, 256 bytes).
    fn parse_bucket(&self, b: u32, bytes: &[u8]) -> Result<BucketKeys> {
        parse_bucket(&self.slot_root, &self.header.store_id, b, bytes)
    }

    /// The MAC of the data's copy of high-water mark `mark`.
    pub(crate) fn mark_mac(&self, mark: u64) -> [u8; 32] {
        hmac256(
            &self.mark_key,
            &[
                b"bioseal/v2/data-mark",
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

type HeaderParts = (Header, Derived, Zeroizing<[u8; 64]>);

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
    if be32(8..12) == 1 {
        return Err(Error::LegacyLayout(
            "this keyring has format 1 (bioseal before the key directory); it cannot be opened \
             by this version: re-create the store and enroll again"
                .into(),
        ));
    }
    if be32(8..12) != FORMAT_VERSION {
        return Err(Error::tampered("keyring header (unknown format version)"));
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
    let d = derive(root, &store_id);
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

fn parse_slot(
    slot_root: &[u8; 32],
    store_id: &[u8; 16],
    b: u32,
    slot: usize,
    bytes: &[u8],
) -> Result<Option<(u64, AeadKey)>> {
    if bytes.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&bytes[..8]);
    let gen = u64::from_be_bytes(g);
    if gen == 0 || bytes[SLOT_USED..].iter().any(|&x| x != 0) {
        return Err(Error::tampered("keyring slot"));
    }
    let kek = slot_key(slot_root, b, slot, gen)
        .open(&slot_aad(store_id, b, slot, gen), &bytes[8..SLOT_USED])
        .map_err(|_| Error::tampered("keyring slot"))?;
    let mut k = Zeroizing::new([0u8; 32]);
    if kek.len() != 32 {
        return Err(Error::tampered("keyring slot"));
    }
    k.copy_from_slice(&kek);
    Ok(Some((gen, AeadKey::new(&k))))
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
    let (header, d, _) = parse_header(buf, root)?;
    if buf.len() != HEADER_LEN + header.buckets as usize * 2 * SLOT_LEN {
        return Err(Error::tampered("keyring length"));
    }
    current_state(&d.state_key, &header.store_id, buf)?;
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
                // The store id and key check value feed the key check.
                Err(Error::WrongRootKey)
                    if (16..32).contains(&i) || (KCV_OFF..SECRETS_OFF).contains(&i) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_image(&good[..good.len() - 1], &root),
            Err(Error::Tampered { .. })
        ));
        assert_eq!(parse_image(&good, &root).expect("valid"), 2);
    }
}
