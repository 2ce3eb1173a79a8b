//! IDX images + labels: the first byte picks how the input splits into the two files.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let cut = (k as usize * rest.len()) / 255;
    let (img, lab) = rest.split_at(cut.min(rest.len()));
    let p = Path::new("fuzz-images-idx3-ubyte");
    if let Ok(d) = distill::data::mnist::from_idx_bytes(img, p, lab, p, "fuzz".into()) {
        let _ = d.to_resolution(16);
    }
});
