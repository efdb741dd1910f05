//! Constant-time fixed-point matching. The similarity of two templates is an
//! integer dot product; the threshold test and the OR across a subject's
//! templates use `subtle`, so neither the duration nor the control flow
//! depends on template values, probe values or the outcome. The similarity
//! never leaves this module: callers get a [`Decision`] only.

use crate::embedding::{Template, SCALE_BITS};
use subtle::{Choice, ConstantTimeGreater};

/// The outcome of a verification. It carries nothing else: no score exists
/// outside the comparison.
///
/// ```compile_fail
/// # fn f(d: bioseal::Decision) {
/// let s = d.score();
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub enum Decision {
    /// The probe is of the enrolled person.
    Match,
    /// The probe is not of the enrolled person.
    NoMatch,
}

impl Decision {
    /// `true` for [`Decision::Match`].
    pub fn is_match(self) -> bool {
        self == Decision::Match
    }
}

/// Decision threshold, given as a cosine similarity in `[-1, 1]`.
///
/// It is converted once to the fixed-point scale of the templates
/// (`round(cos * 2^28)`); a probe matches a template when their integer dot
/// product is at least that value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    cosine: f32,
}

impl Threshold {
    /// A threshold of cosine similarity `cos`. Validated when the store opens.
    pub fn cosine(cos: f32) -> Self {
        Threshold { cosine: cos }
    }

    /// The cosine value.
    pub fn as_cosine(&self) -> f32 {
        self.cosine
    }

    /// A usable threshold: a finite cosine above 0 and at most 1 (at or
    /// below 0, a random face matches about half the time).
    pub(crate) fn is_valid(&self) -> bool {
        self.cosine.is_finite() && self.cosine > 0.0 && self.cosine <= 1.0
    }

    /// The threshold on the fixed-point dot-product scale (2^28 = cosine 1).
    pub(crate) fn fixed(&self) -> i64 {
        (f64::from(self.cosine) * f64::from(1u32 << (2 * SCALE_BITS))).round() as i64
    }
}

/// Integer dot product over every component, no early exit. With components
/// in `[-2^14, 2^14]` each product fits in i32 and the sum in i64.
#[inline(never)]
fn dot(a: &[i16], b: &[i16]) -> i64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i64::from(i32::from(x) * i32::from(y)))
        .sum()
}

/// Similarity of two templates on the fixed-point scale (2^28 = cosine 1),
/// for calibration on evaluation data; never applied to a stored template
/// outside `decide`.
pub(crate) fn score(a: &Template, b: &Template) -> i64 {
    dot(a.values(), b.values())
}

/// `a >= b` as a constant-time `Choice`: flipping the sign bit maps i64 order
/// onto u64 order, then `subtle` compares without branching.
fn ct_ge(a: i64, b: i64) -> Choice {
    let ua = (a as u64) ^ (1 << 63);
    let ub = (b as u64) ^ (1 << 63);
    !ub.ct_gt(&ua)
}

/// Compare `probe` against every template and OR the results, in constant
/// time. The caller guarantees equal lengths (checked when templates are
/// decoded and when the probe is quantised).
pub(crate) fn decide(templates: &[Template], probe: &Template, threshold: i64) -> Decision {
    let mut any = Choice::from(0u8);
    for t in templates {
        any |= ct_ge(dot(t.values(), probe.values()), threshold);
    }
    // The outcome is public from here on: it is what verify returns.
    if bool::from(any) {
        Decision::Match
    } else {
        Decision::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedding::Embedding;

    /// Small deterministic generator (splitmix64) for reproducible vectors.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn gauss(&mut self) -> f64 {
            let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
        fn unit(&mut self, d: usize) -> Vec<f32> {
            let v: Vec<f64> = (0..d).map(|_| self.gauss()).collect();
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / n) as f32).collect()
        }
    }

    fn cos_f32(a: &[f32], b: &[f32]) -> f32 {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        d / (na * nb)
    }

    #[test]
    fn ct_ge_matches_integer_order() {
        let vals = [i64::MIN, -5, -1, 0, 1, 5, 1 << 28, i64::MAX];
        for &a in &vals {
            for &b in &vals {
                assert_eq!(bool::from(ct_ge(a, b)), a >= b, "{a} >= {b}");
            }
        }
    }

    #[test]
    fn threshold_fixed_point() {
        assert_eq!(Threshold::cosine(1.0).fixed(), 1 << 28);
        assert_eq!(Threshold::cosine(-1.0).fixed(), -(1 << 28));
        assert_eq!(Threshold::cosine(0.5).fixed(), 1 << 27);
        assert!(!Threshold::cosine(f32::NAN).is_valid());
        assert!(!Threshold::cosine(1.01).is_valid());
        assert!(Threshold::cosine(0.36).is_valid());
    }

    #[test]
    fn or_across_templates() {
        let a = Template::from_raw(vec![16384, 0]);
        let b = Template::from_raw(vec![0, 16384]);
        let probe_b = Template::from_raw(vec![0, 16384]);
        let thr = Threshold::cosine(0.9).fixed();
        assert_eq!(decide(&[a], &probe_b, thr), Decision::NoMatch);
        let a = Template::from_raw(vec![16384, 0]);
        assert_eq!(decide(&[a, b], &probe_b, thr), Decision::Match);
        assert_eq!(decide(&[], &probe_b, thr), Decision::NoMatch);
    }

    /// Decisions agree with an f32 cosine reference except within a hair of
    /// the threshold. Pairs are drawn with cosines spread around it.
    #[test]
    fn agrees_with_f32_cosine_reference() {
        let mut rng = Rng(42);
        let dim = 512;
        let t = 0.36_f32;
        let thr = Threshold::cosine(t).fixed();
        let (mut disagree, mut max_gap, mut max_err) = (0, 0.0_f32, 0.0_f64);
        for i in 0..4000 {
            let a = rng.unit(dim);
            let n = rng.unit(dim);
            // b = c*a + s*n' (n' orthogonalised), c spread over [0.2, 0.5].
            let c = 0.2 + 0.3 * (i as f64 / 4000.0);
            let dotan: f64 = a
                .iter()
                .zip(&n)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let perp: Vec<f64> = n
                .iter()
                .zip(&a)
                .map(|(y, x)| f64::from(*y) - dotan * f64::from(*x))
                .collect();
            let pn = perp.iter().map(|x| x * x).sum::<f64>().sqrt();
            let s = (1.0 - c * c).sqrt();
            let b: Vec<f32> = a
                .iter()
                .zip(&perp)
                .map(|(x, p)| (c * f64::from(*x) + s * p / pn) as f32)
                .collect();
            let reference = cos_f32(&a, &b) >= t;
            let ta = Embedding::from_slice(&a).quantize(dim).expect("valid");
            let tb = Embedding::from_slice(&b).quantize(dim).expect("valid");
            let exact = f64::from(cos_f32(&a, &b));
            let quantised = dot(ta.values(), tb.values()) as f64 / f64::from(1u32 << 28);
            max_err = max_err.max((quantised - exact).abs());
            let fixed = decide(&[ta], &tb, thr).is_match();
            if fixed != reference {
                disagree += 1;
                max_gap = max_gap.max((cos_f32(&a, &b) - t).abs());
            }
        }
        eprintln!("max |quantised - f32 cosine| = {max_err:.2e}; {disagree} disagreements, max gap {max_gap:.2e}");
        assert!(max_err < 1e-4, "quantisation error {max_err}");
        // Anything further than 1e-4 from the threshold must agree.
        assert!(
            max_gap < 1e-4,
            "disagreement {max_gap} away from the threshold"
        );
        assert!(disagree <= 4, "{disagree} disagreements in 4000 pairs");
    }
}
