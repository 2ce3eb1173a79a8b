//! TOML run configs (teacher and DMD2) and checkpoint config.json, with their range checks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(c) = toml::from_str::<distill::train::teacher::TeacherConfig>(&s) {
        let _ = distill::train::checks::teacher(&c);
    }
    if let Ok(c) = toml::from_str::<distill::train::dmd2::Dmd2Config>(&s) {
        let _ = distill::train::checks::dmd2(&c);
    }
    if let Ok(m) = serde_json::from_str::<distill::checkpoint::CheckpointMeta>(&s) {
        let _ = distill::checks::model_config("fuzz", &m.model);
    }
});
