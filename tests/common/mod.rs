//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bioseal::{
    Consent, Embedding, ManualClock, Purpose, RootKey, Store, StoreConfig, Threshold, Timestamp,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod hsm;
pub mod pg;

/// Which backend a test body runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Embedded: sled in a directory.
    Sled,
    /// Shared: a fresh database on the test PostgreSQL server.
    Postgres,
}

/// Run test body `$name(Kind)` on both backends: `$name::sled` and
/// `$name::postgres` (skipped with a notice only under
/// `BIOSEAL_NO_POSTGRES=1`).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sled() {
                    super::$name($crate::common::Kind::Sled)
                }
                #[test]
                fn postgres() {
                    if !$crate::common::pg::skipped(stringify!($name)) {
                        super::$name($crate::common::Kind::Postgres)
                    }
                }
            }
        )*
    };
}

pub const DIM: usize = 128;
pub const MODEL: &str = "test-model";
/// Start of every test clock: 2026-01-01.
pub const T0: u64 = 1_767_225_600;
pub const DAY: Duration = Duration::from_secs(86_400);

/// Deterministic generator (splitmix64) with Gaussian samples.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn gauss(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// A random unit vector.
    pub fn unit(&mut self, d: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..d).map(|_| self.gauss()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    /// `base` plus Gaussian noise of relative size `sigma` (cosine to base
    /// about 1/sqrt(1 + sigma^2)).
    pub fn noisy(&mut self, base: &[f32], sigma: f32) -> Vec<f32> {
        let s = sigma / (base.len() as f32).sqrt();
        base.iter().map(|x| x + s * self.gauss()).collect()
    }
}

/// A store under test: its data dir, root key dir and manual clock.
pub struct Fixture {
    pub kind: Kind,
    /// Shared mode: the database's URL.
    pub url: Option<String>,
    pub data: tempfile::TempDir,
    pub secrets: tempfile::TempDir,
    pub clock: ManualClock,
    pub buckets: u32,
}

impl Fixture {
    pub fn new(buckets: u32) -> Self {
        Fixture::with(Kind::Sled, buckets)
    }

    /// A fixture on backend `kind` (a fresh database for PostgreSQL).
    pub fn with(kind: Kind, buckets: u32) -> Self {
        let secrets = tempfile::tempdir().expect("tempdir");
        RootKey::from_bytes([0x5a; 32])
            .write_new_file(secrets.path().join("root.key"))
            .expect("write key");
        Fixture {
            kind,
            url: (kind == Kind::Postgres).then(pg::fresh_database),
            data: tempfile::tempdir().expect("tempdir"),
            secrets,
            clock: ManualClock::new(Timestamp::from_unix_secs(T0)),
            buckets,
        }
    }

    pub fn key_path(&self) -> PathBuf {
        self.secrets.path().join("root.key")
    }

    pub fn config_at(&self, dir: &Path) -> StoreConfig {
        self.config_with(dir, RootKey::from_file(self.key_path()).expect("key"))
    }

    /// [`Fixture::config_at`] with another key provider.
    #[allow(dead_code)]
    pub fn config_with(&self, dir: &Path, key: impl bioseal::KeyProvider + 'static) -> StoreConfig {
        StoreConfig::new(dir, key)
            .key_dir(self.secrets.path())
            .model(MODEL, DIM)
            .threshold(Threshold::cosine(0.5))
            .buckets(self.buckets)
            .clock(self.clock.clone())
    }

    /// The store's configuration: the data directory, or the database.
    pub fn config(&self) -> StoreConfig {
        match &self.url {
            Some(url) => self.config_at(Path::new(url)),
            None => self.config_at(self.data.path()),
        }
    }

    pub fn open(&self) -> Store {
        Store::open(self.config()).expect("open store")
    }

    /// Every row of a table ("records", "keys", "meta", "audit"), read
    /// behind the store's back (it must be closed): what anyone with
    /// access to the data files or the database sees.
    pub fn raw_rows(&self, table: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        match &self.url {
            Some(url) => pg::client(url)
                .query(&format!("SELECT k, v FROM bioseal.{table} ORDER BY k"), &[])
                .expect("select")
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            None => {
                let db = open_raw_sled(&self.data.path().join("db"));
                let t = db.open_tree(table).expect("tree");
                t.iter()
                    .map(|kv| kv.expect("kv"))
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect()
            }
        }
    }

    /// Write (or with `None` delete) a row behind the store's back (it
    /// must be closed), durably.
    pub fn raw_put(&self, table: &str, key: &[u8], value: Option<&[u8]>) {
        match &self.url {
            Some(url) => {
                let mut c = pg::client(url);
                match value {
                    Some(v) => c.execute(
                        &format!(
                            "INSERT INTO bioseal.{table} (k, v) VALUES ($1, $2) \
                             ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
                        ),
                        &[&key, &v],
                    ),
                    None => c.execute(
                        &format!("DELETE FROM bioseal.{table} WHERE k = $1"),
                        &[&key],
                    ),
                }
                .expect("write row");
            }
            None => {
                let db = open_raw_sled(&self.data.path().join("db"));
                let t = db.open_tree(table).expect("tree");
                match value {
                    Some(v) => t.insert(key, v).expect("insert"),
                    None => t.remove(key).expect("remove"),
                };
                db.flush().expect("flush");
            }
        }
    }

    /// Replace every row of a table (behind the store's back).
    pub fn set_raw_rows(&self, table: &str, rows: &[(Vec<u8>, Vec<u8>)]) {
        match &self.url {
            Some(url) => {
                let mut c = pg::client(url);
                let mut tx = c.transaction().expect("begin");
                tx.execute(&format!("DELETE FROM bioseal.{table}"), &[])
                    .expect("delete");
                for (k, v) in rows {
                    tx.execute(
                        &format!("INSERT INTO bioseal.{table} (k, v) VALUES ($1, $2)"),
                        &[k, v],
                    )
                    .expect("insert");
                }
                tx.commit().expect("commit");
            }
            None => {
                let db = open_raw_sled(&self.data.path().join("db"));
                let t = db.open_tree(table).expect("tree");
                t.clear().expect("clear");
                for (k, v) in rows {
                    t.insert(k, v.as_slice()).expect("insert");
                }
                db.flush().expect("flush");
            }
        }
    }

    /// The keyring image: the file, or the rows in the database in order.
    pub fn raw_keyring(&self) -> Vec<u8> {
        match &self.url {
            Some(url) => pg::client(url)
                .query("SELECT v FROM bioseal.keyring ORDER BY part", &[])
                .expect("select")
                .iter()
                .flat_map(|r| r.get::<_, Vec<u8>>(0))
                .collect(),
            None => std::fs::read(self.secrets.path().join("bioseal.keyring")).expect("read"),
        }
    }

    /// Replace the keyring image (database: one row per 128 bytes; an
    /// empty image removes every row).
    pub fn set_raw_keyring(&self, image: &[u8]) {
        match &self.url {
            Some(url) => {
                let mut c = pg::client(url);
                let mut tx = c.transaction().expect("begin");
                tx.execute("DELETE FROM bioseal.keyring", &[])
                    .expect("delete");
                for (i, unit) in image.chunks(128).enumerate() {
                    tx.execute(
                        "INSERT INTO bioseal.keyring (part, v) VALUES ($1, $2)",
                        &[&(i as i32), &unit],
                    )
                    .expect("insert");
                }
                tx.commit().expect("commit");
            }
            None => {
                std::fs::write(self.secrets.path().join("bioseal.keyring"), image).expect("write")
            }
        }
    }

    pub fn now(&self) -> Timestamp {
        bioseal::Clock::now(&self.clock)
    }
}

/// Consent for identity verification, expiring `days` from `now`.
pub fn consent(now: Timestamp, days: u64) -> Consent {
    Consent::new([Purpose::IDENTITY_VERIFICATION])
        .expires_at(now.saturating_add(DAY * days as u32))
        .evidence([0xab; 32])
}

pub fn emb(v: &[f32]) -> Embedding {
    Embedding::from_slice(v)
}

pub const IDV: Purpose = Purpose::IDENTITY_VERIFICATION;

/// Copy a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir") {
        let e = e.expect("entry");
        let t = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).expect("copy");
        }
    }
}

/// Every regular file below `dir`, with its bytes.
pub fn read_all_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("readdir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            out.extend(read_all_files(&e.path()));
        } else {
            out.push((e.path(), std::fs::read(e.path()).expect("read")));
        }
    }
    out.sort();
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// `sled::open` for tests that edit a closed store's files directly; retries
/// while the just-dropped store's I/O threads still hold the file lock.
pub fn open_raw_sled(path: &Path) -> sled::Db {
    for _ in 0..50 {
        match sled::open(path) {
            Ok(db) => return db,
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("raw sled: {e}"),
        }
    }
    panic!("raw sled: lock still held after a second")
}
