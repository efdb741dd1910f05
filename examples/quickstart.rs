//! Quickstart: an embedded store in a temporary directory.
//!
//! enroll -> verify a genuine probe -> verify an impostor -> revoke ->
//! verify again. Run with `cargo run --release --example quickstart`.

use bioseal::{
    Consent, Embedding, Error, Purpose, RootKey, Store, StoreConfig, Threshold, Timestamp,
};
use std::time::{SystemTime, UNIX_EPOCH};

const DIM: usize = 512;

/// Synthetic embeddings: a deterministic generator standing in for a face
/// model (splitmix64 + Box-Muller), so the example needs no model weights.
struct Synth(u64);
impl Synth {
    fn gauss(&mut self) -> f32 {
        let mut next = || {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (u1, u2) = (next().max(1e-300), next());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn face(&mut self) -> Vec<f32> {
        (0..DIM).map(|_| self.gauss()).collect()
    }
    /// Another capture of the same face: the base plus noise (cosine ~0.8).
    fn recapture(&mut self, base: &[f32]) -> Vec<f32> {
        base.iter().map(|x| x + 0.75 * self.gauss()).collect()
    }
}

fn main() -> Result<(), Error> {
    let data = tempfile::tempdir()?;
    let secrets = tempfile::tempdir()?; // the root key lives outside the data dir
    let key_path = secrets.path().join("root.key");
    RootKey::generate()?.write_new_file(&key_path)?;

    let store = Store::open(
        StoreConfig::new(data.path(), RootKey::from_file(&key_path)?)
            .key_dir(secrets.path()) // the keyring, outside the data dir too
            .model("synthetic-512", DIM)
            .threshold(Threshold::cosine(0.36)),
    )?;
    println!("opened store in {}", data.path().display());

    let mut synth = Synth(2023);
    let alice = synth.face();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let consent = Consent::new([Purpose::IDENTITY_VERIFICATION])
        .expires_at(Timestamp::from_unix_secs(now + 365 * 86_400))
        .evidence([0x42; 32]); // SHA-256 of the signed release
    store.enroll("alice@example.org", Embedding::new(alice.clone()), consent)?;
    println!("enroll alice            -> ok");

    let genuine = store.verify(
        "alice@example.org",
        &Purpose::IDENTITY_VERIFICATION,
        Embedding::new(synth.recapture(&alice)),
    )?;
    println!("verify alice (genuine)  -> {genuine:?}");

    let impostor = store.verify(
        "alice@example.org",
        &Purpose::IDENTITY_VERIFICATION,
        Embedding::new(synth.face()),
    )?;
    println!("verify alice (impostor) -> {impostor:?}");

    let other_purpose = store.verify(
        "alice@example.org",
        &Purpose::IMPERSONATION_CHECK,
        Embedding::new(synth.recapture(&alice)),
    );
    println!(
        "verify for an unconsented purpose -> {}",
        outcome(&other_purpose)
    );

    let receipt = store.revoke("alice@example.org")?;
    println!("revoke alice            -> {:?}", receipt.status);

    let after = store.verify(
        "alice@example.org",
        &Purpose::IDENTITY_VERIFICATION,
        Embedding::new(alice),
    );
    println!("verify alice again      -> {}", outcome(&after));

    let stats = store.stats()?;
    println!(
        "store: {} subjects, {} buckets, KEK generations {}..={}",
        stats.subjects, stats.buckets, stats.generation_min, stats.generation_max
    );
    assert!(genuine.is_match() && !impostor.is_match());
    assert!(matches!(after, Err(Error::NotEnrolled)));
    Ok(())
}

fn outcome(r: &Result<bioseal::Decision, Error>) -> String {
    match r {
        Ok(d) => format!("{d:?}"),
        Err(e) => format!("error: {e}"),
    }
}
