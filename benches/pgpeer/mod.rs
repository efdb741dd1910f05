//! The shared-mode benchmark peer: what a competent team would build on
//! PostgreSQL without bioseal. One row per subject with the embedding as
//! an AES-256-GCM-sealed f32 blob (one application key), cosine computed in
//! the application, and per verify one transaction: the row read `FOR
//! UPDATE`, the failure counter `UPDATE`d and an audit row `INSERT`ed.
//! Prepared statements, one connection.
//!
//! Shared by `benches/shared.rs` and `examples/perf_table.rs`. Not part of
//! the library.
#![allow(dead_code)]

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use postgres::{Client, NoTls, Statement};
use ring::rand::SecureRandom;

pub struct PgPeer {
    client: Client,
    aead: Aes256Gcm,
    threshold: f32,
    rng: ring::rand::SystemRandom,
    select: Statement,
    update: Statement,
    audit: Statement,
    insert: Statement,
    delete: Statement,
}

fn normalise(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl PgPeer {
    /// Connect to `url` and create the peer's tables if missing.
    pub fn open(url: &str, threshold: f32) -> Result<PgPeer, postgres::Error> {
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute(
            "CREATE TABLE IF NOT EXISTS peer_subjects (id text PRIMARY KEY, blob bytea NOT NULL,
                 failures int NOT NULL DEFAULT 0, expires bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS peer_audit (seq bigserial PRIMARY KEY, time bigint NOT NULL,
                 subject text NOT NULL, event text NOT NULL, outcome text);",
        )?;
        let select =
            client.prepare("SELECT blob, failures FROM peer_subjects WHERE id = $1 FOR UPDATE")?;
        let update = client.prepare("UPDATE peer_subjects SET failures = $2 WHERE id = $1")?;
        let audit = client.prepare(
            "INSERT INTO peer_audit (time, subject, event, outcome) VALUES ($1, $2, $3, $4)",
        )?;
        let insert =
            client.prepare("INSERT INTO peer_subjects (id, blob, expires) VALUES ($1, $2, $3)")?;
        let delete = client.prepare("DELETE FROM peer_subjects WHERE id = $1")?;
        Ok(PgPeer {
            client,
            aead: Aes256Gcm::new(&[0x3c; 32].into()),
            threshold,
            rng: ring::rand::SystemRandom::new(),
            select,
            update,
            audit,
            insert,
            delete,
        })
    }

    fn seal(&self, id: &str, embedding: &[f32]) -> Vec<u8> {
        let mut buf: Vec<u8> = normalise(embedding)
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut nonce = [0u8; 12];
        self.rng.fill(&mut nonce).expect("random");
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), id.as_bytes(), &mut buf)
            .expect("seal");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(&tag);
        blob
    }
}

fn open_blob(aead: &Aes256Gcm, id: &str, blob: &[u8]) -> Option<Vec<f32>> {
    if blob.len() < 28 {
        return None;
    }
    let (nonce, rest) = blob.split_at(12);
    let (ct, tag) = rest.split_at(rest.len() - 16);
    let mut buf = ct.to_vec();
    aead.decrypt_in_place_detached(
        Nonce::from_slice(nonce),
        id.as_bytes(),
        &mut buf,
        Tag::from_slice(tag),
    )
    .ok()?;
    Some(
        buf.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

impl PgPeer {
    /// Enroll subjects in one transaction per call (each with an audit row).
    pub fn enroll_many(&mut self, items: &[(&str, &[f32])]) -> Result<(), postgres::Error> {
        let blobs: Vec<Vec<u8>> = items.iter().map(|(id, v)| self.seal(id, v)).collect();
        let expires = now() + 365 * 86_400;
        let mut tx = self.client.transaction()?;
        for ((id, _), blob) in items.iter().zip(&blobs) {
            tx.execute(&self.insert, &[id, blob, &expires])?;
            tx.execute(&self.audit, &[&now(), id, &"enroll", &"ok"])?;
        }
        tx.commit()
    }

    pub fn enroll(&mut self, id: &str, v: &[f32]) -> Result<(), postgres::Error> {
        self.enroll_many(&[(id, v)])
    }

    /// `Some(matched)`, or `None` for an unknown or locked-out subject.
    pub fn verify(&mut self, id: &str, probe: &[f32]) -> Result<Option<bool>, postgres::Error> {
        let probe = normalise(probe);
        let threshold = self.threshold;
        let mut tx = self.client.transaction()?;
        let row = tx.query_opt(&self.select, &[&id])?;
        let Some(row) = row else {
            tx.execute(&self.audit, &[&now(), &id, &"verify", &"not-enrolled"])?;
            tx.commit()?;
            return Ok(None);
        };
        let (blob, failures): (Vec<u8>, i32) = (row.get(0), row.get(1));
        if failures >= 5 {
            tx.execute(&self.audit, &[&now(), &id, &"verify", &"locked-out"])?;
            tx.commit()?;
            return Ok(None);
        }
        let t = match open_blob(&self.aead, id, &blob) {
            Some(t) => t,
            None => return Ok(None),
        };
        let cos: f32 = t.iter().zip(&probe).map(|(a, b)| a * b).sum();
        let matched = cos >= threshold;
        tx.execute(
            &self.update,
            &[&id, &if matched { 0 } else { failures + 1 }],
        )?;
        tx.execute(
            &self.audit,
            &[
                &now(),
                &id,
                &"verify",
                &if matched { "match" } else { "no-match" },
            ],
        )?;
        tx.commit()?;
        Ok(Some(matched))
    }

    pub fn revoke(&mut self, id: &str) -> Result<bool, postgres::Error> {
        let mut tx = self.client.transaction()?;
        let n = tx.execute(&self.delete, &[&id])?;
        tx.execute(&self.audit, &[&now(), &id, &"revoke", &"ok"])?;
        tx.commit()?;
        Ok(n == 1)
    }
}
