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
            Ok(()) => prop_assert!(bytes.len() >= 29 && bytes[0] == 2),
            Err(e) => prop_assert!(matches!(e, Error::Tampered { .. }), "{:?}", e),
        }
    }

    /// Key tables: a typed error or a table whose binary-search lookup
    /// agrees with a full decode. Sorted well-formed tables are generated
    /// too (`shaped`), since random bytes almost never are.
    #[test]
    fn key_table_decoder(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..800),
        shaped in any::<bool>(),
        probe_from in any::<prop::sample::Index>(),
    ) {
        if shaped {
            let n = bytes.len().saturating_sub(9) / 92;
            bytes.truncate(9 + n * 92);
            if bytes.len() >= 9 {
                bytes[0] = 1;
                let mut ps: Vec<[u8; 32]> = (0..n).map(|i| {
                    let mut p = [0u8; 32];
                    p.copy_from_slice(&bytes[9 + i * 92..9 + i * 92 + 32]);
                    p
                }).collect();
                ps.sort();
                for (i, p) in ps.iter().enumerate() {
                    bytes[9 + i * 92..9 + i * 92 + 32].copy_from_slice(p);
                }
            }
        }
        let mut probe = [0u8; 32];
        if bytes.len() >= 9 + 92 {
            let i = probe_from.index((bytes.len() - 9) / 92);
            probe.copy_from_slice(&bytes[9 + i * 92..9 + i * 92 + 32]);
        }
        match __fuzz::decode_key_table(&bytes, probe) {
            Ok(n) => prop_assert!(bytes.len() == 9 + n * 92 && bytes[0] == 1),
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
    fn keyring_parser(mut bytes in proptest::collection::vec(any::<u8>(), 0..2400), magic in any::<bool>()) {
        if magic && bytes.len() >= 16 {
            bytes[..8].copy_from_slice(b"BIOSEALK");
            bytes[8..12].copy_from_slice(&3u32.to_be_bytes());
            bytes[12..16].copy_from_slice(&1u32.to_be_bytes());
        }
        let r = __fuzz::parse_keyring(&bytes, &RootKey::from_bytes([1; 32]));
        prop_assert!(
            matches!(r, Err(Error::Tampered { .. } | Error::WrongRootKey | Error::LegacyLayout(_))),
            "{:?}",
            r
        );
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
