//! Threshold calibration on synthetic labelled data whose true rates are
//! known in closed form.
//!
//! In three dimensions the cosine between two independent uniformly random
//! unit vectors is uniform on [-1, 1] (Archimedes' hat-box theorem), so the
//! true false-match rate at threshold t is (1 - t) / 2. Each identity has two
//! samples: a uniformly random direction d, and a point uniform on the
//! spherical cap of cosine >= c0 around d, whose cosine to d is then uniform
//! on [c0, 1]; the true false-non-match rate is (t - c0) / (1 - c0). Every
//! sample is marginally uniform on the sphere, so impostor pairs follow the
//! first law exactly.

mod common;
use bioseal::calibrate;
use bioseal::Embedding;
use common::Rng;

const C0: f64 = 0.8;

fn uniform(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn samples(identities: usize, seed: u64) -> Vec<(String, Embedding)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for id in 0..identities {
        // Uniform direction: z uniform in [-1, 1], azimuth uniform.
        let (z, phi) = (
            2.0 * uniform(&mut rng) - 1.0,
            std::f64::consts::TAU * uniform(&mut rng),
        );
        let r = (1.0 - z * z).sqrt();
        let d = [r * phi.cos(), r * phi.sin(), z];
        // Orthonormal basis (u, v) perpendicular to d.
        let a = if d[0].abs() < 0.9 {
            [1.0, 0.0, 0.0]
        } else {
            [0.0, 1.0, 0.0]
        };
        let dot = a[0] * d[0] + a[1] * d[1] + a[2] * d[2];
        let mut u = [a[0] - dot * d[0], a[1] - dot * d[1], a[2] - dot * d[2]];
        let n = (u[0] * u[0] + u[1] * u[1] + u[2] * u[2]).sqrt();
        u = [u[0] / n, u[1] / n, u[2] / n];
        let v = [
            d[1] * u[2] - d[2] * u[1],
            d[2] * u[0] - d[0] * u[2],
            d[0] * u[1] - d[1] * u[0],
        ];
        // Cap point: cosine to d uniform in [C0, 1].
        let c = C0 + (1.0 - C0) * uniform(&mut rng);
        let s = (1.0 - c * c).sqrt();
        let psi = std::f64::consts::TAU * uniform(&mut rng);
        let p: Vec<f32> = (0..3)
            .map(|i| (c * d[i] + s * (psi.cos() * u[i] + psi.sin() * v[i])) as f32)
            .collect();
        let d: Vec<f32> = d.iter().map(|&x| x as f32).collect();
        out.push((format!("id{id}"), Embedding::new(d)));
        out.push((format!("id{id}"), Embedding::new(p)));
    }
    out
}

#[test]
fn calibrated_rates_match_the_analytic_ones() {
    let target = 0.05;
    let c = calibrate::calibrate(samples(500, 2024), 3, target).expect("calibrate");
    assert_eq!((c.genuine_pairs, c.impostor_pairs), (500, 499_000));
    // True threshold for FMR 0.05: t = 1 - 2 * 0.05 = 0.9.
    let t = f64::from(c.threshold.as_cosine());
    assert!((t - 0.9).abs() < 0.005, "threshold {t}");
    assert!(c.fmr <= target && c.fmr > target - 0.005, "fmr {}", c.fmr);
    // True FNMR at the measured threshold: (t - 0.8) / 0.2 (~0.5); 500
    // genuine pairs give a standard error of ~0.022.
    let fnmr = (t - C0) / (1.0 - C0);
    assert!((c.fnmr - fnmr).abs() < 0.1, "fnmr {} vs {fnmr}", c.fnmr);
    // EER: (1 - t) / 2 = (t - 0.8) / 0.2 at t = 0.9 / 1.1, EER = 1 / 11.
    let eer_t = f64::from(c.eer_threshold.as_cosine());
    assert!((eer_t - 0.9 / 1.1).abs() < 0.01, "eer threshold {eer_t}");
    assert!((c.eer - 1.0 / 11.0).abs() < 0.02, "eer {}", c.eer);
    // Rule of three: 499,000 impostor pairs support 1e-4, not 1e-6.
    assert!(c.sufficient);
    let strict = calibrate::calibrate(samples(500, 2024), 3, 1e-6).expect("calibrate");
    assert!(!strict.sufficient);
    assert_eq!(strict.met, strict.fmr <= 1e-6);
    assert!(c.met);
}

#[test]
fn calibration_errors_are_typed() {
    use bioseal::Error;
    let one_each: Vec<(String, Embedding)> = (0..4)
        .map(|i| (format!("id{i}"), Embedding::new(vec![1.0, i as f32, 0.0])))
        .collect();
    assert!(matches!(
        calibrate::calibrate(one_each, 3, 1e-4),
        Err(Error::Config(_))
    ));
    let nan = vec![
        ("a".to_string(), Embedding::new(vec![1.0, 0.0, 0.0])),
        ("a".to_string(), Embedding::new(vec![f32::NAN, 0.0, 0.0])),
    ];
    assert!(matches!(
        calibrate::calibrate(nan, 3, 1e-4),
        Err(Error::InvalidEmbedding(_))
    ));
    assert!(matches!(
        calibrate::calibrate(samples(3, 1), 3, 0.0),
        Err(Error::Config(_))
    ));
}
