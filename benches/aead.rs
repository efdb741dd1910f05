//! AEAD choice (SECURITY.md, "Cryptography"): aes-gcm (key schedule wiped on
//! drop) against ring (not wiped), measured in the same run on the payload
//! sizes bioseal seals: a 32-byte DEK and a 1 KiB / 4 KiB subject payload
//! (512 x i16 per template), including key setup, since bioseal builds a
//! fresh cipher from each unwrapped DEK.
//!
//! `cargo bench --bench aead`

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn aead(c: &mut Criterion) {
    let key = [7u8; 32];
    let nonce = [1u8; 12];
    let aad = [3u8; 64];
    let mut g = c.benchmark_group("seal_with_key_setup");
    for size in [32usize, 1024, 4096] {
        g.throughput(Throughput::Bytes(size as u64));
        let data = vec![5u8; size];
        g.bench_with_input(BenchmarkId::new("aes-gcm", size), &data, |b, data| {
            b.iter(|| {
                let k = Aes256Gcm::new(black_box(&key).into());
                let mut buf = data.clone();
                let tag = k
                    .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut buf)
                    .expect("seal");
                black_box((buf, tag))
            })
        });
        g.bench_with_input(BenchmarkId::new("ring", size), &data, |b, data| {
            b.iter(|| {
                let k = ring::aead::LessSafeKey::new(
                    ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, black_box(&key))
                        .expect("key"),
                );
                let mut buf = data.clone();
                let tag = k
                    .seal_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce),
                        ring::aead::Aad::from(&aad),
                        &mut buf,
                    )
                    .expect("seal");
                black_box((buf, tag))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
