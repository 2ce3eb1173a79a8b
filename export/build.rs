//! Generates the ONNX protobuf types from ONNX's own schema (`proto/onnx.proto3`) with prost-build.
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh clone builds with no manual step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/onnx.proto3";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-changed=build.rs");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc);
    cfg.compile_protos(&[proto], &["proto"])?;
    Ok(())
}
