//! The keyring in shared mode: the image of `crate::crypto::keyring` as
//! rows of `bioseal.keyring`, one per 128-byte unit.

use super::PgBackend;
use crate::error::{Error, Result};
use crate::storage::RemoteLock;
use std::sync::Arc;

/// Unit of the keyring image in `bioseal.keyring` (one row each).
const UNIT: usize = 128;

/// The keyring image in `bioseal.keyring`, one row per 128-byte unit.
/// Each batch of writes is one statement.
pub(crate) struct PgMedium {
    pg: Arc<PgBackend>,
}

impl PgMedium {
    pub(crate) fn new(pg: Arc<PgBackend>) -> PgMedium {
        PgMedium { pg }
    }

    /// Whether the database holds a keyring.
    pub(crate) fn exists(&self) -> Result<bool> {
        Ok(!self.pg.keyring_parts(&[0])?.is_empty())
    }

    /// Write a new image (in one statement).
    pub(crate) fn create(&self, image: &[u8]) -> Result<()> {
        self.pg.keyring_write(&units(0, image)?)
    }
}

/// `bytes` at offset `off` as whole units.
pub(super) fn units(off: u64, bytes: &[u8]) -> Result<Vec<(i32, Vec<u8>)>> {
    let bad = || Error::tampered("keyring write (not whole 128-byte units)");
    if !(off as usize).is_multiple_of(UNIT) || !bytes.len().is_multiple_of(UNIT) {
        return Err(bad());
    }
    let first = i32::try_from(off as usize / UNIT).map_err(|_| bad())?;
    Ok(bytes
        .chunks(UNIT)
        .zip(first..)
        .map(|(c, p)| (p, c.to_vec()))
        .collect())
}

impl crate::crypto::medium::Medium for PgMedium {
    fn read_all(&self) -> Result<Vec<u8>> {
        let rows = self.pg.keyring_all()?;
        let mut out = Vec::with_capacity(rows.len() * UNIT);
        for (i, (part, v)) in rows.into_iter().enumerate() {
            if part as usize != i || v.len() != UNIT {
                return Err(Error::tampered("keyring rows"));
            }
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let want = units(off, &vec![0u8; len])?;
        let parts: Vec<i32> = want.iter().map(|u| u.0).collect();
        let rows = match self.pg.take_prefetched(&parts) {
            Some(rows) => rows,
            None => self.pg.keyring_parts(&parts)?,
        };
        if rows.len() != parts.len()
            || rows
                .iter()
                .zip(&parts)
                .any(|((p, v), q)| p != q || v.len() != UNIT)
        {
            return Err(Error::tampered("keyring rows"));
        }
        Ok(rows.into_iter().flat_map(|(_, v)| v).collect())
    }

    fn write(&self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        let mut all = Vec::new();
        for (off, bytes) in writes {
            all.extend(units(*off, bytes)?);
        }
        self.pg.keyring_write(&all)
    }

    fn lock_state(&self) -> Result<Option<RemoteLock>> {
        self.pg.lock_store().map(Some)
    }

    fn shared(&self) -> bool {
        true
    }

    fn replace(&self, image: &[u8]) -> Result<Arc<dyn crate::crypto::medium::Medium>> {
        self.pg.keyring_replace(&units(0, image)?)?;
        Ok(Arc::new(PgMedium::new(self.pg.clone())))
    }
}
