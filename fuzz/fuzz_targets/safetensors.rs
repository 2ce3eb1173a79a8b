//! safetensors bytes as the checkpoint loader parses them.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = distill::checkpoint::tensors_from_bytes(
        data,
        std::path::Path::new("model.safetensors"),
        &candle_core::Device::Cpu,
    );
});
