//! The checked-in `include/distill.h` is exactly what cbindgen makes from `src/lib.rs` with
//! `cbindgen.toml`. After changing the API: `DISTILL_BLESS=1 cargo test --release -p distill-capi
//! --test header` rewrites it.

#[test]
fn checked_in_header_matches_cbindgen() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_src(format!("{dir}/src/lib.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = format!("{dir}/include/distill.h");
    if std::env::var_os("DISTILL_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = String::from_utf8(generated).unwrap();
    assert!(
        checked_in == generated,
        "capi/include/distill.h is stale; regenerate it with DISTILL_BLESS=1 cargo test --release -p distill-capi --test header\n--- generated ---\n{generated}"
    );
    for f in [
        "distill_model_load",
        "distill_model_free",
        "distill_model_info",
        "distill_generate",
        "distill_generate_seeded",
        "distill_seeded_noise",
        "distill_last_error",
        "DISTILL_STATUS_BUFFER_TOO_SMALL",
        "typedef struct DistillModel DistillModel;",
    ] {
        assert!(generated.contains(f), "header lacks {f}");
    }
}
