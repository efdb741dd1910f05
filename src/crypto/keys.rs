//! The root key and its providers.

use crate::error::{Error, Result};
use std::fmt;
use std::io::Write;
use std::path::Path;
use zeroize::Zeroizing;

/// The 32-byte root key. It seals the keyring and must live outside the data
/// directory. Wiped on drop; prints as `[REDACTED]`; no `Clone`.
///
/// ```
/// let k = bioseal::RootKey::from_bytes([9u8; 32]);
/// assert_eq!(format!("{k:?}"), "RootKey([REDACTED])");
/// ```
pub struct RootKey(Zeroizing<[u8; 32]>);

impl RootKey {
    /// A fresh random root key.
    pub fn generate() -> Result<Self> {
        Ok(RootKey(super::random::<32>()?))
    }

    /// A root key from raw bytes. The array passed in is moved into a wiped
    /// buffer; copies the caller made elsewhere are the caller's to wipe.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut z = Zeroizing::new(bytes);
        let k = RootKey(Zeroizing::new(*z));
        zeroize::Zeroize::zeroize(&mut *z);
        k
    }

    /// Read a root key file: 32 raw bytes, or 64 hexadecimal characters
    /// (surrounding whitespace allowed). Refuses a file that group or others
    /// may read or write (the mode must be 0600 or stricter).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(Error::InvalidRootKey(format!(
                    "{} has mode {:o}; it must not be accessible to group or others (chmod 600)",
                    path.display(),
                    mode & 0o777
                )));
            }
        }
        let bytes = Zeroizing::new(std::fs::read(path)?);
        Self::parse(&bytes)
            .map_err(|what| Error::InvalidRootKey(format!("{}: {what}", path.display())))
    }

    /// Read a root key from an environment variable holding 64 hex characters.
    pub fn from_env(var: &str) -> Result<Self> {
        let v = Zeroizing::new(
            std::env::var(var).map_err(|_| Error::InvalidRootKey(format!("${var} is not set")))?,
        );
        Self::parse(v.as_bytes()).map_err(|what| Error::InvalidRootKey(format!("${var}: {what}")))
    }

    fn parse(bytes: &[u8]) -> std::result::Result<Self, &'static str> {
        super::parse_key32(bytes).map(RootKey)
    }

    /// Write this key to a new file (raw 32 bytes, mode 0600), refusing to
    /// overwrite an existing file.
    pub fn write_new_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path)?;
        f.write_all(self.0.as_ref())?;
        f.sync_all()?;
        Ok(())
    }

    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

/// Supplies the store's *epoch root keys* and destroys them: a file, an
/// environment variable, an HSM (PKCS#11) or a cloud KMS.
///
/// The keyring is sealed under the root key of the current epoch. Rolling
/// the epoch ([`crate::Store::roll_epoch`]) creates the next epoch's key,
/// re-seals the keyring under it and destroys the old one: from then on
/// every copy of the keyring sealed under the old epoch (in a backup, a
/// database dump, a copy of the key directory) is inert. bioseal asks for
/// a key when a store opens, derives the keyring keys from it and drops it.
///
/// Epoch numbers are chosen by bioseal and only ever grow. A provider
/// serves one store.
///
/// ## A cloud KMS (not built here)
///
/// A KMS provider keeps one key *version* per epoch. `create_epoch` makes a
/// new version (AWS: a new key, or `GenerateDataKey` under a per-store key
/// with the result kept wrapped; GCP: `CreateCryptoKeyVersion`);
/// `epoch_key` returns the 32 bytes the version yields (AWS: `Decrypt` of
/// the wrapped data key; GCP: the same with the version); `destroy_epoch`
/// schedules the destruction (AWS `ScheduleKeyDeletion`, at least 7 days;
/// GCP `DestroyCryptoKeyVersion`, 24 hours by default, configurable) and
/// `destruction_delay` returns that wait, which every
/// [`crate::ShredReceipt`] adds to its bound for backups. Both services
/// refuse to use a key pending deletion, so a backup of that epoch cannot
/// be restored from the moment `destroy_epoch` returns.
pub trait KeyProvider: Send + Sync {
    /// The root key of `epoch`. [`Error::EpochDestroyed`] if it was
    /// destroyed; [`Error::KeyUnavailable`] if this provider never held it.
    fn epoch_key(&self, epoch: u64) -> Result<RootKey>;

    /// The epochs whose keys exist, ascending.
    fn live_epochs(&self) -> Result<Vec<u64>>;

    /// Create a new epoch's key, durably: its number is greater than
    /// `after` and than every epoch this provider still holds. Returns the
    /// number and the key.
    fn create_epoch(&self, after: u64) -> Result<(u64, RootKey)> {
        let _ = after;
        Err(Error::KeyProvider(format!(
            "{} holds one fixed root key and cannot create epochs; use a FileEpochProvider or an HSM",
            self.describe()
        )))
    }

    /// Destroy the key of `epoch`, irrevocably. Destroying an epoch that
    /// is already gone succeeds.
    fn destroy_epoch(&self, epoch: u64) -> Result<()> {
        let _ = epoch;
        Err(Error::KeyProvider(format!(
            "{} holds one fixed root key and cannot destroy it",
            self.describe()
        )))
    }

    /// How long after `destroy_epoch` returns until the key is gone for
    /// good (0 for a file overwritten in place or an HSM object; a KMS's
    /// deletion wait). `None`: this provider cannot destroy keys, so
    /// backups never become inert.
    fn destruction_delay(&self) -> Option<std::time::Duration>;

    /// What this provider is, for messages (never key material or a PIN).
    fn describe(&self) -> String;
}

/// A boxed provider is a provider (a configuration chosen at run time).
impl<T: KeyProvider + ?Sized> KeyProvider for Box<T> {
    fn epoch_key(&self, epoch: u64) -> Result<RootKey> {
        (**self).epoch_key(epoch)
    }
    fn live_epochs(&self) -> Result<Vec<u64>> {
        (**self).live_epochs()
    }
    fn create_epoch(&self, after: u64) -> Result<(u64, RootKey)> {
        (**self).create_epoch(after)
    }
    fn destroy_epoch(&self, epoch: u64) -> Result<()> {
        (**self).destroy_epoch(epoch)
    }
    fn destruction_delay(&self) -> Option<std::time::Duration> {
        (**self).destruction_delay()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// A fixed root key is a provider of one epoch, 0, that can neither roll
/// nor be destroyed: backups of a store opened with it never become inert.
/// Use [`crate::FileEpochProvider`] or [`crate::Pkcs11Provider`] for
/// erasure that reaches backups.
impl KeyProvider for RootKey {
    fn epoch_key(&self, epoch: u64) -> Result<RootKey> {
        if epoch != 0 {
            return Err(Error::KeyUnavailable {
                what: "a fixed root key is epoch 0 only",
            });
        }
        Ok(RootKey(Zeroizing::new(*self.0)))
    }
    fn live_epochs(&self) -> Result<Vec<u64>> {
        Ok(vec![0])
    }
    fn destruction_delay(&self) -> Option<std::time::Duration> {
        None
    }
    fn describe(&self) -> String {
        "a fixed root key".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_permissions_and_formats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("raw");
        let k = RootKey::from_bytes([7u8; 32]);
        k.write_new_file(&raw).expect("write");
        assert_eq!(RootKey::from_file(&raw).expect("read").expose(), &[7u8; 32]);
        assert!(k.write_new_file(&raw).is_err(), "must refuse to overwrite");

        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "0a".repeat(32))).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let err = RootKey::from_file(&hex).expect_err("0644 must be refused");
            assert!(
                matches!(err, Error::InvalidRootKey(ref m) if m.contains("644")),
                "{err}"
            );
            std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        assert_eq!(
            RootKey::from_file(&hex).expect("read").expose(),
            &[10u8; 32]
        );

        let bad = dir.path().join("bad");
        std::fs::write(&bad, "zz".repeat(32)).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        }
        assert!(matches!(
            RootKey::from_file(&bad),
            Err(Error::InvalidRootKey(_))
        ));
        assert!(matches!(
            RootKey::from_env("BIOSEAL_TEST_UNSET_VAR"),
            Err(Error::InvalidRootKey(_))
        ));
    }
}
