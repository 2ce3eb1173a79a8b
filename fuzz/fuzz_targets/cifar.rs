//! One CIFAR-10 binary batch.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mut px, mut lab) = (Vec::new(), Vec::new());
    let _ = distill::data::cifar::parse_batch(
        data,
        std::path::Path::new("data_batch_1.bin"),
        &mut px,
        &mut lab,
    );
});
