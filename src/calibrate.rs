//! Threshold calibration from labelled evaluation embeddings.
//!
//! Every pair of samples is scored with the store's own arithmetic (L2
//! normalisation, quantisation to `i16` at scale 2^14, integer dot product,
//! threshold at scale 2^28): pairs of one identity are genuine, pairs of two
//! identities are impostors. The threshold returned is the lowest one whose
//! false-match rate on the impostor pairs is at most the target, expressed as
//! the `f32` cosine a [`crate::StoreConfig`] takes, and the rates reported
//! are measured at exactly the fixed-point value that cosine converts to.
//!
//! This works on evaluation data the caller owns, never on enrolled
//! templates: the store itself exposes no score.

use crate::embedding::Embedding;
use crate::error::{Error, Result};
use crate::matcher::{self, Threshold};
use std::collections::BTreeMap;

/// Result of [`calibrate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Lowest threshold whose false-match rate is at most the target.
    pub threshold: Threshold,
    /// The target false-match rate.
    pub target_fmr: f64,
    /// False-match rate at `threshold`: impostor pairs at or above it.
    pub fmr: f64,
    /// Whether `fmr` is at most the target. False only when impostor pairs
    /// score at the very top of the scale (quantised near-duplicates), where
    /// no cosine threshold of at most 1 separates them.
    pub met: bool,
    /// False-non-match rate at `threshold`: genuine pairs below it.
    pub fnmr: f64,
    /// Equal error rate: the mean of FMR and FNMR where they are closest.
    pub eer: f64,
    /// Threshold at the equal error rate.
    pub eer_threshold: Threshold,
    /// Genuine pairs scored.
    pub genuine_pairs: u64,
    /// Impostor pairs scored.
    pub impostor_pairs: u64,
    /// Whether there are at least 3 / `target_fmr` impostor pairs (the
    /// "rule of 3": with fewer, zero observed false matches does not show
    /// the target rate at 95% confidence).
    pub sufficient: bool,
}

/// Genuine and impostor similarity scores, on the store's fixed-point scale
/// (2^28 = cosine 1), each sorted ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scores {
    /// Same-identity pairs.
    pub genuine: Vec<i64>,
    /// Different-identity pairs.
    pub impostor: Vec<i64>,
}

/// Fixed-point value of cosine 1.
pub const SCORE_ONE: i64 = 1 << 28;

/// Score every pair of `samples` (identity, embedding of dimension `dim`).
/// Errors: [`Error::InvalidEmbedding`] for an invalid embedding, and
/// [`Error::Config`] when there is no genuine or no impostor pair.
pub fn score_pairs<I, S>(samples: I, dim: usize) -> Result<Scores>
where
    I: IntoIterator<Item = (S, Embedding)>,
    S: AsRef<str>,
{
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids = Vec::new();
    let mut templates = Vec::new();
    for (id, e) in samples {
        let next = by_id.len();
        ids.push(*by_id.entry(id.as_ref().to_owned()).or_insert(next));
        templates.push(e.quantize(dim)?);
    }
    let mut s = Scores::default();
    for i in 0..templates.len() {
        for j in i + 1..templates.len() {
            let d = matcher::score(&templates[i], &templates[j]);
            if ids[i] == ids[j] {
                s.genuine.push(d);
            } else {
                s.impostor.push(d);
            }
        }
    }
    if s.genuine.is_empty() || s.impostor.is_empty() {
        return Err(Error::Config(format!(
            "calibration needs genuine and impostor pairs: {} genuine, {} impostor \
             (at least two samples of one identity and two identities)",
            s.genuine.len(),
            s.impostor.len()
        )));
    }
    s.genuine.sort_unstable();
    s.impostor.sort_unstable();
    Ok(s)
}

impl Scores {
    /// Fraction of impostor pairs at or above fixed-point threshold `t`.
    pub fn fmr(&self, t: i64) -> f64 {
        let above = self.impostor.len() - self.impostor.partition_point(|&x| x < t);
        above as f64 / self.impostor.len().max(1) as f64
    }

    /// Fraction of genuine pairs below fixed-point threshold `t`.
    pub fn fnmr(&self, t: i64) -> f64 {
        self.genuine.partition_point(|&x| x < t) as f64 / self.genuine.len().max(1) as f64
    }
}

/// An order-preserving integer for a finite `f32` (and back): binary search
/// over floats without stepping one ulp at a time.
fn order_key(c: f32) -> i64 {
    let bits = i64::from(c.to_bits() & 0x7fff_ffff);
    if c.is_sign_negative() {
        -bits
    } else {
        bits
    }
}

fn from_order_key(k: i64) -> f32 {
    let bits = u32::try_from(k.unsigned_abs()).unwrap_or(0x7f7f_ffff);
    if k < 0 {
        -f32::from_bits(bits)
    } else {
        f32::from_bits(bits)
    }
}

/// The smallest `f32` cosine in [-1, 1] whose fixed-point value is at least
/// `t` (cosine 1 if none is).
fn cosine_at_least(t: i64) -> Threshold {
    let (mut lo, mut hi) = (order_key(-1.0), order_key(1.0));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if Threshold::cosine(from_order_key(mid)).fixed() >= t {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Threshold::cosine(from_order_key(lo))
}

/// Calibrate a threshold for `target_fmr` (for example 1e-4, the NIST SP
/// 800-63B-4 limit) from labelled samples. See the module documentation.
pub fn calibrate<I, S>(samples: I, dim: usize, target_fmr: f64) -> Result<Calibration>
where
    I: IntoIterator<Item = (S, Embedding)>,
    S: AsRef<str>,
{
    check_target_fmr(target_fmr)?;
    let s = score_pairs(samples, dim)?;
    Ok(s.calibrate(target_fmr))
}

/// [`Error::Config`] unless `target_fmr` is in (0, 1): what [`calibrate`]
/// checks first, for callers that score pairs once and calibrate the
/// [`Scores`] themselves.
pub fn check_target_fmr(target_fmr: f64) -> Result<()> {
    if target_fmr > 0.0 && target_fmr < 1.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "target FMR must be in (0, 1), got {target_fmr}"
        )))
    }
}

impl Scores {
    /// Calibrate from already scored pairs (see [`calibrate`]).
    pub fn calibrate(&self, target_fmr: f64) -> Calibration {
        let n = self.impostor.len();
        // At most k impostor pairs may reach the threshold: put it just above
        // the (k+1)-th highest impostor score.
        let k = (target_fmr * n as f64).floor() as usize;
        let needed = if k >= n {
            -SCORE_ONE
        } else {
            self.impostor[n - k - 1] + 1
        };
        let threshold = cosine_at_least(needed);
        let t = threshold.fixed();
        // EER: the smallest t with FNMR(t) >= FMR(t), or the one before it.
        let (mut lo, mut hi) = (-SCORE_ONE, SCORE_ONE + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.fnmr(mid) >= self.fmr(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let gap = |t: i64| (self.fmr(t) - self.fnmr(t)).abs();
        let e = if lo > -SCORE_ONE && gap(lo - 1) < gap(lo) {
            lo - 1
        } else {
            lo
        };
        Calibration {
            threshold,
            target_fmr,
            fmr: self.fmr(t),
            met: self.fmr(t) <= target_fmr,
            fnmr: self.fnmr(t),
            eer: (self.fmr(e) + self.fnmr(e)) / 2.0,
            eer_threshold: cosine_at_least(e),
            genuine_pairs: self.genuine.len() as u64,
            impostor_pairs: n as u64,
            sufficient: n as f64 >= 3.0 / target_fmr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_key_round_trips_and_orders() {
        let xs = [-1.0f32, -0.5, -1e-30, -0.0, 0.0, 1e-30, 0.3, 1.0];
        for w in xs.windows(2) {
            assert!(order_key(w[0]) <= order_key(w[1]), "{w:?}");
        }
        for x in xs {
            assert_eq!(from_order_key(order_key(x)), x);
        }
    }

    #[test]
    fn cosine_at_least_is_tight() {
        for t in [
            -SCORE_ONE,
            -12345,
            0,
            1,
            7,
            999_999,
            SCORE_ONE / 3,
            SCORE_ONE - 1,
            SCORE_ONE,
        ] {
            let c = cosine_at_least(t);
            assert!(c.fixed() >= t, "{t}");
            let below = Threshold::cosine(from_order_key(order_key(c.as_cosine()) - 1));
            assert!(c.as_cosine() <= -1.0 || below.fixed() < t, "{t}");
        }
    }

    #[test]
    fn threshold_sits_just_above_the_allowed_impostors() {
        let s = Scores {
            genuine: vec![50, 60, 70, 80],
            impostor: (0..100).map(|i| i * 10).collect(),
        };
        // 10% of 100: at most 10 impostors at or above; the 11th highest is 890.
        let c = s.calibrate(0.1);
        assert!(c.threshold.fixed() > 890 && c.threshold.fixed() <= 900);
        assert!(c.fmr <= 0.1 && c.fmr >= 0.09, "{}", c.fmr);
        assert_eq!(c.fnmr, 1.0);
        assert!(c.sufficient);
        assert!(!s.calibrate(0.01).sufficient);
    }
}
