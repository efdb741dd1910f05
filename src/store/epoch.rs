//! Key epochs: rolling the epoch, finishing a roll a crash interrupted,
//! and what `bioseal epoch status` shows.

use super::*;
use crate::crypto::keys::{KeyProvider, RootKey};

/// The store's key epoch, as [`Store::epoch_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochStatus {
    /// The epoch whose root key seals the keyring.
    pub epoch: u64,
    /// When it began (its keyring was sealed).
    pub started: Timestamp,
    /// How long it has run.
    pub age: Duration,
    /// When it is due to be rolled (`started` + the configured epoch
    /// length); `sweep` rolls it from then on.
    pub due: Timestamp,
    /// Backups taken before this are inert (their epoch is destroyed); the
    /// oldest backup that can still be restored was taken at or after it.
    pub oldest_restorable: Timestamp,
    /// The provider's delay between destroying a key and its being gone
    /// (`None`: it cannot destroy keys, and backups never become inert).
    pub destruction_delay: Option<Duration>,
    /// Entries in the revocation ledger (destructions and consent changes
    /// since the epoch began: what a restore replays).
    pub ledger_entries: u64,
}

impl Store {
    /// Roll the key epoch: the provider creates the next epoch's root key,
    /// the keyring is re-sealed under it (header, state, every KEK slot;
    /// the data is not touched), and the old epoch's key is destroyed.
    /// From then on every copy of the keyring sealed under the old epoch —
    /// in backups, dumps, copies of the key directory — is inert, so a
    /// revoked subject's old KEK, wherever a copy of it survived, can no
    /// longer be opened. Backups taken before this can no longer be
    /// restored ([`Error::EpochDestroyed`]).
    ///
    /// A crash at any point leaves one usable epoch: the next open finishes
    /// the roll if the re-sealed keyring reached the disk, and otherwise
    /// destroys the new, unused key.
    ///
    /// Shared mode: the roll waits for every replica's bucket locks to be
    /// released and holds new ones off while it re-seals; the other
    /// replicas adopt the new epoch at their next lock (its key from the
    /// same provider, which they must all reach).
    pub fn roll_epoch(&self) -> Result<EpochStatus> {
        let _roll = self.roll.lock().unwrap_or_else(|e| e.into_inner());
        let remote = self.db.lock_epoch()?;
        // Shared mode: another replica may have rolled it already.
        self.keyring.refresh_all()?;
        let (current, _) = self.keyring.epoch();
        failpoint::hit("epoch:start");
        let (next, key) = self.keys.create_epoch(current)?;
        if next <= current {
            return Err(Error::KeyProvider(format!(
                "{} created epoch {next}, not after the current {current}",
                self.keys.describe()
            )));
        }
        failpoint::hit("epoch:created");
        let now = self.now();
        self.keyring.reseal(&key, next, now.unix_secs())?;
        drop(key);
        // Shared mode: the new keyring rows committed before the old key
        // goes (a crash in between leaves them, under a key that exists).
        self.db.flush()?;
        failpoint::hit("epoch:resealed");
        self.keys.destroy_epoch(current)?;
        failpoint::hit("epoch:destroyed");
        drop(remote);
        self.log(
            now,
            AuditEntry::new(AuditEvent::EpochRolled)
                .count(next)
                .outcome(AuditOutcome::Ok),
        )?;
        self.flush()?;
        self.epoch_status()
    }

    /// The current key epoch, its age and the oldest restorable backup.
    pub fn epoch_status(&self) -> Result<EpochStatus> {
        let (epoch, started) = self.keyring.epoch();
        let now = self.clock.now().unix_secs();
        Ok(EpochStatus {
            epoch,
            started: Timestamp::from_unix_secs(started),
            age: Duration::from_secs(now.saturating_sub(started)),
            due: Timestamp::from_unix_secs(self.epoch_due()),
            oldest_restorable: Timestamp::from_unix_secs(started),
            destruction_delay: self.keys.destruction_delay(),
            ledger_entries: self.keyring.state().ledger_len,
        })
    }

    /// When backups that hold a copy of data destroyed now become inert:
    /// the end of the current epoch plus the provider's destruction delay
    /// (`None` if the provider cannot destroy keys).
    pub(super) fn backups_inert_by(&self) -> Option<Timestamp> {
        let delay = self.keys.destruction_delay()?;
        Some(Timestamp::from_unix_secs(
            self.epoch_due().saturating_add(delay.as_secs()),
        ))
    }

    /// When the current epoch is due to be rolled (Unix seconds): its
    /// start plus the configured epoch length.
    fn epoch_due(&self) -> u64 {
        let (_, started) = self.keyring.epoch();
        started.saturating_add(self.epoch_length.as_secs())
    }

    /// Roll the epoch if it is due and the provider can destroy keys (what
    /// `sweep` calls, so that receipts' bounds hold on a sweep schedule).
    pub(super) fn roll_epoch_if_due(&self) -> Result<bool> {
        if self.keys.destruction_delay().is_none() {
            return Ok(false);
        }
        if self.clock.now().unix_secs() < self.epoch_due() {
            return Ok(false);
        }
        self.roll_epoch().map(|_| true)
    }
}

/// Embedded mode, before the keyring is opened: finish or undo a keyring
/// replacement a crash interrupted (an epoch roll, a restore). A complete
/// new image whose epoch key exists and that belongs to the same store is
/// renamed into place; anything else is removed (the old image is intact).
pub(super) fn settle_next(kpath: &Path, provider: &dyn KeyProvider) -> Result<()> {
    use crate::crypto::medium::{next_path, FileMedium};
    let next = next_path(kpath);
    if !next.exists() {
        return Ok(());
    }
    let same_store = |a: &[u8], b: &[u8]| a.len() >= 32 && b.len() >= 32 && a[16..32] == b[16..32];
    let complete = match (std::fs::read(kpath), std::fs::read(&next)) {
        (Ok(cur), Ok(new)) if same_store(&cur, &new) => {
            Keyring::load_from(Arc::new(FileMedium::open(&next)?), provider).is_ok()
        }
        _ => false,
    };
    if complete {
        std::fs::rename(&next, kpath)?;
    } else {
        std::fs::remove_file(&next)?;
    }
    if let Some(parent) = kpath.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// After the keyring opened at `epoch`: destroy every other epoch the
/// provider still holds (older: a roll that stopped before destroying
/// them; newer: a roll that stopped before its keyring reached the disk).
/// Returns how many were destroyed.
pub(super) fn settle_epochs(provider: &dyn KeyProvider, epoch: u64) -> Result<usize> {
    let mut n = 0;
    for e in provider.live_epochs()? {
        if e != epoch {
            provider.destroy_epoch(e)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The epoch a new store's keyring is sealed under: the provider's newest
/// live epoch, or a first one created now.
pub(super) fn first_epoch(provider: &dyn KeyProvider) -> Result<(u64, RootKey)> {
    match provider.live_epochs()?.last() {
        Some(&e) => Ok((e, provider.epoch_key(e)?)),
        None => provider.create_epoch(0),
    }
}
