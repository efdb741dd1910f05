//! Inputs shared by the benchmarks and `examples/perf_table.rs`.
#![allow(dead_code)]

use bioseal::{
    Consent, Error, ManualClock, Purpose, RootKey, Store, StoreConfig, Threshold, Timestamp,
};
use std::time::{SystemTime, UNIX_EPOCH};

/// Embedding dimension of every benchmark.
pub const DIM: usize = 512;

/// A deterministic pseudo-random unit vector (xorshift64) for `seed`.
pub fn unit(seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..DIM)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

/// Identity-verification consent for a year from now.
pub fn consent() -> Consent {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Consent::new([Purpose::IDENTITY_VERIFICATION])
        .expires_at(Timestamp::from_unix_secs(now + 365 * 86_400))
        .evidence([1; 32])
}

/// Welch's t statistic of two samples.
pub fn welch(a: &[f64], b: &[f64]) -> f64 {
    let stats = |x: &[f64]| {
        let n = x.len() as f64;
        let m = x.iter().sum::<f64>() / n;
        let v = x.iter().map(|y| (y - m) * (y - m)).sum::<f64>() / (n - 1.0);
        (n, m, v)
    };
    let (na, ma, va) = stats(a);
    let (nb, mb, vb) = stats(b);
    (ma - mb) / (va / na + vb / nb).sqrt()
}

/// Largest |t| over the raw samples and the samples cropped at the 99th,
/// 90th and 50th percentile of both classes together.
pub fn max_t(a: &[f64], b: &[f64]) -> f64 {
    let mut all: Vec<f64> = a.iter().chain(b).copied().collect();
    all.sort_by(f64::total_cmp);
    let mut worst = welch(a, b).abs();
    for p in [0.99, 0.90, 0.50] {
        let cut = all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        let (ca, cb): (Vec<f64>, Vec<f64>) = (
            a.iter().copied().filter(|x| *x <= cut).collect(),
            b.iter().copied().filter(|x| *x <= cut).collect(),
        );
        if ca.len() > 10 && cb.len() > 10 {
            worst = worst.max(welch(&ca, &cb).abs());
        }
    }
    worst
}

/// The median of a sample.
pub fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A store in `dir` (data and keys below it) with a fixed root key, the
/// benchmarks' dimension, threshold cosine 0.5 and `clock`.
pub fn open_store(dir: &std::path::Path, clock: ManualClock) -> Result<Store, Error> {
    Store::open(
        StoreConfig::new(dir.join("data"), RootKey::from_bytes([3; 32]))
            .key_dir(dir.join("keys"))
            .model("bench", DIM)
            .threshold(Threshold::cosine(0.5))
            .clock(clock),
    )
}
