//! The file epoch provider: epoch root keys in a 0600 file outside the
//! data, each destroyed by overwriting it in place and `fdatasync`.
//!
//! Layout: a 64-byte header (magic `BIOSEALE`, format version 1, zeros),
//! then one 64-byte record per epoch ever created, in creation order:
//!
//! ```text
//! 0..8    epoch (big-endian; 0 only for an imported fixed root key)
//! 8..16   created at (Unix seconds)
//! 16..48  root key (zeros once destroyed)
//! 48..56  destroyed at (Unix seconds; 0 = live)
//! 56..64  check: SHA-256("bioseal/v1/epoch-record" | bytes 0..56), first 8 bytes
//! ```
//!
//! A record never straddles a 512-byte sector. A record whose check fails
//! (a write torn by a power cut) holds no usable key: a torn creation never
//! returned, and a torn destruction has destroyed. Destroyed records stay
//! (without their key) so that `bioseal epoch status` can say when each
//! epoch ended; the file grows by 64 bytes per epoch.

use super::keys::{KeyProvider, RootKey};
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"BIOSEALE";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const RECORD: usize = 64;

/// One epoch as the file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochRecord {
    /// The epoch number.
    pub epoch: u64,
    /// When its key was created (Unix seconds).
    pub created: u64,
    /// When its key was destroyed (Unix seconds), if it was.
    pub destroyed: Option<u64>,
}

/// Epoch root keys in a file of their own (mode 0600), kept in the key
/// directory or another place outside the data. Destroying an epoch
/// overwrites its key where it lies and `fdatasync`s the file: SECURITY.md
/// ("Key epochs") says what that assumes of the filesystem and the device,
/// and why an HSM ([`crate::Pkcs11Provider`]) removes the assumption.
///
/// ```
/// use bioseal::{FileEpochProvider, KeyProvider};
/// let dir = tempfile::tempdir()?;
/// let p = FileEpochProvider::open(dir.path().join("bioseal.epochs"))?;
/// let (epoch, _key) = p.create_epoch(0)?;
/// assert_eq!(epoch, 1);
/// assert_eq!(p.live_epochs()?, vec![1]);
/// p.destroy_epoch(1)?;
/// assert!(matches!(p.epoch_key(1), Err(bioseal::Error::EpochDestroyed { epoch: 1 })));
/// # Ok::<(), bioseal::Error>(())
/// ```
pub struct FileEpochProvider {
    path: PathBuf,
    file: Mutex<File>,
}

impl std::fmt::Debug for FileEpochProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileEpochProvider")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn check(body: &[u8]) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"bioseal/v1/epoch-record");
    ctx.update(body);
    let mut out = [0u8; 8];
    out.copy_from_slice(&ctx.finish().as_ref()[..8]);
    out
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A whole record: its index in the file, what it says, its key.
type Parsed = (usize, EpochRecord, Zeroizing<[u8; 32]>);

/// A parsed record: `None` if its check fails (torn).
fn parse(rec: &[u8]) -> Option<(EpochRecord, Zeroizing<[u8; 32]>)> {
    if check(&rec[..56]) != rec[56..64] {
        return None;
    }
    let epoch = be64(&rec[0..8]);
    let destroyed = be64(&rec[48..56]);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&rec[16..48]);
    Some((
        EpochRecord {
            epoch,
            created: be64(&rec[8..16]),
            destroyed: (destroyed != 0).then_some(destroyed),
        },
        key,
    ))
}

fn encode(r: &EpochRecord, key: &[u8; 32]) -> Zeroizing<[u8; RECORD]> {
    let mut b = Zeroizing::new([0u8; RECORD]);
    b[0..8].copy_from_slice(&r.epoch.to_be_bytes());
    b[8..16].copy_from_slice(&r.created.to_be_bytes());
    b[16..48].copy_from_slice(key);
    b[48..56].copy_from_slice(&r.destroyed.unwrap_or(0).to_be_bytes());
    let c = check(&b[..56]);
    b[56..64].copy_from_slice(&c);
    b
}

impl FileEpochProvider {
    /// Open the epoch file at `path`, creating an empty one (mode 0600)
    /// if it does not exist. Refuses a file that group or others may read
    /// or write, and a file that is not an epoch file.
    pub fn open(path: impl AsRef<Path>) -> Result<FileEpochProvider> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path)?;
            let mut h = [0u8; HEADER];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_be_bytes());
            f.write_all(&h)?;
            f.sync_all()?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)?.sync_all()?;
            }
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(Error::InvalidRootKey(format!(
                "{} has mode {:o}; it must not be accessible to group or others (chmod 600)",
                path.display(),
                mode & 0o777
            )));
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut h = [0u8; HEADER];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| Error::InvalidRootKey(format!("{}: not an epoch file", path.display())))?;
        if &h[0..8] != MAGIC || be64(&h[8..16]) >> 32 != u64::from(VERSION) {
            return Err(Error::InvalidRootKey(format!(
                "{}: not an epoch file (or an unknown version)",
                path.display()
            )));
        }
        Ok(FileEpochProvider {
            path,
            file: Mutex::new(file),
        })
    }

    /// Take over a store that was opened with a fixed [`RootKey`] (epoch
    /// 0): record `key` as epoch 0 in this empty epoch file, so that the
    /// store opens with this provider and its next
    /// [`crate::Store::roll_epoch`] destroys it here. The file the key came
    /// from is the operator's to destroy (bioseal does not know every copy
    /// of it); until then that copy opens epoch 0's backups.
    pub fn import_fixed_key(&self, key: &RootKey) -> Result<()> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if !Self::read(&f)?.is_empty() || f.metadata()?.len() as usize > HEADER {
            return Err(Error::KeyProvider(format!(
                "{}: a fixed root key can only be imported into an empty epoch file",
                self.describe()
            )));
        }
        let rec = EpochRecord {
            epoch: 0,
            created: now_secs(),
            destroyed: None,
        };
        f.write_all_at(&encode(&rec, key.expose())[..], HEADER as u64)?;
        f.sync_all()?;
        Ok(())
    }

    /// Every epoch the file records (live and destroyed), in creation order.
    pub fn records(&self) -> Result<Vec<EpochRecord>> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Self::read(&f)?.into_iter().map(|(_, r, _)| r).collect())
    }

    /// (index, record, key) of every valid record.
    fn read(f: &File) -> Result<Vec<Parsed>> {
        let len = f.metadata()?.len() as usize;
        let n = len.saturating_sub(HEADER) / RECORD;
        let mut buf = Zeroizing::new(vec![0u8; n * RECORD]);
        f.read_exact_at(&mut buf, HEADER as u64)?;
        Ok(buf
            .chunks_exact(RECORD)
            .enumerate()
            .filter_map(|(i, rec)| parse(rec).map(|(r, k)| (i, r, k)))
            .collect())
    }
}

impl KeyProvider for FileEpochProvider {
    fn epoch_key(&self, epoch: u64) -> Result<RootKey> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let recs = Self::read(&f)?;
        match recs.iter().rev().find(|(_, r, _)| r.epoch == epoch) {
            Some((_, r, k)) if r.destroyed.is_none() => Ok(RootKey::from_bytes(**k)),
            Some(_) => Err(Error::EpochDestroyed { epoch }),
            None if epoch == 0 => Err(Error::KeyUnavailable {
                what: "epoch 0 is a fixed root key: import it into the epoch file first (FileEpochProvider::import_fixed_key, bioseal epoch import)",
            }),
            // A record torn by a destruction no longer parses; any epoch
            // older than a recorded one was created before it, so it is gone.
            None if recs.iter().any(|(_, r, _)| r.epoch > epoch) => {
                Err(Error::EpochDestroyed { epoch })
            }
            None => Err(Error::KeyUnavailable {
                what: "the epoch file holds no key of this epoch",
            }),
        }
    }

    fn live_epochs(&self) -> Result<Vec<u64>> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<u64> = Self::read(&f)?
            .iter()
            .filter(|(_, r, _)| r.destroyed.is_none())
            .map(|(_, r, _)| r.epoch)
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn create_epoch(&self, after: u64) -> Result<(u64, RootKey)> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let recs = Self::read(&f)?;
        // After every epoch the file ever recorded: numbers are never reused.
        let epoch = recs
            .iter()
            .map(|(_, r, _)| r.epoch)
            .max()
            .unwrap_or(0)
            .max(after)
            + 1;
        let key = super::random::<32>()?;
        let rec = EpochRecord {
            epoch,
            created: now_secs(),
            destroyed: None,
        };
        // After the last whole record (a torn tail record is overwritten).
        let len = f.metadata()?.len() as usize;
        let n = len.saturating_sub(HEADER).div_ceil(RECORD);
        let last_valid = recs.last().map_or(0, |(i, _, _)| i + 1);
        let at = if last_valid < n && n > 0 {
            // The tail is torn (a creation the power cut interrupted).
            n - 1
        } else {
            n
        };
        f.write_all_at(&encode(&rec, &key)[..], (HEADER + at * RECORD) as u64)?;
        f.sync_all()?;
        Ok((epoch, RootKey::from_bytes(*key)))
    }

    fn destroy_epoch(&self, epoch: u64) -> Result<()> {
        let f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        for (i, r, _) in Self::read(&f)? {
            if r.epoch == epoch && r.destroyed.is_none() {
                let gone = EpochRecord {
                    destroyed: Some(now_secs().max(1)),
                    ..r
                };
                f.write_all_at(&encode(&gone, &[0u8; 32])[..], (HEADER + i * RECORD) as u64)?;
                f.sync_data()?;
            }
        }
        Ok(())
    }

    fn destruction_delay(&self) -> Option<Duration> {
        Some(Duration::ZERO)
    }

    fn describe(&self) -> String {
        format!("the epoch file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_destroy_overwrites_in_place_and_torn_records_hold_no_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e");
        let p = FileEpochProvider::open(&path).expect("open");
        let (e1, k1) = p.create_epoch(0).expect("create");
        assert_eq!(e1, 1);
        let k1 = *k1.expose();
        assert_eq!(p.create_epoch(0).expect("create").0, 2, "epochs only grow");
        assert_eq!(p.live_epochs().expect("live"), vec![1, 2]);
        assert_eq!(p.epoch_key(1).expect("key").expose(), &k1);
        let before = std::fs::read(&path).expect("read");
        assert!(before.windows(32).any(|w| w == k1));
        p.destroy_epoch(1).expect("destroy");
        let after = std::fs::read(&path).expect("read");
        assert_eq!(before.len(), after.len(), "overwritten in place");
        assert!(!after.windows(32).any(|w| w == k1), "key bytes gone");
        assert!(matches!(
            p.epoch_key(1),
            Err(Error::EpochDestroyed { epoch: 1 })
        ));
        assert!(matches!(p.epoch_key(3), Err(Error::KeyUnavailable { .. })));
        p.destroy_epoch(1).expect("idempotent");
        assert_eq!(p.live_epochs().expect("live"), vec![2]);
        // A torn record (a power cut mid-write) holds no key.
        let mut torn = after.clone();
        torn[HEADER + RECORD + 20] ^= 1;
        std::fs::write(&path, &torn).expect("write");
        let p = FileEpochProvider::open(&path).expect("open");
        assert_eq!(p.live_epochs().expect("live"), Vec::<u64>::new());
        // The next creation takes the torn tail's place.
        // Epoch 2's record is torn: its number is not known to the file,
        // so the next is numbered after the last whole record.
        assert_eq!(p.create_epoch(2).expect("create").0, 3);
        assert_eq!(p.live_epochs().expect("live"), vec![3]);
        assert_eq!(std::fs::read(&path).expect("read").len(), after.len());
        let recs = p.records().expect("records");
        assert_eq!(recs.len(), 2);
        assert!(recs[0].destroyed.is_some());
    }

    #[test]
    fn refuses_open_modes_and_foreign_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e");
        FileEpochProvider::open(&path).expect("open");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            FileEpochProvider::open(&path),
            Err(Error::InvalidRootKey(_))
        ));
        let other = dir.path().join("o");
        std::fs::write(&other, [7u8; 100]).expect("write");
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            FileEpochProvider::open(&other),
            Err(Error::InvalidRootKey(_))
        ));
    }
}
