//! An image folder whose one image is the input (decoded as PNG/JPEG by its name).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn root() -> &'static std::path::Path {
    static D: OnceLock<std::path::PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("distill-fuzz-folder-{}", std::process::id()));
        std::fs::create_dir_all(d.join("a")).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let name = if data.first().is_some_and(|b| b & 1 == 1) { "x.jpg" } else { "x.png" };
    let dir = root().join("a");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    std::fs::write(dir.join(name), data).unwrap();
    let _ = distill::data::load_folder(root(), Some(16));
    let _ = distill::data::load_folder(root(), None);
});
