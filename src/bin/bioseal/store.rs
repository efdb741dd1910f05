//! Opening the store: the store and key directories, the root key, and
//! the settings file (`bioseal.json`, a mirror of the keyring's settings).

use super::*;

pub(crate) const SETTINGS_FILE: &str = "bioseal.json";

/// Non-secret settings kept next to the data (`<store>/bioseal.json`).
#[derive(Serialize, Deserialize)]
pub(crate) struct Settings {
    pub(crate) model: String,
    pub(crate) dim: usize,
    pub(crate) threshold: f32,
    pub(crate) buckets: u32,
    /// Target false-match rate the threshold was calibrated for, if any.
    pub(crate) target_fmr: Option<f64>,
    /// The evaluation set it was calibrated on: path and SHA-256.
    pub(crate) calibration_source: Option<String>,
}

pub(crate) fn store_dir(cli: &Cli) -> R<&Path> {
    cli.store
        .as_deref()
        .ok_or_else(|| input("no store: pass --store DIR|postgresql://... or set BIOSEAL_STORE"))
}

/// Whether `--store` names a PostgreSQL database (shared mode).
pub(crate) fn is_shared(cli: &Cli) -> bool {
    cli.store
        .as_deref()
        .and_then(Path::to_str)
        .is_some_and(|s| s.starts_with("postgresql://") || s.starts_with("postgres://"))
}

/// Where `bioseal.json` lives: the store directory, or (shared mode, where
/// there is no store directory) the key directory.
pub(crate) fn settings_dir(cli: &Cli) -> R<PathBuf> {
    if is_shared(cli) {
        key_dir(cli)
    } else {
        Ok(store_dir(cli)?.to_path_buf())
    }
}

/// The store location for messages: the directory, or the URL without
/// its user information and parameters.
pub(crate) fn store_name(cli: &Cli) -> R<String> {
    let s = store_dir(cli)?;
    if is_shared(cli) {
        let url = s.to_string_lossy();
        let (scheme, rest) = url.split_once("://").unwrap_or(("", &url));
        let rest = rest.split('?').next().unwrap_or("");
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        Ok(format!("{scheme}://{host}"))
    } else {
        Ok(s.display().to_string())
    }
}

/// The key file: the epoch file (`--epochs`) or the root key file.
pub(crate) fn key_path(cli: &Cli) -> R<&Path> {
    cli.epochs
        .as_deref()
        .or(cli.root_key.as_deref())
        .ok_or_else(|| {
            input("no keys: pass --epochs FILE (or --root-key FILE), or set BIOSEAL_EPOCHS_FILE")
        })
}

/// The key provider the flags name.
pub(crate) fn provider(cli: &Cli) -> R<Box<dyn bioseal::KeyProvider>> {
    if let Some(module) = &cli.pkcs11 {
        let token = cli
            .pkcs11_token
            .as_deref()
            .ok_or_else(|| input("--pkcs11 needs --pkcs11-token LABEL"))?;
        let pin =
            zeroize::Zeroizing::new(std::env::var("BIOSEAL_PKCS11_PIN").map_err(|_| {
                input("--pkcs11 needs the token's user PIN in $BIOSEAL_PKCS11_PIN")
            })?);
        return Ok(Box::new(bioseal::Pkcs11Provider::open(
            module,
            token,
            &pin,
            &cli.pkcs11_prefix,
        )?));
    }
    Ok(match &cli.epochs {
        Some(path) => {
            if !path.exists() {
                return Err(input(format!(
                    "{} does not exist (bioseal init --epochs creates it)",
                    path.display()
                )));
            }
            Box::new(bioseal::FileEpochProvider::open(path)?)
        }
        None => Box::new(RootKey::from_file(key_path(cli)?)?),
    })
}

/// The store's configuration from the flags and settings.
pub(crate) fn config(cli: &Cli, settings: &Settings) -> R<StoreConfig> {
    Ok(StoreConfig::new(store_dir(cli)?, provider(cli)?)
        .key_dir(key_dir(cli)?)
        .model(&settings.model, settings.dim)
        .buckets(settings.buckets)
        .accept_rollback(cli.accept_rollback)
        .accept_clock_jump(cli.accept_clock_jump))
}

/// The key directory: `--keys`, or the directory of the root key file.
/// Neither the key directory nor the root key file may be inside the store.
pub(crate) fn key_dir(cli: &Cli) -> R<PathBuf> {
    if cli.pkcs11.is_some() {
        let dir = cli
            .keys
            .clone()
            .ok_or_else(|| input("--pkcs11 needs --keys DIR (where the keyring lives)"))?;
        return Ok(dir);
    }
    let key = key_path(cli)?;
    let dir = match &cli.keys {
        Some(d) => d.clone(),
        None => match key.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    if is_shared(cli) {
        return Ok(dir);
    }
    let store = store_dir(cli)?;
    let inside = |p: &Path| {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let (p, s) = (abs(p), abs(store));
        p.canonicalize()
            .unwrap_or(p)
            .starts_with(s.canonicalize().unwrap_or(s))
    };
    if inside(key) {
        return Err(input(format!(
            "the root key {} is inside the store directory {}: keep it elsewhere (every copy of the store would carry it)",
            key.display(),
            store.display()
        )));
    }
    if inside(&dir) {
        return Err(input(format!(
            "the key directory {} is inside the store directory {}: pass --keys DIR outside it",
            dir.display(),
            store.display()
        )));
    }
    Ok(dir)
}

pub(crate) fn read_settings(dir: &Path) -> R<Settings> {
    let path = dir.join(SETTINGS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        input(format!(
            "cannot read {}: {e} (is this a store?)",
            path.display()
        ))
    })?;
    serde_json::from_str(&text).map_err(|e| input(format!("malformed {}: {e}", path.display())))
}

pub(crate) fn write_settings(dir: &Path, s: &Settings) -> R<()> {
    let text = serde_json::to_string_pretty(s).map_err(|e| Fail(9, e.to_string()))?;
    let path = dir.join(SETTINGS_FILE);
    std::fs::write(&path, text + "\n").map_err(|e| Fail(9, e.to_string()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Fail(9, e.to_string()))
}

pub(crate) fn open(cli: &Cli) -> R<(Store, Settings)> {
    let settings = read_settings(&settings_dir(cli)?)?;
    open_with(cli, settings)
}

/// Open the store with settings already read (so that input can be checked
/// against them first: bad input never opens the store).
pub(crate) fn open_with(cli: &Cli, settings: Settings) -> R<(Store, Settings)> {
    // The threshold is the keyring's (authenticated); bioseal.json only
    // mirrors it, so editing that file changes nothing.
    let store = Store::open(config(cli, &settings)?)?;
    Ok((store, settings))
}
