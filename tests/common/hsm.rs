//! A real SoftHSM2 token for the tests (Debian package `softhsm2`): one
//! token directory and one token per test process, created with
//! `softhsm2-util` before the module is first loaded; worker processes
//! inherit it through `SOFTHSM2_CONF`. Each test keeps its epoch keys
//! under a label prefix of its own.
//!
//! `BIOSEAL_NO_SOFTHSM=1` skips the PKCS#11 tests with a notice; a
//! missing module otherwise fails loudly.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const TOKEN: &str = "bioseal-test";
pub const PIN: &str = "4711";

/// Whether the PKCS#11 tests are skipped (and a notice printed).
pub fn skipped(test: &str) -> bool {
    if std::env::var_os("BIOSEAL_NO_SOFTHSM").is_some_and(|v| v == "1") {
        eprintln!("NOTICE: {test}: skipped on PKCS#11 (BIOSEAL_NO_SOFTHSM=1)");
        return true;
    }
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install softhsm2 (apt-get install softhsm2), or set BIOSEAL_NO_SOFTHSM=1"
    );
    false
}

/// The token directory: created (with its configuration file and one
/// initialised token) on first use in this process, or inherited from the
/// parent test process.
pub fn token_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(conf) = std::env::var_os("BIOSEAL_TEST_SOFTHSM_DIR") {
            // A worker: the parent's token.
            return PathBuf::from(conf);
        }
        let dir = tempfile::Builder::new()
            .prefix("bioseal-softhsm-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let tokens = dir.join("tokens");
        std::fs::create_dir(&tokens).expect("mkdir");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write conf");
        // Before the module is loaded anywhere in this process; children
        // inherit both variables.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var("BIOSEAL_TEST_SOFTHSM_DIR", &dir);
        let out = std::process::Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--pin",
                PIN,
                "--so-pin",
                "0815",
            ])
            .output()
            .expect("run softhsm2-util (package softhsm2)");
        assert!(
            out.status.success(),
            "softhsm2-util: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .clone()
}

/// A provider on the test token under `prefix`.
pub fn provider(prefix: &str) -> bioseal::Pkcs11Provider {
    let _ = token_dir();
    bioseal::Pkcs11Provider::open(MODULE, TOKEN, PIN, prefix).expect("open the SoftHSM2 token")
}

/// Held by each PKCS#11 test for its whole length: SoftHSM2's file store
/// fails (`CKR_GENERAL_ERROR`) when two processes create objects in one
/// token at once, and a test's worker processes share the token with it.
/// (A limit of SoftHSM2, not of the provider: an HSM serialises itself.)
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
