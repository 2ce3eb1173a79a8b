//! ONNX protobuf: decoding, metadata, graph inputs/outputs and the declared-size check.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = export::proto::ModelProto::decode(data) {
        let _ = export::metadata(&m);
        let _ = export::OnnxMetadata::from_model(&m, "fuzz");
        let _ = export::runtime::io_specs(&m);
        let _ = export::runtime::guard::model_bytes(&m);
    }
});
