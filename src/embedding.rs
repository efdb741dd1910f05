//! Embedding input: validation, L2 normalisation and fixed-point
//! quantisation. Every buffer that holds template values is wiped on drop.

use crate::error::EmbeddingError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use zeroize::Zeroizing;

/// Largest dimension a store accepts.
pub const MAX_DIMENSION: usize = 4096;

/// Fixed-point scale: a unit vector's components become `round(x * 2^14)`,
/// stored as `i16` (the largest magnitude, 2^14, fits).
pub(crate) const SCALE_BITS: u32 = 14;
pub(crate) const SCALE: f64 = (1u32 << SCALE_BITS) as f64;

/// Smallest accepted L2 norm. Face-embedding models emit norms around 1
/// (normalised) or 10–30 (raw); anything below this is a degenerate vector.
pub(crate) const MIN_NORM: f64 = 1e-6;

/// A face embedding handed to [`crate::Store::enroll`] or
/// [`crate::Store::verify`].
///
/// It owns its values, has no `Clone`, no `Serialize`, no accessor for the
/// values, prints as `[REDACTED]`, and wipes its buffer when dropped. The
/// store consumes it.
///
/// ```
/// let e = bioseal::Embedding::new(vec![0.25_f32; 128]);
/// assert_eq!(e.dimension(), 128);
/// assert_eq!(format!("{e:?}"), "Embedding { dimension: 128, values: [REDACTED] }");
/// ```
///
/// The values cannot be read back:
///
/// ```compile_fail
/// let e = bioseal::Embedding::new(vec![0.25_f32; 128]);
/// let v: &[f32] = e.as_slice();
/// ```
///
/// nor copied:
///
/// ```compile_fail
/// let e = bioseal::Embedding::new(vec![0.25_f32; 128]);
/// let f = e.clone();
/// ```
///
/// nor serialised:
///
/// ```compile_fail
/// fn needs_serialize<T: serde::Serialize>(_: &T) {}
/// needs_serialize(&bioseal::Embedding::new(vec![0.25_f32; 128]));
/// ```
pub struct Embedding {
    values: Zeroizing<Vec<f32>>,
}

impl Embedding {
    /// Take ownership of `values`; they are wiped when the embedding is dropped.
    pub fn new(values: Vec<f32>) -> Self {
        Embedding {
            values: Zeroizing::new(values),
        }
    }

    /// Copy `values` into a new embedding. The caller's slice is not wiped;
    /// prefer [`Embedding::new`] where the caller can give up its buffer.
    pub fn from_slice(values: &[f32]) -> Self {
        Embedding::new(values.to_vec())
    }

    /// Number of components.
    pub fn dimension(&self) -> usize {
        self.values.len()
    }

    /// Check the embedding as `enroll` and `verify` will, without using it:
    /// the dimension `dim`, finite components, and a norm away from zero.
    /// Lets a caller refuse bad input before opening a store.
    pub fn check(&self, dim: usize) -> Result<(), EmbeddingError> {
        self.norm(dim).map(|_| ())
    }

    /// The L2 norm, after the checks of [`Embedding::check`].
    ///
    /// One pass: the square of a finite `f32` is finite in `f64`, and so is
    /// a sum of up to [`MAX_DIMENSION`] of them, so the sum is finite exactly
    /// when every component is. Eight independent accumulators let the
    /// loop vectorise (the order of additions moves the norm by an ulp at
    /// most, far below the quantisation step).
    fn norm(&self, dim: usize) -> Result<f64, EmbeddingError> {
        let v = &self.values;
        if v.len() != dim {
            return Err(EmbeddingError::WrongDimension {
                expected: dim,
                got: v.len(),
            });
        }
        let mut acc = [0f64; 8];
        let chunks = v.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += f64::from(x) * f64::from(x);
            }
        }
        for (a, &x) in acc.iter_mut().zip(tail) {
            *a += f64::from(x) * f64::from(x);
        }
        let sum: f64 = acc.iter().sum();
        if !sum.is_finite() {
            return Err(EmbeddingError::NonFinite);
        }
        let norm = sum.sqrt();
        if norm < MIN_NORM {
            return Err(EmbeddingError::NearZero);
        }
        Ok(norm)
    }

    /// Validate against `dim`, L2-normalise and quantise. Consumes the
    /// embedding, whose buffer is wiped on return.
    pub(crate) fn quantize(self, dim: usize) -> Result<Template, EmbeddingError> {
        let norm = self.norm(dim)?;
        let v = &self.values;
        // One division, then a multiply per component; rounding half away
        // from zero by hand (`f64::round` is a libm call on baseline x86-64).
        // |x| / norm <= 1, so y is within +-2^14 and the cast is exact.
        let inv = SCALE / norm;
        let q: Vec<i16> = v
            .iter()
            .map(|&x| round_to_i16(f64::from(x) * inv))
            .collect();
        Ok(Template(Zeroizing::new(q)))
    }
}

impl fmt::Debug for Embedding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Embedding")
            .field("dimension", &self.values.len())
            .field("values", &format_args!("[REDACTED]"))
            .finish()
    }
}

/// `y.round() as i16` for |y| <= 2^14, without the libm call: the cast
/// truncates, and the fractional part `y - t` is exact in f64 at this
/// magnitude (adding 0.5 instead is not: 0.49999999999999994 + 0.5 == 1.0).
#[inline]
fn round_to_i16(y: f64) -> i16 {
    // Through i32, which vectorises (a saturating cast to i16 does not);
    // |y| <= 2^14, so both casts are exact.
    let t = y as i32;
    let frac = y - f64::from(t);
    (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)) as i16
}

/// A quantised, L2-normalised template. Crate-private: it never leaves bioseal.
pub(crate) struct Template(Zeroizing<Vec<i16>>);

impl Template {
    pub(crate) fn values(&self) -> &[i16] {
        &self.0
    }

    pub(crate) fn values_mut(&mut self) -> &mut [i16] {
        &mut self.0
    }

    #[cfg(test)]
    pub(crate) fn from_raw(v: Vec<i16>) -> Self {
        Template(Zeroizing::new(v))
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Template([REDACTED])")
    }
}

/// Encoded as one byte string of little-endian `i16`s: bincode decodes a
/// sequence element by element, which was a visible share of `verify`.
impl Serialize for Template {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(self.0.len() * 2));
        for v in self.0.iter() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(TemplateVisitor)
    }
}

struct TemplateVisitor;

impl<'de> serde::de::Visitor<'de> for TemplateVisitor {
    type Value = Template;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string of little-endian i16 values")
    }

    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Template, E> {
        if !b.len().is_multiple_of(2) {
            return Err(E::invalid_length(b.len(), &self));
        }
        // Sized up front: no reallocation leaves an unwiped copy behind.
        let mut v = Vec::with_capacity(b.len() / 2);
        v.extend(b.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])));
        Ok(Template(Zeroizing::new(v)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, b: Vec<u8>) -> Result<Template, E> {
        let b = Zeroizing::new(b);
        self.visit_bytes(&b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_rounding_equals_f64_round() {
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut cases: Vec<f64> = (-64..=64).map(|k| f64::from(k) * 0.5).collect();
        cases.extend([16384.0, -16384.0, 16383.5, -16383.5, 0.49999999999999994]);
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            cases.push((s >> 11) as f64 / (1u64 << 53) as f64 * 32768.0 - 16384.0);
        }
        for y in cases {
            assert_eq!(round_to_i16(y), y.round() as i16, "{y}");
        }
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let q = |v: Vec<f32>| Embedding::new(v).quantize(4).map(|_| ());
        assert_eq!(
            q(vec![1.0; 3]),
            Err(EmbeddingError::WrongDimension {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            q(vec![1.0, f32::NAN, 0.0, 0.0]),
            Err(EmbeddingError::NonFinite)
        );
        assert_eq!(
            q(vec![1.0, f32::INFINITY, 0.0, 0.0]),
            Err(EmbeddingError::NonFinite)
        );
        assert_eq!(
            q(vec![f32::NEG_INFINITY, 0.0, 0.0, 0.0]),
            Err(EmbeddingError::NonFinite)
        );
        assert_eq!(q(vec![0.0; 4]), Err(EmbeddingError::NearZero));
        assert_eq!(q(vec![1e-9, 0.0, 0.0, 0.0]), Err(EmbeddingError::NearZero));
        assert_eq!(
            q(vec![f32::MAX; 4]),
            Ok(()),
            "huge but finite values normalise"
        );
        assert_eq!(q(vec![f32::MIN_POSITIVE; 4]), Err(EmbeddingError::NearZero));
    }

    #[test]
    fn one_pass_norm_finds_every_non_finite_position() {
        // 13 components: one full chunk of eight and a tail of five.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for i in 0..13 {
                let mut v = vec![0.5f32; 13];
                v[i] = bad;
                let r = Embedding::new(v).quantize(13).map(|_| ());
                assert_eq!(r, Err(EmbeddingError::NonFinite), "{bad} at {i}");
            }
        }
        // The largest finite values at the largest dimension stay finite.
        let r = Embedding::new(vec![f32::MAX; MAX_DIMENSION]).quantize(MAX_DIMENSION);
        assert!(r.is_ok());
    }

    #[test]
    fn quantises_unit_vector_to_scale() {
        let t = Embedding::new(vec![3.0, 4.0, 0.0, 0.0])
            .quantize(4)
            .expect("valid");
        assert_eq!(t.values(), &[9830, 13107, 0, 0]); // 0.6 and 0.8 of 2^14
        let t = Embedding::new(vec![-7.0, 0.0, 0.0, 0.0])
            .quantize(4)
            .expect("valid");
        assert_eq!(t.values(), &[-16384, 0, 0, 0]);
    }

    #[test]
    fn debug_never_shows_values() {
        let e = Embedding::new(vec![0.123_456_7; 3]);
        let s = format!("{e:?}");
        assert!(!s.contains("0.123"), "{s}");
        let t = e.quantize(3).expect("valid");
        assert_eq!(format!("{t:?}"), "Template([REDACTED])");
    }
}
