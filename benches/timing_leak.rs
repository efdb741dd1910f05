//! Timing-leak measurement of the matcher, dudect style (Reparaz, Balasch,
//! Verbauwhede, "Dude, is my code constant time?", DATE 2017): two classes
//! of inputs are interleaved at random, each measurement times a batch of
//! 16 decisions of one class, and Welch's t-test compares the two timing
//! distributions, raw and cropped at several percentiles (to drop
//! interrupts and other outliers). |t| above 4.5 means a timing difference
//! is detectable with high confidence. Two A/A controls (identical inputs)
//! show what the machine and the harness produce with no difference at all.
//!
//! `cargo bench --bench timing_leak` (release build, ~1 minute). Optional:
//! `BIOSEAL_TIMING_SAMPLES` (default 1,000,000 measurements per test, both
//! classes together). Not part of `cargo test`: it is statistical, and a loaded
//! machine can push |t| up without any leak in the code.

#[path = "common/mod.rs"]
mod common;
use common::welch;

use bioseal::__timing::Fixture;
use std::hint::black_box;
use std::time::Instant;

const DIM: usize = 512;
/// Decisions per measurement: the clock here ticks in steps of about 10 ns,
/// so one ~300 ns decision per sample would be coarsely quantised.
const BATCH: usize = 16;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..DIM)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }
}

/// Time `samples` decisions, class chosen at random each time; return the
/// largest |t| over the raw and cropped tests, and the two medians in ns.
fn measure(name: &str, a: &Fixture, b: &Fixture, samples: usize) -> f64 {
    // Both classes run through the same buffers: `work` is loaded with the
    // class's values before each (untimed) call, so memory placement cannot
    // differ between the classes, only the values.
    let mut work = Fixture::new(vec![vec![1.0; DIM]; a.templates()], vec![1.0; DIM], 0.0)
        .expect("work fixture");
    let mut times = [
        Vec::with_capacity(samples / 2 + 1),
        Vec::with_capacity(samples / 2 + 1),
    ];
    // Warm up caches and frequency.
    for i in 0..20_000 {
        work.load_from(if i % 2 == 0 { a } else { b });
        let _ = black_box(work.decide());
    }
    let mut pick = 0x9E37_79B9_7F4A_7C15_u64;
    for _ in 0..samples {
        // splitmix64's top bit chooses the class.
        pick = pick.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = pick;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let class = ((z ^ (z >> 31)) >> 63) as usize;
        work.load_from(if class == 0 { a } else { b });
        // One untimed decision lets the copy's stores drain, so that the
        // timed batch starts from the same state whatever the source.
        let _ = black_box(black_box(&work).decide());
        let t0 = Instant::now();
        for _ in 0..BATCH {
            let _ = black_box(black_box(&work).decide());
        }
        let dt = t0.elapsed();
        times[class].push(dt.as_nanos() as f64 / BATCH as f64);
    }
    let mut pooled: Vec<f64> = times.iter().flatten().copied().collect();
    pooled.sort_by(f64::total_cmp);
    let pct = |p: f64| pooled[((pooled.len() - 1) as f64 * p) as usize];
    let mut worst = welch(&times[0], &times[1]).abs();
    let mut report = vec![format!("raw {:.2}", worst)];
    for p in [0.5, 0.75, 0.9, 0.95, 0.99] {
        let cut = pct(p);
        let ca: Vec<f64> = times[0].iter().copied().filter(|&t| t <= cut).collect();
        let cb: Vec<f64> = times[1].iter().copied().filter(|&t| t <= cut).collect();
        if ca.len() > 1000 && cb.len() > 1000 {
            let t = welch(&ca, &cb).abs();
            report.push(format!("p{:.0} {:.2}", p * 100.0, t));
            worst = worst.max(t);
        }
    }
    let median = |x: &mut Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (ma, mb) = (median(&mut times[0].clone()), median(&mut times[1].clone()));
    println!(
        "{name:<44} n={samples:>9}  median {ma:>5.0} ns vs {mb:>5.0} ns  max|t| = {worst:>6.2}  ({})  {}",
        report.join(", "),
        if worst < 4.5 { "ok" } else { "LEAK?" }
    );
    worst
}

fn main() {
    // `cargo bench` passes --bench; nothing else is expected.
    let samples: usize = std::env::var("BIOSEAL_TIMING_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut rng = Rng(42);
    let t = 0.36;
    let enrolled = rng.unit();
    let same = enrolled.clone();
    let other = rng.unit();
    let three = vec![rng.unit(), rng.unit(), enrolled.clone()];
    let first_of_three = vec![enrolled.clone(), rng.unit(), rng.unit()];

    let fx = |templates: Vec<Vec<f32>>, probe: &Vec<f32>| {
        Fixture::new(templates, probe.clone(), t).expect("valid fixture")
    };
    let mut worst = 0.0_f64;
    println!("dudect-style timing test of the matcher, {DIM} dimensions, threshold {t}");
    // 0. Control: both classes identical. Shows what the harness and the
    //    machine produce with no difference at all.
    let (a, b) = (
        fx(vec![enrolled.clone()], &other),
        fx(vec![enrolled.clone()], &other),
    );
    let control = measure("control: identical inputs (A/A)", &a, &b, samples);
    let _ = measure("control: same object (A/A)", &a, &a, samples);
    // 1. The outcome: a matching probe against a non-matching one.
    let (a, b) = (
        fx(vec![enrolled.clone()], &same),
        fx(vec![enrolled.clone()], &other),
    );
    assert!(a.decide().is_match() && !b.decide().is_match());
    worst = worst.max(measure("match vs no match (1 template)", &a, &b, samples));
    // 2. Where the match is among several templates (an early exit would show).
    let (a, b) = (fx(first_of_three.clone(), &same), fx(three.clone(), &other));
    assert!(a.decide().is_match() && !b.decide().is_match());
    worst = worst.max(measure(
        "match on 1st of 3 vs no match of 3",
        &a,
        &b,
        samples,
    ));
    let (a, b) = (fx(first_of_three, &same), fx(three, &same));
    assert!(a.decide().is_match() && b.decide().is_match());
    worst = worst.max(measure(
        "match on 1st of 3 vs match on 3rd of 3",
        &a,
        &b,
        samples,
    ));
    // 3. Template values: a sparse template (mostly zero components) against
    //    a dense one, same probe and same outcome.
    let mut sparse = vec![0.0_f32; DIM];
    sparse[0] = 1.0;
    sparse[1] = 0.5;
    let (a, b) = (fx(vec![sparse], &other), fx(vec![rng.unit()], &other));
    assert!(!a.decide().is_match() && !b.decide().is_match());
    worst = worst.max(measure("sparse vs dense template values", &a, &b, samples));
    // 4. Probe values: an extreme probe (one component at full scale) against a random one.
    let mut spike = vec![0.0_f32; DIM];
    spike[7] = 1.0;
    let (a, b) = (
        fx(vec![enrolled.clone()], &spike),
        fx(vec![enrolled], &other),
    );
    assert!(!a.decide().is_match() && !b.decide().is_match());
    worst = worst.max(measure("extreme vs random probe values", &a, &b, samples));
    println!("largest |t| over all tests: {worst:.2} (threshold 4.5); A/A control: {control:.2}");
}
