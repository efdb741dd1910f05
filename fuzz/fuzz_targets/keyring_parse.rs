//! Keyring images from arbitrary bytes. Half the inputs get a valid magic,
//! version and a small bucket count so that the fuzzer reaches the key check
//! and the slot parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    if buf.len() >= 16 && buf[0] & 1 == 1 {
        buf[..8].copy_from_slice(b"BIOSEALK");
        buf[8..12].copy_from_slice(&1u32.to_be_bytes());
        buf[12..16].copy_from_slice(&u32::from(data[1] % 4 + 1).to_be_bytes());
    }
    let _ = bioseal::__fuzz::parse_keyring(&buf, &bioseal::RootKey::from_bytes([7; 32]));
});
