//! Bucket key tables from arbitrary bytes: a typed error or a table whose
//! lookup agrees with a full decode, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut probe = [0u8; 32];
    if data.len() >= 41 {
        probe.copy_from_slice(&data[9..41]);
    }
    if let Err(e) = bioseal::__fuzz::decode_key_table(data, probe) {
        assert!(matches!(e, bioseal::Error::Tampered { .. }), "{e:?}");
    }
});
