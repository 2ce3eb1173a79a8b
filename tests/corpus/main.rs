//! The bad-input corpus (issue #13): every case drives the built binary and asserts its exit
//! code, that its output names the problem, that no panic reached the user, and that nothing on
//! disk was lost (every file that existed before is byte-identical after, no temp files left).
//!
//! Not here: divergence during training keeping the last good checkpoint (the training runner
//! owns that; its tests live with it).

#[path = "../common/mod.rs"]
mod common;
// One test binary (each binary costs link time), split by area.
mod checkpoints;
mod configs;
mod data;
mod flags;
mod runs;

use common::*;
use std::path::Path;

/// The tiny teacher's flags with `extra` added; a flag given in `extra` replaces the base one.
pub(crate) fn teacher_flags(out: &Path, extra: &[&str]) -> Vec<String> {
    let base = tiny_teacher(out, 2);
    let given: Vec<&str> = extra
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap())
        // The deprecated name replaces the base's flag too.
        .map(|a| if a == "--steps" { "--train-steps" } else { a })
        .collect();
    let mut a = Vec::new();
    let mut i = 0;
    while i < base.len() {
        if given.contains(&base[i].as_str()) {
            i += 2;
            continue;
        }
        a.push(base[i].clone());
        i += 1;
    }
    a.extend(s(extra));
    a
}
