//! The benchmark peer: what a competent team would build without bioseal.
//! SQLCipher (WAL, synchronous=NORMAL) holding one row per subject with the
//! embedding as an AES-256-GCM-sealed blob, f32 cosine computed in the
//! application, and an audit row inserted in the same transaction.
//!
//! Shared by `benches/compare.rs` and `examples/perf_table.rs`. Not part of
//! the library.
#![allow(dead_code)]

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use ring::rand::SecureRandom;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;

pub struct Peer {
    conn: Connection,
    aead: Aes256Gcm,
    threshold: f32,
    rng: ring::rand::SystemRandom,
}

fn normalise(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

impl Peer {
    /// Open (or create) the peer database at `path`.
    pub fn open(path: &Path, threshold: f32) -> rusqlite::Result<Peer> {
        let conn = Connection::open(path)?;
        conn.execute_batch(&format!("PRAGMA key = \"x'{}'\";", "2d".repeat(32)))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS subjects (id TEXT PRIMARY KEY, blob BLOB NOT NULL,
                 expires INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS subjects_expires ON subjects (expires);
             CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 time INTEGER NOT NULL, subject TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT);",
        )?;
        Ok(Peer {
            conn,
            aead: Aes256Gcm::new(&[0x3c; 32].into()),
            threshold,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }

    /// Seal an embedding for `id`: nonce | AES-256-GCM(f32 LE) | tag.
    fn seal(&self, id: &str, embedding: &[f32]) -> rusqlite::Result<Vec<u8>> {
        let mut buf: Vec<u8> = normalise(embedding)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), id.as_bytes(), &mut buf)
            .map_err(|_| rusqlite::Error::InvalidQuery)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(&tag);
        Ok(blob)
    }

    /// Enroll one subject whose consent expires in a year, in one transaction.
    pub fn enroll(&mut self, id: &str, embedding: &[f32]) -> rusqlite::Result<()> {
        self.enroll_many(&[(id, embedding, Self::now() + 365 * 86_400)])
    }

    /// Enroll many subjects (id, embedding, expiry in Unix seconds) in one
    /// transaction, with an audit row each.
    pub fn enroll_many(&mut self, items: &[(&str, &[f32], i64)]) -> rusqlite::Result<()> {
        let blobs = items
            .iter()
            .map(|(id, e, _)| self.seal(id, e))
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let tx = self.conn.transaction()?;
        for ((id, _, expires), blob) in items.iter().zip(blobs) {
            tx.execute(
                "INSERT OR REPLACE INTO subjects (id, blob, expires) VALUES (?1, ?2, ?3)",
                params![id, blob, expires],
            )?;
            tx.execute(
                "INSERT INTO audit (time, subject, event, outcome) VALUES (?1, ?2, 'enroll', 'ok')",
                params![Self::now(), id],
            )?;
        }
        tx.commit()
    }

    /// Fold the write-ahead log into the database file, as SQLite's
    /// auto-checkpoint does over time: after a bulk load the peer is measured
    /// in its steady state, not with every read going through a large WAL.
    pub fn checkpoint(&mut self) -> rusqlite::Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }

    /// Re-encrypt the database under a new key (SQLCipher's `PRAGMA
    /// rekey`: every page rewritten): the peer's way to retire a key that
    /// old copies of the file were encrypted under.
    pub fn rekey(&mut self, byte: u8) -> rusqlite::Result<()> {
        self.conn.execute_batch(&format!(
            "PRAGMA rekey = \"x'{}'\";",
            format!("{byte:02x}").repeat(32)
        ))
    }

    /// A consistent online copy of the database (`VACUUM INTO`, encrypted
    /// under the same key).
    pub fn backup_to(&mut self, path: &Path) -> rusqlite::Result<()> {
        self.conn
            .execute("VACUUM INTO ?1", params![path.to_string_lossy()])
            .map(|_| ())
    }

    /// Subjects held.
    pub fn count(&self) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT count(*) FROM subjects", [], |r| r.get(0))
    }

    /// Delete every subject whose consent expired by `now`, with an audit row
    /// each, in one transaction. Returns the number deleted.
    pub fn sweep(&mut self, now: i64) -> rusqlite::Result<usize> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO audit (time, subject, event, outcome)
             SELECT ?1, id, 'expire', 'ok' FROM subjects WHERE expires <= ?1",
            params![now],
        )?;
        let n = tx.execute("DELETE FROM subjects WHERE expires <= ?1", params![now])?;
        tx.commit()?;
        Ok(n)
    }

    /// Some(match?) or None for an unknown subject.
    pub fn verify(&mut self, id: &str, probe: &[f32]) -> rusqlite::Result<Option<bool>> {
        let tx = self.conn.transaction()?;
        let blob: Option<Vec<u8>> = tx
            .query_row(
                "SELECT blob FROM subjects WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let result = match blob {
            None => None,
            Some(blob) if blob.len() > 28 => {
                let (nonce, rest) = blob.split_at(12);
                let (ct, tag) = rest.split_at(rest.len() - 16);
                let mut buf = ct.to_vec();
                self.aead
                    .decrypt_in_place_detached(
                        Nonce::from_slice(nonce),
                        id.as_bytes(),
                        &mut buf,
                        Tag::from_slice(tag),
                    )
                    .map_err(|_| rusqlite::Error::InvalidQuery)?;
                let t: Vec<f32> = buf
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let p = normalise(probe);
                let cos: f32 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
                Some(cos >= self.threshold)
            }
            Some(_) => return Err(rusqlite::Error::InvalidQuery),
        };
        let outcome = match result {
            Some(true) => "match",
            Some(false) => "no-match",
            None => "not-enrolled",
        };
        tx.execute(
            "INSERT INTO audit (time, subject, event, outcome) VALUES (?1, ?2, 'verify', ?3)",
            params![Self::now(), id, outcome],
        )?;
        tx.commit()?;
        Ok(result)
    }

    pub fn revoke(&mut self, id: &str) -> rusqlite::Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM subjects WHERE id = ?1", params![id])?;
        tx.execute(
            "INSERT INTO audit (time, subject, event, outcome) VALUES (?1, ?2, 'revoke', 'ok')",
            params![Self::now(), id],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }
}
