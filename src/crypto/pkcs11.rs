//! The PKCS#11 epoch provider: each epoch's root key is an AES-256 key
//! object generated inside a token (an HSM; SoftHSM2 in the tests), never
//! extractable; destroying an epoch is `C_DestroyObject`.
//!
//! The 32 bytes bioseal derives the keyring keys from are computed by the
//! token: AES-256-ECB of a fixed 32-byte block under the epoch's key (two
//! AES blocks, a PRF of the key). They exist in the process's memory while
//! a store opens or rolls, never in a file; once the key object is
//! destroyed nobody can compute them again.
//!
//! Objects (label prefix `P`, chosen per store):
//! - `P:epoch:N` — secret key, AES, 32 bytes, token, private, sensitive,
//!   not extractable, encrypt only;
//! - `P:epochs` — data object holding the last epoch number created
//!   (8 bytes big-endian), so that numbers are never reused and an epoch
//!   below it without a key object is known to be destroyed.

use super::keys::{KeyProvider, RootKey};
use crate::error::{Error, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use zeroize::Zeroizing;

/// The block the token encrypts under an epoch key to yield its 32 bytes.
const DERIVE: &[u8; 32] = b"bioseal pkcs11 epoch root key v1";

/// One initialised context per module for the whole process: PKCS#11
/// modules are process-global (`C_Initialize` once, never finalised while
/// another provider may use it).
fn context(module: &Path) -> Result<Pkcs11> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(c) = map.get(module) {
        return Ok(c.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| hsm(module.display(), "load the module", e))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => return Err(hsm(module.display(), "C_Initialize", e)),
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

fn hsm(what: impl std::fmt::Display, op: &str, e: impl std::fmt::Display) -> Error {
    Error::KeyProvider(format!("{what}: {op}: {e}"))
}

/// Epoch root keys as key objects in a PKCS#11 token.
///
/// ```no_run
/// use bioseal::{Pkcs11Provider, StoreConfig};
/// let keys = Pkcs11Provider::open(
///     "/usr/lib/softhsm/libsofthsm2.so", // the module
///     "bioseal",                          // the token's label
///     "1234",                             // the user PIN
///     "store-a",                          // this store's label prefix
/// )?;
/// let config = StoreConfig::new("/var/lib/bioseal", keys).key_dir("/etc/bioseal/keys");
/// # Ok::<(), bioseal::Error>(())
/// ```
pub struct Pkcs11Provider {
    module: PathBuf,
    token: String,
    prefix: String,
    session: Mutex<Session>,
}

impl std::fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Pkcs11Provider {
    /// Open the token labelled `token` through the PKCS#11 module at
    /// `module`, log in with the user `pin`, and keep this store's epoch
    /// keys under the label prefix `prefix` (one prefix per store: a
    /// provider serves one store).
    pub fn open(
        module: impl AsRef<Path>,
        token: &str,
        pin: &str,
        prefix: &str,
    ) -> Result<Pkcs11Provider> {
        let module = module.as_ref().to_path_buf();
        let ctx = context(&module)?;
        let where_ = format!("PKCS#11 token {token:?}");
        let slots = ctx
            .get_slots_with_initialized_token()
            .map_err(|e| hsm(&where_, "C_GetSlotList", e))?;
        let slot = slots
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == token)
            })
            .ok_or_else(|| Error::KeyProvider(format!("{where_}: no such initialised token")))?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| hsm(&where_, "C_OpenSession", e))?;
        let pin = AuthPin::from(pin.to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) => {}
            // Another provider in this process logged in to the token.
            Err(cryptoki::error::Error::Pkcs11(
                cryptoki::error::RvError::UserAlreadyLoggedIn,
                _,
            )) => {}
            Err(e) => return Err(hsm(&where_, "C_Login", e)),
        }
        Ok(Pkcs11Provider {
            module,
            token: token.to_owned(),
            prefix: prefix.to_owned(),
            session: Mutex::new(session),
        })
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> Error {
        hsm(self.describe(), op, e)
    }

    fn key_label(&self, epoch: u64) -> Vec<u8> {
        format!("{}:epoch:{epoch}", self.prefix).into_bytes()
    }

    fn counter_label(&self) -> Vec<u8> {
        format!("{}:epochs", self.prefix).into_bytes()
    }

    fn find(&self, s: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>> {
        s.find_objects(template)
            .map_err(|e| self.err("C_FindObjects", e))
    }

    /// The last epoch number created (0: none).
    fn counter(&self, s: &Session) -> Result<(u64, Option<ObjectHandle>)> {
        let found = self.find(
            s,
            &[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Label(self.counter_label()),
            ],
        )?;
        let Some(&h) = found.first() else {
            return Ok((0, None));
        };
        let attrs = s
            .get_attributes(h, &[AttributeType::Value])
            .map_err(|e| self.err("C_GetAttributeValue", e))?;
        let v = attrs.iter().find_map(|a| match a {
            Attribute::Value(v) => Some(v.clone()),
            _ => None,
        });
        let n = v
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| {
                Error::KeyProvider(format!("{}: malformed epoch counter", self.describe()))
            })?;
        Ok((n, Some(h)))
    }

    fn set_counter(&self, s: &Session, n: u64, old: Option<ObjectHandle>) -> Result<()> {
        let value = n.to_be_bytes().to_vec();
        if let Some(h) = old {
            if s.update_attributes(h, &[Attribute::Value(value.clone())])
                .is_ok()
            {
                return Ok(());
            }
            s.destroy_object(h)
                .map_err(|e| self.err("C_DestroyObject", e))?;
        }
        s.create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(self.counter_label()),
            Attribute::Value(value),
        ])
        .map_err(|e| self.err("C_CreateObject", e))?;
        Ok(())
    }

    fn key_objects(&self, s: &Session, epoch: u64) -> Result<Vec<ObjectHandle>> {
        self.find(
            s,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.key_label(epoch)),
            ],
        )
    }

    /// The epoch key's 32 bytes, computed by the token.
    fn derive(&self, s: &Session, key: ObjectHandle) -> Result<RootKey> {
        let out = Zeroizing::new(
            s.encrypt(&Mechanism::AesEcb, key, DERIVE)
                .map_err(|e| self.err("C_Encrypt", e))?,
        );
        let bytes: [u8; 32] = out
            .as_slice()
            .try_into()
            .map_err(|_| Error::KeyProvider(format!("{}: C_Encrypt length", self.describe())))?;
        Ok(RootKey::from_bytes(bytes))
    }
}

impl KeyProvider for Pkcs11Provider {
    fn epoch_key(&self, epoch: u64) -> Result<RootKey> {
        let s = self.session();
        if let Some(&h) = self.key_objects(&s, epoch)?.first() {
            return self.derive(&s, h);
        }
        let (last, _) = self.counter(&s)?;
        if epoch != 0 && epoch <= last {
            Err(Error::EpochDestroyed { epoch })
        } else {
            Err(Error::KeyUnavailable {
                what: "the PKCS#11 token holds no key of this epoch",
            })
        }
    }

    fn live_epochs(&self) -> Result<Vec<u64>> {
        let s = self.session();
        let (last, _) = self.counter(&s)?;
        let mut live = Vec::new();
        // Epoch numbers are the counter's history; a store holds a few
        // live epochs at most, and is looked up from the newest down.
        for e in (1..=last).rev().take(64) {
            if !self.key_objects(&s, e)?.is_empty() {
                live.push(e);
            }
        }
        live.sort_unstable();
        Ok(live)
    }

    fn create_epoch(&self, after: u64) -> Result<(u64, RootKey)> {
        let s = self.session();
        let (last, counter) = self.counter(&s)?;
        let epoch = last.max(after) + 1;
        // The number first: a crash after it leaves a gap, never a reuse.
        self.set_counter(&s, epoch, counter)?;
        let key = s
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Label(self.key_label(epoch)),
                    Attribute::Id(epoch.to_be_bytes().to_vec()),
                ],
            )
            .map_err(|e| self.err("C_GenerateKey", e))?;
        Ok((epoch, self.derive(&s, key)?))
    }

    fn destroy_epoch(&self, epoch: u64) -> Result<()> {
        let s = self.session();
        for h in self.key_objects(&s, epoch)? {
            s.destroy_object(h)
                .map_err(|e| self.err("C_DestroyObject", e))?;
        }
        Ok(())
    }

    fn destruction_delay(&self) -> Option<Duration> {
        Some(Duration::ZERO)
    }

    fn describe(&self) -> String {
        format!(
            "the PKCS#11 token {:?} ({}), keys {:?}",
            self.token,
            self.module.display(),
            self.prefix
        )
    }
}
