//! Does a verify's latency tell who is enrolled? (issue 11 §5; SECURITY.md
//! §11.) Three classes of calls are interleaved at random on one store:
//! an enrolled subject's `NoMatch` (an impostor probe: a re-key and a
//! rotation of its bucket), an unknown subject (the decoy path: the same
//! work on stand-ins and a rotation of the bucket its pseudonym falls in),
//! and a locked-out subject (refused: the comparison thrown away and a
//! rotation).
//! Welch's t compares the two latency distributions, raw and cropped at
//! several percentiles; |t| < 4.5 means no difference is detectable at that
//! confidence. An A/A control splits the NoMatch class in two to show what
//! the machine produces with no difference at all.
//!
//! `cargo bench --bench membership` (release; a few minutes: every call
//! syncs). `BIOSEAL_MEMBERSHIP_SAMPLES` sets the calls per class (default
//! 10,000). Not part of `cargo test`: it is statistical, and disk latency
//! on a shared machine moves it.

#[path = "common/mod.rs"]
mod common;
use common::{consent, max_t, median, unit};

use bioseal::{Decision, Embedding, Error, ManualClock, Purpose};
use std::time::Instant;

fn main() -> Result<(), Error> {
    let samples: usize = std::env::var("BIOSEAL_MEMBERSHIP_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir()?;
    // A stopped clock: the locked-out class stays locked for the whole run.
    let clock = ManualClock::new(bioseal::Clock::now(&bioseal::SystemClock));
    let store = common::open_store(tmp.path(), clock)?;
    // Each enrolled subject takes at most 4 impostor probes (no lockout).
    let enrolled = samples.div_ceil(4) + 1;
    let vecs: Vec<Vec<f32>> = (0..enrolled as u64).map(unit).collect();
    for chunk in (0..enrolled).collect::<Vec<_>>().chunks(1_000) {
        let items: Vec<_> = chunk
            .iter()
            .map(|&i| (format!("s{i}"), Embedding::from_slice(&vecs[i]), consent()))
            .collect();
        for r in store.enroll_many(items)? {
            r?;
        }
    }
    let impostor = unit(999_999);
    let purpose = Purpose::IDENTITY_VERIFICATION;
    // 100 subjects locked out after 5 failures.
    for i in 0..100u64 {
        let id = format!("locked-{i}");
        store.enroll(&id, Embedding::from_slice(&unit(5_000_000 + i)), consent())?;
        for _ in 0..5 {
            let _ = store.verify(&id, &purpose, Embedding::from_slice(&impostor))?;
        }
    }
    let (mut member, mut stranger, mut locked) = (Vec::new(), Vec::new(), Vec::new());
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let (mut next_member, mut next_stranger) = (0usize, 0usize);
    // Warm-up, untimed.
    for i in 0..200 {
        let _ = store.verify(
            &format!("warm-{i}"),
            &purpose,
            Embedding::from_slice(&impostor),
        );
    }
    while member.len() < samples || stranger.len() < samples || locked.len() < samples {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let class = match rng % 3 {
            0 if member.len() < samples => 0,
            1 if stranger.len() < samples => 1,
            _ if locked.len() < samples => 2,
            _ if member.len() < samples => 0,
            _ => 1,
        };
        let probe = Embedding::from_slice(&impostor);
        if class == 2 {
            let id = format!("locked-{}", locked.len() % 100);
            let t = Instant::now();
            let r = store.verify(&id, &purpose, probe);
            let d = t.elapsed();
            assert!(matches!(r, Err(Error::LockedOut { .. })), "{id}: {r:?}");
            locked.push(d.as_secs_f64() * 1e6);
        } else if class == 0 {
            let id = format!("s{}", next_member / 4);
            next_member += 1;
            let t = Instant::now();
            let r = store.verify(&id, &purpose, probe);
            let d = t.elapsed();
            assert!(matches!(r, Ok(Decision::NoMatch)), "{id}: {r:?}");
            member.push(d.as_secs_f64() * 1e6);
        } else {
            let id = format!("unknown-{next_stranger}");
            next_stranger += 1;
            let t = Instant::now();
            let r = store.verify(&id, &purpose, probe);
            let d = t.elapsed();
            assert!(matches!(r, Err(Error::NotEnrolled)), "{id}: {r:?}");
            stranger.push(d.as_secs_f64() * 1e6);
        }
    }
    let (a1, a2): (Vec<f64>, Vec<f64>) = {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (i, v) in member.iter().enumerate() {
            if i % 2 == 0 {
                x.push(*v)
            } else {
                y.push(*v)
            }
        }
        (x, y)
    };
    println!("membership timing, {samples} calls per class, {enrolled} enrolled subjects");
    println!("  enrolled NoMatch  median {:9.1} µs", median(&member));
    println!("  unknown subject   median {:9.1} µs", median(&stranger));
    println!("  locked-out subject median {:9.1} µs", median(&locked));
    println!(
        "  locked out vs unknown: max |t| = {:.2}",
        max_t(&locked, &stranger)
    );
    println!(
        "  NoMatch vs unknown: max |t| = {:.2}",
        max_t(&member, &stranger)
    );
    println!(
        "  A/A control (NoMatch halves): max |t| = {:.2}",
        max_t(&a1, &a2)
    );
    Ok(())
}
