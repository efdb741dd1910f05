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
        let mut k = Zeroizing::new([0u8; 32]);
        if bytes.len() == 32 {
            k.copy_from_slice(bytes);
            return Ok(RootKey(k));
        }
        let hex = bytes.trim_ascii();
        if hex.len() != 64 {
            return Err("expected 32 raw bytes or 64 hexadecimal characters");
        }
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or("not hexadecimal")?;
            let lo = hex_val(pair[1]).ok_or("not hexadecimal")?;
            k[i] = (hi << 4) | lo;
        }
        Ok(RootKey(k))
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

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RootKey([REDACTED])")
    }
}

/// Supplies the root key when a store opens: a file, an environment variable,
/// or an HSM/KMS that unwraps it. bioseal asks once per `Store::open`, derives
/// the keyring keys, and drops the root key.
pub trait KeyProvider: Send + Sync {
    /// Return the root key.
    fn root_key(&self) -> Result<RootKey>;
}

impl KeyProvider for RootKey {
    fn root_key(&self) -> Result<RootKey> {
        Ok(RootKey(Zeroizing::new(*self.0)))
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
