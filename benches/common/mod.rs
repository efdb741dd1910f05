//! Inputs shared by the benchmarks and `examples/perf_table.rs`.
#![allow(dead_code)]

use bioseal::{Consent, Purpose, Timestamp};
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
