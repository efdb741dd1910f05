//! Embedding input: arbitrary f32 bit patterns (NaN payloads, infinities,
//! subnormals) at arbitrary lengths against a dimension.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&d, rest)) = data.split_first() {
        let v: Vec<f32> = rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let _ = bioseal::__fuzz::quantize(v, usize::from(d) + 1);
    }
});
