//! Does a wrong user key cost what a `NoMatch` costs? (issue 14; SECURITY.md
//! §17.) Split-custody subjects on one store; three classes of calls are
//! interleaved at random: a `NoMatch` with the right user key (the
//! templates opened and compared, the failure counted: a re-key and a
//! rotation), a wrong user key with the genuine face (`WrongUserKey`: the
//! key derived, the open failing, a stand-in comparison, the failure
//! counted the same way), and a wrong key with an impostor's face. Welch's
//! t compares the latency distributions, raw and cropped at several
//! percentiles; |t| < 4.5 means no difference is detectable at that
//! confidence. An A/A control splits the `NoMatch` class in two.
//!
//! `cargo bench --bench custody` (release; a few minutes: every call
//! syncs). `BIOSEAL_CUSTODY_SAMPLES` sets the calls per class (default
//! 5,000). Not part of `cargo test`: it is statistical, and disk latency on
//! a shared machine moves it.

#[path = "common/mod.rs"]
mod common;
use common::{consent, max_t, median, unit};

use bioseal::{Decision, Embedding, Error, ManualClock, Purpose, UserKey};
use std::time::Instant;

fn key(i: u64, salt: u8) -> Result<UserKey, Error> {
    let mut b = [salt; 32];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[31] = salt ^ 0x5a;
    UserKey::from_bytes(b)
}

fn main() -> Result<(), Error> {
    let samples: usize = std::env::var("BIOSEAL_CUSTODY_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let tmp = tempfile::tempdir()?;
    let clock = ManualClock::new(bioseal::Clock::now(&bioseal::SystemClock));
    let store = common::open_store(tmp.path(), clock.clone())?;
    // Every call is a counted failure; each subject takes at most 4 (below
    // the lockout), whatever their class.
    let subjects = (3 * samples).div_ceil(4) + 1;
    for i in 0..subjects as u64 {
        store.enroll_with(
            &format!("s{i}"),
            Embedding::from_slice(&unit(i)),
            consent(),
            &key(i, 1)?,
        )?;
    }
    let impostor = unit(999_999);
    let purpose = Purpose::IDENTITY_VERIFICATION;
    let mut classes: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = 0u64;
    for i in 0..200u64 {
        let _ = store.verify(
            &format!("warm-{i}"),
            &purpose,
            Embedding::from_slice(&impostor),
        );
    }
    while classes.iter().any(|c| c.len() < samples) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let class = (rng % 3) as usize;
        if classes[class].len() >= samples {
            continue;
        }
        let s = next / 4;
        next += 1;
        let id = format!("s{s}");
        let (probe, k, want_match) = match class {
            0 => (Embedding::from_slice(&impostor), key(s, 1)?, true),
            1 => (Embedding::from_slice(&unit(s)), key(s, 2)?, false),
            _ => (Embedding::from_slice(&impostor), key(s, 2)?, false),
        };
        let t = Instant::now();
        let r = store.verify_with(&id, &purpose, probe, &k);
        let d = t.elapsed();
        if want_match {
            assert!(matches!(r, Ok(Decision::NoMatch)), "{id}: {r:?}");
        } else {
            assert!(matches!(r, Err(Error::WrongUserKey)), "{id}: {r:?}");
        }
        classes[class].push(d.as_secs_f64() * 1e6);
    }
    let [no_match, wrong_genuine, wrong_impostor] = &classes;
    let (a1, a2): (Vec<f64>, Vec<f64>) = (
        no_match.iter().step_by(2).copied().collect(),
        no_match.iter().skip(1).step_by(2).copied().collect(),
    );
    println!("split custody timing, {samples} calls per class, {subjects} subjects");
    println!(
        "  NoMatch (right key)         median {:9.1} µs",
        median(no_match)
    );
    println!(
        "  wrong key, genuine face     median {:9.1} µs",
        median(wrong_genuine)
    );
    println!(
        "  wrong key, impostor face    median {:9.1} µs",
        median(wrong_impostor)
    );
    println!(
        "  wrong key (genuine) vs NoMatch: max |t| = {:.2}",
        max_t(wrong_genuine, no_match)
    );
    println!(
        "  wrong key: genuine vs impostor face: max |t| = {:.2}",
        max_t(wrong_genuine, wrong_impostor)
    );
    println!(
        "  A/A control (NoMatch halves): max |t| = {:.2}",
        max_t(&a1, &a2)
    );
    Ok(())
}
