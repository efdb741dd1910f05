//! Subject record envelopes from arbitrary bytes: a typed error or a value,
//! never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bioseal::__fuzz::decode_record(data);
});
