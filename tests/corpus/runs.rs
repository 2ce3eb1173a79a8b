//! Runs that must not lose anything: changed inputs on resume, kills, a full disk.

use super::*;

#[test]
fn resume_refuses_changed_inputs() {
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let o = run(&tiny_teacher(&run_dir, 2), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let ck = run_dir.join("checkpoint");
    let other = write_idx(&d.path().join("other"), &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let r = |name: &str, steps: u32, extra: &[&str], code: i32, needles: &[&str]| {
        let mut a = tiny_teacher(&run_dir, steps);
        a.extend(s(extra));
        Case::new(name, a, code, needles).keep(&ck)
    };
    // Stale temp files of killed writes are cleaned by the next write.
    let stale = ck.join(".model.safetensors.tmp999999");
    assert_cases(vec![
        r(
            "lower step target",
            1,
            &["--resume"],
            1,
            &["already at step 2", "--steps 2"],
        ),
        r(
            "other data",
            3,
            &["--resume", "--data", &p(&other)],
            1,
            &["trained on", "--allow-resume-change"],
        ),
        r(
            "other lr",
            3,
            &["--resume", "--lr", "0.01"],
            1,
            &["optim.lr", "--allow-resume-change"],
        ),
        r("existing run without --resume", 3, &[], 1, &["--resume"]),
    ]);
    std::fs::write(&stale, b"partial").unwrap();
    let o = run(
        &[
            tiny_teacher(&run_dir, 3),
            s(&["--resume", "--lr", "0.01", "--allow-resume-change"]),
        ]
        .concat(),
        &[],
    );
    assert!(o.status.success(), "explicit override: {}", text(&o));
    assert!(!stale.exists(), "stale temp file not cleaned");
    let state = ck.join("train_state.safetensors");
    let b = std::fs::read(&state).unwrap();
    std::fs::write(&state, &b[..b.len() / 2]).unwrap();
    assert_cases(vec![r(
        "truncated training state",
        4,
        &["--resume"],
        1,
        &["train_state.safetensors"],
    )]);
}

/// `kill -9` at random points of a run that checkpoints every step: whatever is on disk loads,
/// and `--resume` finishes the run.
#[test]
fn kills_during_checkpoint_writes_lose_nothing() {
    use rand::{Rng, SeedableRng};
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let ck = run_dir.join("checkpoint");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let steps = 40;
    let mut kills = 0;
    for attempt in 0..4 {
        let mut a = tiny_teacher(&run_dir, steps);
        if attempt > 0 && ck.join("train_state.safetensors").exists() {
            a.push("--resume".into());
        }
        let mut child = bin()
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(700..2500)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        if ck.join("config.json").exists() {
            let o = run(
                &s(&[
                    "sample",
                    &p(&ck),
                    "-o",
                    &p(&d.path().join("k.png")),
                    "--per-class",
                    "1",
                ]),
                &[],
            );
            assert!(o.status.success(), "after kill {attempt}: {}", text(&o));
        }
    }
    let mut a = tiny_teacher(&run_dir, steps);
    if ck.join("train_state.safetensors").exists() {
        a.push("--resume".into());
    }
    let o = run(&a, &[]);
    assert!(o.status.success(), "final resume: {}", text(&o));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], steps);
    assert!(
        lost(&Default::default(), std::slice::from_ref(&ck)).is_empty(),
        "temp files left"
    );
    eprintln!("{kills} kills");
}

/// A full disk: the write fails with a message, the previous checkpoint stays loadable.
#[test]
fn a_full_disk_keeps_the_last_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs", &p(&mnt)])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the full-disk case did not run"
        );
        return;
    }
    let run_dir = mnt.join("run");
    let res = std::panic::catch_unwind(|| {
        let o = run(&tiny_teacher(&run_dir, 1), &[]);
        assert!(o.status.success(), "{}", text(&o));
        let ck = run_dir.join("checkpoint");
        let before = snapshot(&ck);
        // Fill the disk.
        let _ = std::fs::write(mnt.join("filler"), vec![0u8; 3 << 20]);
        let o = run(&[tiny_teacher(&run_dir, 3), s(&["--resume"])].concat(), &[]);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains("disk full") || out.contains("No space"),
            "{out}"
        );
        let l = lost(&before, std::slice::from_ref(&ck));
        assert!(l.is_empty(), "{l:?}");
        std::fs::remove_file(mnt.join("filler")).unwrap();
        let o = run(
            &s(&[
                "sample",
                &p(&ck),
                "-o",
                &p(&d.path().join("x.png")),
                "--per-class",
                "1",
            ]),
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    if let Err(e) = res {
        std::panic::resume_unwind(e);
    }
}
