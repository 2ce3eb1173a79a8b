//! Helpers for the bad-input corpus: run the built binary, snapshot folders (nothing lost),
//! write small data files, and one tiny trained teacher + its export shared by every case.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
    c.env("DISTILL_THREADS", "2").arg("--quiet");
    c
}

pub fn run(args: &[String], env: &[(String, String)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run distill")
}

pub fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

pub fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

pub fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// Every file under `dir` with its sha256 (empty if `dir` does not exist).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.insert(path, format!("{:x}", sha2::Sha256::digest(&bytes)));
            }
        }
    }
    out
}

/// What a snapshot lost or changed since `before` (new files are allowed; temp files are not).
pub fn lost(before: &BTreeMap<PathBuf, String>, dirs: &[PathBuf]) -> Vec<String> {
    let mut after = BTreeMap::new();
    for d in dirs {
        after.extend(snapshot(d));
    }
    let mut bad: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| format!("{} lost or changed", k.display()))
        .collect();
    bad.extend(
        after
            .keys()
            .filter(|k| {
                let n = k.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with('.') && n.contains(".tmp")
            })
            .map(|k| format!("temp file {} left behind", k.display())),
    );
    bad
}

/// One bad invocation: the exit code it must give, text its output must contain (each needle,
/// case-insensitive), and folders whose existing files must survive byte-identical.
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub code: i32,
    pub needles: Vec<String>,
    pub keep: Vec<PathBuf>,
}

impl Case {
    pub fn new(name: &str, args: Vec<String>, code: i32, needles: &[&str]) -> Self {
        Self {
            name: name.into(),
            args,
            env: vec![],
            code,
            needles: needles.iter().map(|n| n.to_string()).collect(),
            keep: vec![],
        }
    }
    pub fn keep(mut self, dir: &Path) -> Self {
        self.keep.push(dir.to_path_buf());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// Runs every case; returns one line per failed expectation (empty = all good).
pub fn run_cases(cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let mut before = BTreeMap::new();
        for d in &c.keep {
            before.extend(snapshot(d));
        }
        let o = run(&c.args, &c.env);
        let out = text(&o);
        let code = o.status.code().unwrap_or(-1);
        let low = out.to_lowercase();
        eprintln!(
            "[{}] exit {code}: {}",
            c.name,
            out.lines().last().unwrap_or("")
        );
        if code != c.code {
            failures.push(format!(
                "[{}] exit {code}, expected {}:\n{out}",
                c.name, c.code
            ));
        }
        for n in &c.needles {
            if !low.contains(&n.to_lowercase()) {
                failures.push(format!("[{}] output lacks {n:?}:\n{out}", c.name));
            }
        }
        if let Some(line) = out.lines().find(|l| l.starts_with("error: ")) {
            // An error message must not repeat itself (a cause printed twice by the chain).
            let parts: Vec<&str> = line.split(": ").filter(|p| p.len() > 12).collect();
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = parts.iter().find(|p| !seen.insert(**p)) {
                failures.push(format!("[{}] doubled error text {dup:?}:\n{out}", c.name));
            }
        }
        // Internal texts that once leaked for zero sizes instead of a message naming the flag.
        for internal in ["non-finite range", "cat expects", "empty tensor for reduce"] {
            if low.contains(internal) {
                failures.push(format!(
                    "[{}] an internal error text {internal:?}:\n{out}",
                    c.name
                ));
            }
        }
        if low.contains("panicked") || low.contains("rust_backtrace") {
            failures.push(format!("[{}] a panic reached the user:\n{out}", c.name));
        }
        let l = lost(&before, &c.keep);
        if !l.is_empty() {
            failures.push(format!("[{}] {}", c.name, l.join("; ")));
        }
    }
    failures
}

pub fn assert_cases(cases: Vec<Case>) {
    let f = run_cases(&cases);
    assert!(
        f.is_empty(),
        "{} of {} cases failed:\n{}",
        f.len(),
        cases.len(),
        f.join("\n\n")
    );
}

/// The flags of a tiny teacher run (a few seconds per step count of 2).
pub fn tiny_teacher(out: &Path, steps: u32) -> Vec<String> {
    s(&[
        "train",
        "teacher",
        "--preset",
        "tiny",
        "--resolution",
        "16",
        "--limit",
        "64",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "1",
        "--sample-every",
        "0",
        "--sample-steps",
        "2",
        "--train-steps",
        &steps.to_string(),
        "--out",
        &p(out),
    ])
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    /// A 2-step tiny teacher run folder.
    pub run: PathBuf,
    pub ckpt: PathBuf,
    /// Its fp32 generator (Heun, 2 steps, CFG 2).
    pub onnx: PathBuf,
}

/// One tiny trained teacher and its export, shared by every case (read-only: cases copy it).
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let run_dir = root.join("teacher");
        // Heun with 4 steps: at 2 steps the sampler itself multiplies the network's round-off
        // at sigma_min by h/2 ~ 40, which an untrained network's large outputs push past 1e-4
        // (export/tests/sampler_parity.rs tests every step count on a realistically scaled one).
        let mut a = tiny_teacher(&run_dir, 2);
        let i = a.iter().position(|x| x == "--sample-steps").unwrap();
        a[i + 1] = "4".into();
        let o = run(&a, &[]);
        assert!(o.status.success(), "fixture teacher: {}", text(&o));
        let ckpt = run_dir.join("checkpoint");
        let export = root.join("export");
        let o = run(&s(&["export", &p(&ckpt), "-o", &p(&export)]), &[]);
        assert!(o.status.success(), "fixture export: {}", text(&o));
        Fixture {
            _dir: dir,
            root,
            run: run_dir,
            onnx: export.join("generator.onnx"),
            ckpt,
        }
    })
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// A fresh copy of the fixture checkpoint under `dir`.
pub fn ckpt_copy(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    copy_dir(&fixture().ckpt, &to);
    to
}

/// IDX files `x-images-idx3-ubyte` + `x-labels-idx1-ubyte` with `labels.len()` 8x8 images.
pub fn write_idx(dir: &Path, labels: &[u8]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let n = labels.len() as u32;
    let mut img = vec![0, 0, 8, 3];
    for v in [n, 8, 8] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    img.extend((0..n * 64).map(|i| (i * 37 % 256) as u8));
    let mut lab = vec![0, 0, 8, 1];
    lab.extend_from_slice(&n.to_be_bytes());
    lab.extend_from_slice(labels);
    std::fs::write(dir.join("x-images-idx3-ubyte"), img).unwrap();
    std::fs::write(dir.join("x-labels-idx1-ubyte"), lab).unwrap();
    dir.to_path_buf()
}

/// A PNG of `w` x `h` pixels with `channels` 1 (gray) or 3 (RGB).
pub fn write_png(path: &Path, w: u32, h: u32, channels: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut e = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    e.set_color(if channels == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    });
    e.set_depth(png::BitDepth::Eight);
    let mut wr = e.write_header().unwrap();
    let data: Vec<u8> = (0..w * h * channels as u32)
        .map(|i| (i * 7 % 256) as u8)
        .collect();
    wr.write_image_data(&data).unwrap();
}

/// Flips one bit of the byte at `offset` of `path`.
pub fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 1;
    std::fs::write(path, b).unwrap();
}

/// Offset of the first tensor byte of a safetensors file (after its 8-byte length + header).
pub fn safetensors_data_start(path: &Path) -> usize {
    let b = std::fs::read(path).unwrap();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
}
