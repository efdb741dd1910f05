//! Arbitrary bytes fed to every decoder give a typed error or a value, never
//! a panic. (The fuzz targets in fuzz/ drive the same entry points.)

use bioseal::__fuzz;
use bioseal::{Error, RootKey};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct("tests/proptest-regressions/decoders.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn record_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        match __fuzz::decode_record(&bytes) {
            Ok(()) => prop_assert!(bytes.len() >= 97 && bytes[0] == 1),
            Err(e) => prop_assert!(matches!(e, Error::Tampered { .. }), "{:?}", e),
        }
    }

    #[test]
    fn payload_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600), dim in 1usize..64) {
        if let Err(e) = __fuzz::decode_payload(&bytes, dim) {
            prop_assert!(matches!(e, Error::Tampered { .. }), "{:?}", e);
        }
    }

    #[test]
    fn keyring_parser(mut bytes in proptest::collection::vec(any::<u8>(), 0..1200), magic in any::<bool>()) {
        if magic && bytes.len() >= 16 {
            bytes[..8].copy_from_slice(b"BIOSEALK");
            bytes[8..12].copy_from_slice(&1u32.to_be_bytes());
            bytes[12..16].copy_from_slice(&1u32.to_be_bytes());
        }
        let r = __fuzz::parse_keyring(&bytes, &RootKey::from_bytes([1; 32]));
        prop_assert!(matches!(r, Err(Error::Tampered { .. }) | Err(Error::WrongRootKey)), "{:?}", r);
    }

    #[test]
    fn embedding_input(v in proptest::collection::vec(any::<f32>(), 0..70), dim in 1usize..64) {
        match __fuzz::quantize(v.clone(), dim) {
            Ok(()) => prop_assert!(v.len() == dim && v.iter().all(|x| x.is_finite())),
            Err(e) => prop_assert!(matches!(e, Error::InvalidEmbedding(_)), "{:?}", e),
        }
    }
}

/// A payload sealed by a real store still decodes after proptest-style
/// mutation only through a typed path: covered by tests/tamper.rs. Here,
/// the empty and minimal inputs explicitly.
#[test]
fn empty_inputs() {
    assert!(__fuzz::decode_record(&[]).is_err());
    assert!(__fuzz::decode_payload(&[], 4).is_err());
    assert!(__fuzz::parse_keyring(&[], &RootKey::from_bytes([0; 32])).is_err());
    assert!(__fuzz::quantize(vec![], 4).is_err());
}
