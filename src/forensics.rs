//! Read-only tools for auditors: list the sealed records of a data
//! directory (or of a backup of one) without any key, and test whether a
//! candidate key opens them.
//!
//! Nothing here decrypts with the store's keys; it only exposes what the
//! files already hold: pseudonyms, bucket numbers, KEK generations and
//! ciphertexts. The forensic tests use it to show that after a revocation no
//! byte string found in any copy of the files opens the revoked subject's
//! wrapped DEK or payload.

use crate::crypto::aead::AeadKey;
use crate::crypto::pseudonym::Pseudonym;
use crate::error::{Error, Result};
use crate::storage::record::{dek_aad, payload_aad};
use crate::storage::sled::SledBackend;
use crate::storage::{self, Backend, DekTable, SubjectRecord, Table};
use std::path::Path;

/// One ciphertext with the associated data it was sealed with.
#[derive(Debug, Clone)]
pub struct SealedBox {
    sealed: Vec<u8>,
    aad: Vec<u8>,
}

impl SealedBox {
    /// Whether `key` (as an AES-256-GCM key) opens this ciphertext.
    pub fn opens_with(&self, key: &[u8; 32]) -> bool {
        AeadKey::new(key).open(&self.aad, &self.sealed).is_ok()
    }

    /// The plaintext, if `key` opens this ciphertext: what an adversary
    /// holding that key reads (the split-custody test searches the
    /// operator's decrypted payloads for anything that opens templates).
    pub fn open_with(&self, key: &[u8; 32]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
        AeadKey::new(key).open(&self.aad, &self.sealed).ok()
    }

    /// The raw sealed bytes (`nonce || ct || tag`), as found on disk.
    pub fn sealed_bytes(&self) -> &[u8] {
        &self.sealed
    }
}

/// A subject record as stored, identified by its pseudonym.
#[derive(Debug, Clone)]
pub struct RawSubjectRecord {
    /// The record's pseudonym (HMAC of the subject id).
    pub pseudonym: [u8; 32],
    /// The bucket it falls in.
    pub bucket: u32,
    /// The KEK generation its DEK is wrapped under (its bucket key table's).
    pub generation: u64,
    /// The DEK, wrapped under the bucket KEK, from the bucket's key table.
    pub wrapped_dek: SealedBox,
    /// Consent (and the templates of a server-custody subject), sealed
    /// under the DEK.
    pub payload: SealedBox,
    /// A split-custody subject's templates, sealed under the key derived
    /// from its server half and the person's user key
    /// ([`RawSubjectRecord::split_key`]); `None` in server custody.
    pub templates: Option<SealedBox>,
    /// The store's id (part of the split key derivation).
    pub store_id: [u8; 16],
}

impl RawSubjectRecord {
    /// The template key the code derives for this subject from a candidate
    /// server half and a candidate user key (HKDF-SHA-256, as
    /// `crate::crypto::custody` does): what the forensic tests combine
    /// every byte string found on disk through.
    pub fn split_key(&self, server_half: &[u8; 32], user_key: &[u8; 32]) -> [u8; 32] {
        *crate::crypto::custody::template_key(
            server_half,
            user_key,
            &self.store_id,
            &Pseudonym(self.pseudonym),
        )
    }
}

/// List every subject record in the sled database of a store directory
/// `dir` (which holds `db/`). Opens sled directly: the store must not be
/// open, and sled may update its own bookkeeping files, so point this at a
/// copy when the bytes must stay as they are.
pub fn subject_records(dir: impl AsRef<Path>) -> Result<Vec<RawSubjectRecord>> {
    let db = SledBackend::open(dir.as_ref(), 64 << 20)?;
    subject_records_in(&db)
}

/// Every subject record of a backend's data, with its wrapped DEK.
pub(crate) fn subject_records_in(db: &dyn Backend) -> Result<Vec<RawSubjectRecord>> {
    let store_id = storage::store_id(db)?.ok_or(Error::tampered("store id record"))?;
    let mut recs = Vec::new();
    storage::scan_prefix(db, Table::Records, b"S", &mut |k, v| {
        recs.push((k.to_vec(), v.to_vec()));
        Ok(true)
    })?;
    let mut out = Vec::new();
    for (k, v) in recs {
        let (bucket, p): (u32, Pseudonym) =
            storage::parse_subject_key(&k).ok_or(Error::tampered("record key"))?;
        let rec = SubjectRecord::decode(&v)?;
        let table = db
            .get(Table::Keys, &storage::key_table_key(bucket))?
            .ok_or(Error::tampered("bucket key table (missing)"))?;
        let (generation, wrapped) = DekTable::find(&table, &p)?
            .ok_or(Error::tampered("bucket key table (no entry for a record)"))?;
        out.push(RawSubjectRecord {
            pseudonym: p.0,
            bucket,
            generation,
            wrapped_dek: SealedBox {
                sealed: wrapped.to_vec(),
                aad: dek_aad(&store_id, &p, bucket, generation),
            },
            payload: SealedBox {
                sealed: rec.payload,
                aad: payload_aad(&store_id, &p),
            },
            templates: (!rec.templates.is_empty()).then(|| SealedBox {
                sealed: rec.templates,
                aad: crate::crypto::custody::templates_aad(&store_id, &p).to_vec(),
            }),
            store_id,
        });
    }
    Ok(out)
}

/// The KEKs a keyring image (a keyring file, or the `keyring` file of a
/// backup) holds, if `candidate` is the root key of the epoch that sealed
/// it; `None` if it is not. With these, an auditor tries every KEK against
/// the wrapped DEKs of [`subject_records`]: the forensic tests show that
/// after an epoch roll no byte string anywhere opens a backup's keyring.
pub fn keyring_keks(
    image: &[u8],
    candidate: &[u8; 32],
) -> Option<Vec<zeroize::Zeroizing<[u8; 32]>>> {
    crate::crypto::keyring::image_keks(image, &crate::RootKey::from_bytes(*candidate))
}

/// The KEKs a keyring image holds, opened with the root key that
/// `provider` gives today for the epoch the image names: what an HSM or
/// KMS provider still holds, tried the same way. A destroyed epoch is
/// [`Error::EpochDestroyed`].
pub fn keyring_keks_from(
    image: &[u8],
    provider: &dyn crate::KeyProvider,
) -> Result<Vec<zeroize::Zeroizing<[u8; 32]>>> {
    let root = provider.epoch_key(crate::crypto::keyring::image_epoch(image)?)?;
    crate::crypto::keyring::image_keks(image, &root).ok_or(Error::WrongRootKey)
}

/// Every subject record in the `data` file of a backup directory
/// ([`crate::Store::backup`]), with its wrapped DEK. The rows are not
/// checked against the manifest (that takes the epoch's key).
pub fn backup_subject_records(backup: impl AsRef<Path>) -> Result<Vec<RawSubjectRecord>> {
    let scratch = tempfile_dir()?;
    let db = SledBackend::open(&scratch, 16 << 20)?;
    let mut w = storage::Writes::default();
    crate::store::backup_rows(backup.as_ref(), &mut |t, k, v| {
        w.put(t, k, Some(v));
        Ok(())
    })?;
    w.apply(&db)?;
    let out = subject_records_in(&db);
    drop(db);
    let _ = std::fs::remove_dir_all(&scratch);
    out
}

/// A fresh private scratch directory under the system's temporary
/// directory.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let mut n = [0u8; 8];
    crate::crypto::fill_random(&mut n)?;
    let name: String = n.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("bioseal-forensics-{name}"));
    let mut b = std::fs::DirBuilder::new();
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Consent, Embedding, ManualClock, Purpose, RootKey, Store, StoreConfig, Threshold, Timestamp,
    };

    /// Positive control for the forensic tests: the scanner does find the
    /// key when it is there.
    #[test]
    fn scanner_opens_with_the_real_dek() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(Timestamp::from_unix_secs(1_000));
        let store = Store::open(
            StoreConfig::new(dir.path().join("data"), RootKey::from_bytes([1; 32]))
                .key_dir(dir.path().join("keys"))
                .model("m", 4)
                .threshold(Threshold::cosine(0.5))
                .buckets(8)
                .clock(clock),
        )
        .expect("open");
        let consent = Consent::new([Purpose::IDENTITY_VERIFICATION])
            .expires_at(Timestamp::from_unix_secs(9_000))
            .evidence([1; 32]);
        store
            .enroll("alice", Embedding::new(vec![1.0, 2.0, 3.0, 4.0]), consent)
            .expect("enroll");
        let dek = store.test_dek("alice").expect("dek");
        drop(store);
        let recs = subject_records(dir.path().join("data")).expect("records");
        assert_eq!(recs.len(), 1);
        assert!(recs[0].payload.opens_with(&dek));
        assert!(!recs[0].payload.opens_with(&[0u8; 32]));
        assert!(!recs[0].wrapped_dek.opens_with(&dek));
    }
}
