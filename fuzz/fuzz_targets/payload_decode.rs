//! Decrypted subject payloads (consent + templates) from arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&d, rest)) = data.split_first() {
        let _ = bioseal::__fuzz::decode_payload(rest, usize::from(d % 64) + 1);
    }
});
