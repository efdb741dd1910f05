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

    /// Validate against `dim`, L2-normalise and quantise. Consumes the
    /// embedding, whose buffer is wiped on return.
    pub(crate) fn quantize(self, dim: usize) -> Result<Template, EmbeddingError> {
        let v = &self.values;
        if v.len() != dim {
            return Err(EmbeddingError::WrongDimension {
                expected: dim,
                got: v.len(),
            });
        }
        if !v.iter().all(|x| x.is_finite()) {
            return Err(EmbeddingError::NonFinite);
        }
        let norm = v
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        // is_finite also rejects a NaN norm, which finite inputs cannot produce.
        if !norm.is_finite() || norm < MIN_NORM {
            return Err(EmbeddingError::NearZero);
        }
        let q: Vec<i16> = v
            .iter()
            // |x| / norm <= 1, so the product is within +-2^14 and the cast is exact.
            .map(|&x| (f64::from(x) / norm * SCALE).round() as i16)
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

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Template {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde pre-sizes the Vec from the encoded length, so it is not
        // reallocated (which would leave an unwiped copy behind).
        Vec::<i16>::deserialize(d).map(|v| Template(Zeroizing::new(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
