//! Data-parallel training under `mpirun` (the default `mpi` feature): 2 ranks x batch 16 give the
//! same per-step losses and the same final weights as 1 process x batch 32, within f32 round-off,
//! for the teacher, DMD2 and TDM; a rank killed mid-run ends the job with an error naming it, a
//! hung rank makes the other stop within `--collective-timeout` naming it, and the last checkpoint
//! resumes on 1 rank and on 2 on the uninterrupted curve; ranks that disagree on the config are
//! refused at start. With `--zero1` (the AdamW moments sharded over the ranks) 2 ranks still
//! train as 1 process does, hold half the moments each, and their checkpoint resumes on 1 rank;
//! a rank whose loss turns NaN stops every rank at the same step with an error naming it (an
//! agreed stop, not an abort), the last checkpoint intact.
//!
//! Needs OpenMPI's `mpirun` (Debian `openmpi-bin`, installed by scripts/setup.sh).

mod common;

use common::{p, s, text};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The runs share 2 cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_distill")
}

/// `mpirun` on PATH, or a failure naming the package that provides it.
fn mpirun() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("mpirun"))
        .find(|c| c.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mpirun not found on PATH: install the Debian package openmpi-bin (with \
                 libopenmpi-dev; scripts/setup.sh installs both) to run the data-parallel tests"
            )
        })
}

/// One process (no MPI), one CPU thread.
fn single(args: &[String]) -> Output {
    Command::new(bin())
        .env("DISTILL_THREADS", "1")
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run distill")
}

/// `mpirun -np N distill ARGS`, one CPU thread per rank.
fn mpi_command(np: usize, args: &[String]) -> Command {
    mpi_command_env(np, &[], args)
}

/// [`mpi_command`] with extra `NAME=VALUE` environment variables for every rank.
fn mpi_command_env(np: usize, env: &[&str], args: &[String]) -> Command {
    let mut c = Command::new(mpirun());
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string())
        .args(["-x", "DISTILL_THREADS=1"]);
    for e in env {
        c.args(["-x", e]);
    }
    c.args([bin(), "--quiet"])
        .args(args)
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

fn mpi(np: usize, args: &[String]) -> Output {
    mpi_command(np, args).output().expect("run mpirun")
}

fn ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\n{}", text(o));
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("distill-parallel")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// Per step, every `loss*` value of a run's metrics.jsonl.
fn losses(run: &Path) -> BTreeMap<u64, BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        let l: BTreeMap<String, f64> = v
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("loss"))
            .map(|(k, x)| (k.clone(), x.as_f64().unwrap()))
            .collect();
        out.insert(step, l);
    }
    out
}

/// Every f32 tensor of a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let f: Vec<f32> = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (k, f)
        })
        .collect()
}

/// Parameters with no gradient in exact arithmetic: an attention key's bias adds `q . b` to
/// every logit of a query alike, which the softmax removes. Their f32 "gradient" is round-off
/// noise, which AdamW (normalising by its own square root) turns into lr-sized steps of random
/// sign, so they differ between any two summation orders while the network's function does not.
fn gradient_free(name: &str) -> bool {
    name.ends_with("attn.k.bias")
}

/// The largest difference between two tensor sets, relative to the largest magnitude of each
/// tensor (so tiny entries do not dominate); [`gradient_free`] tensors are left out.
fn max_rel_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f64, String) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    let mut worst = (0.0, String::new());
    for (k, x) in a.iter().filter(|(k, _)| !gradient_free(k)) {
        let y = &b[k];
        let scale = x.iter().fold(1e-12f64, |m, v| m.max(v.abs() as f64));
        let d = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64))
            / scale;
        if d > worst.0 {
            worst = (d, k.clone());
        }
    }
    worst
}

/// Weights and optimiser state (training state: every network, both Adam moments).
fn state(run: &Path) -> BTreeMap<String, Vec<f32>> {
    tensors(&run.join("checkpoint/train_state.safetensors"))
}

/// Round-off tolerance (relative): 2 ranks sum two half-batch gradients where one process sums
/// the whole batch, so the f32 results differ in the last bits, and 20 Adam steps carry that on.
const TOL: f64 = 5e-4;

/// Checks a 2-rank run against a 1-process run of the same global batch: every step's losses and
/// the final training state within [`TOL`]; and that the comparison has power: the losses move
/// by far more than the tolerance from step to step (a rank training on its half alone, without
/// the gradient exchange, would leave the reference curve at step 2).
fn assert_same_run(one: &Path, two: &Path, what: &str) {
    let (l1, l2) = (losses(one), losses(two));
    assert_eq!(
        l1.keys().collect::<Vec<_>>(),
        l2.keys().collect::<Vec<_>>(),
        "{what}: logged steps differ"
    );
    assert!(l1.len() >= 20, "{what}: {} steps logged", l1.len());
    let mut moved = 0f64;
    let mut prev: Option<&BTreeMap<String, f64>> = None;
    for (step, a) in &l1 {
        let b = &l2[step];
        for (k, x) in a {
            let y = b[k];
            let rel = (x - y).abs() / x.abs().max(1e-6);
            assert!(
                rel < TOL,
                "{what}: step {step} {k}: 1 rank {x} vs 2 ranks {y} (rel {rel:.2e})"
            );
            if let Some(p) = prev.and_then(|p| p.get(k)) {
                moved = moved.max((x - p).abs() / x.abs().max(1e-6));
            }
        }
        prev = Some(a);
    }
    assert!(
        moved > 20.0 * TOL,
        "{what}: the losses hardly move ({moved:.2e}); the comparison would not notice a missing gradient exchange"
    );
    let (w, m) = state_diffs(&state(one), &state(two));
    assert!(
        w.0 < TOL,
        "{what}: final trained weights differ: {} rel {:.2e}",
        w.1,
        w.0
    );
    assert!(
        m.0 < MOMENT_TOL,
        "{what}: final AdamW moments differ: {} rel {:.2e}",
        m.1,
        m.0
    );
    let (d, k) = max_rel_diff(
        &tensors(&one.join("checkpoint/model.safetensors")),
        &tensors(&two.join("checkpoint/model.safetensors")),
    );
    assert!(
        d < TOL,
        "{what}: final model weights differ: {k} rel {d:.2e}"
    );
    eprintln!(
        "{what}: 1 vs 2 ranks over {} steps: losses within {TOL:.0e} (they move by up to {moved:.2e} a step); weights max rel {:.2e} ({}), moments {:.2e} ({}), checkpoint {d:.2e}",
        l1.len(), w.0, w.1, m.0, m.1
    );
}

/// Round-off tolerance of the AdamW moments (relative): they are running averages of the
/// gradients themselves, whose round-off is not damped by a learning rate the way the weights'
/// is (TDM's student has beta1 = 0: its first moment is the last gradient, through a per-sample
/// normaliser and a pseudo-Huber distance). Still 10x below a step's change of the loss.
const MOMENT_TOL: f64 = 5e-3;

/// The largest relative differences of the trained weights and of the AdamW moments
/// (`adam.*`) of two training states.
fn state_diffs(
    a: &BTreeMap<String, Vec<f32>>,
    b: &BTreeMap<String, Vec<f32>>,
) -> ((f64, String), (f64, String)) {
    let split = |s: &BTreeMap<String, Vec<f32>>, moments: bool| -> BTreeMap<String, Vec<f32>> {
        s.iter()
            .filter(|(k, _)| k.starts_with("adam.") == moments)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    (
        max_rel_diff(&split(a, false), &split(b, false)),
        max_rel_diff(&split(a, true), &split(b, true)),
    )
}

fn teacher_args(out: &Path, steps: u64, batch: usize) -> Vec<String> {
    s(&[
        "train",
        "teacher",
        "--preset",
        "tiny",
        "--resolution",
        "16",
        "--limit",
        "256",
        "--batch-size",
        &batch.to_string(),
        "--lr",
        "2e-3",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--checkpoint-every",
        "5",
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

/// A tiny teacher for the distillation runs (trained once, in one process).
fn teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        let d = tmp();
        let run = d.path().join("teacher");
        ok(&single(&teacher_args(&run, 20, 32)), "the tiny teacher");
        (d, run.join("checkpoint"))
    })
    .1
}

fn distill_args(method: &str, out: &Path) -> Vec<String> {
    let mut a = s(&[
        "train",
        method,
        "--teacher",
        &p(teacher()),
        "--batch-size",
        "32",
        "--train-steps",
        "20",
        "--lr",
        "1e-3",
        "--fake-lr",
        "1e-3",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--checkpoint-every",
        "20",
        "--sample-every",
        "0",
        "--out",
        &p(out),
    ]);
    if method == "dmd2" {
        a.extend(s(&["--limit", "256", "--dfake-gen-update-ratio", "2"]));
    }
    a
}

#[test]
fn two_ranks_train_the_teacher_as_one_process_does() {
    let _g = serial();
    let d = tmp();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    ok(&single(&teacher_args(&one, 20, 32)), "1 process");
    let o = mpi(2, &teacher_args(&two, 20, 32));
    ok(&o, "2 ranks");
    assert_same_run(&one, &two, "teacher");
}

#[test]
fn two_ranks_train_dmd2_as_one_process_does() {
    let _g = serial();
    teacher();
    let d = tmp();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    ok(&single(&distill_args("dmd2", &one)), "1 process");
    ok(&mpi(2, &distill_args("dmd2", &two)), "2 ranks");
    assert_same_run(&one, &two, "dmd2");
}

#[test]
fn two_ranks_train_tdm_as_one_process_does() {
    let _g = serial();
    teacher();
    let d = tmp();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    ok(&single(&distill_args("tdm", &one)), "1 process");
    ok(&mpi(2, &distill_args("tdm", &two)), "2 ranks");
    assert_same_run(&one, &two, "tdm");
}

/// The `optim_moments_mb` of a run's last metrics line (rank 0's optimiser moments).
fn moments_mb(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    last["optim_moments_mb"]
        .as_f64()
        .expect("optim_moments_mb logged")
}

/// Bytes of the AdamW moments in a training state (the full, unsharded moments).
fn state_moment_mb(run: &Path) -> f64 {
    state(run)
        .iter()
        .filter(|(k, _)| k.starts_with("adam."))
        .map(|(_, v)| 4.0 * v.len() as f64)
        .sum::<f64>()
        / 1e6
}

/// 2 ranks with `--zero1` hold half the moments each (within the padding of one shard) and
/// their checkpoint holds all of them.
fn assert_sharded(two: &Path, what: &str) {
    let (held, full) = (moments_mb(two), state_moment_mb(two));
    assert!(
        (held - full / 2.0).abs() < 1e-5 * full + 1e-5,
        "{what}: rank 0 holds {held} MB of moments, the checkpoint {full} MB"
    );
    eprintln!(
        "{what}: ZeRO-1 over 2 ranks: {held:.4} MB of moments on rank 0, {full:.4} MB in all"
    );
}

#[test]
fn two_ranks_with_zero1_train_the_teacher_as_one_process_does_and_resume_on_one_and_two() {
    let _g = serial();
    let d = tmp();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    ok(&single(&teacher_args(&one, 20, 32)), "1 process");
    let mut a = teacher_args(&two, 20, 32);
    a.push("--zero1".into());
    ok(&mpi(2, &a), "2 ranks with --zero1");
    assert_same_run(&one, &two, "teacher --zero1");
    assert_sharded(&two, "teacher");
    // Without ZeRO-1 a rank holds every moment.
    let plain = d.path().join("plain");
    ok(&mpi(2, &teacher_args(&plain, 2, 32)), "2 ranks");
    assert!((moments_mb(&plain) - state_moment_mb(&plain)).abs() < 1e-9);
    // The --zero1 checkpoint (full moments) resumes on 1 rank without it, on the curve of the
    // 1-process run resumed alike.
    let (reference, copy) = (d.path().join("reference"), d.path().join("resumed"));
    common::copy_dir(&one, &reference);
    let mut r = teacher_args(&reference, 25, 32);
    r.push("--resume".into());
    ok(&single(&r), "the 1-process run resumed");
    common::copy_dir(&two, &copy);
    resume_on(&copy, 1, &reference, 25);
    // And on 2 ranks with --zero1 again (the shards are cut from the full moments).
    let copy2 = d.path().join("resumed2");
    common::copy_dir(&two, &copy2);
    resume_with(&copy2, 2, &["--zero1"], &reference, 25);
}

#[test]
fn two_ranks_with_zero1_train_dmd2_and_tdm_as_one_process_does() {
    let _g = serial();
    teacher();
    for method in ["dmd2", "tdm"] {
        let d = tmp();
        let (one, two) = (d.path().join("one"), d.path().join("two"));
        ok(&single(&distill_args(method, &one)), "1 process");
        let mut a = distill_args(method, &two);
        a.push("--zero1".into());
        ok(&mpi(2, &a), "2 ranks with --zero1");
        assert_same_run(&one, &two, &format!("{method} --zero1"));
        assert_sharded(&two, method);
    }
}

#[test]
fn a_nan_on_one_rank_stops_every_rank_at_that_step_naming_it() {
    let _g = serial();
    let d = tmp();
    let run = d.path().join("nan");
    let mut a = teacher_args(&run, 40, 32);
    a.extend(s(&["--collective-timeout", "60"]));
    // Test-only: rank 1's loss of iteration 11 becomes NaN (the checkpoint of step 10 is proven
    // by iteration 10 and kept).
    let t0 = Instant::now();
    let o = mpi_command_env(2, &["DISTILL_TEST_NAN_AT=1:11"], &a)
        .output()
        .unwrap();
    let took = t0.elapsed();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("error (rank 1 of 2): loss is NaN at step 11 on rank 1 of 2: training diverged"),
        "rank 1 names itself:\n{t}"
    );
    assert!(
        t.contains("error (rank 0 of 2): teacher iteration 11 failed; the last good checkpoint (step 10) is kept")
            && t.contains("rank 1 of 2 stopped: loss is NaN at step 11 on rank 1 of 2"),
        "rank 0 stops at the same step naming rank 1:\n{t}"
    );
    // An agreed stop: no abort, no timeout.
    assert!(
        !t.contains("MPI_ABORT") && !t.contains("collective timeout"),
        "{t}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert_eq!(checkpoint_step(&run), 10);
    // The kept checkpoint is intact: it resumes on the uninterrupted curve.
    let reference = d.path().join("reference");
    ok(&single(&teacher_args(&reference, 15, 32)), "reference");
    resume_on(&run, 1, &reference, 15);
}

#[test]
fn a_nan_gradient_on_one_rank_stops_every_rank_naming_it_with_and_without_zero1() {
    let _g = serial();
    for zero1 in [false, true] {
        let d = tmp();
        let run = d.path().join("nan");
        let mut a = teacher_args(&run, 40, 32);
        a.extend(s(&["--collective-timeout", "60"]));
        if zero1 {
            a.push("--zero1".into());
        }
        // Test-only: rank 1's first gradient of iteration 11 becomes NaN; the average (or the
        // reduce-scatter) spreads it to every rank, which all refuse the update alike.
        let o = mpi_command_env(2, &["DISTILL_TEST_NAN_AT=1:11:grad"], &a)
            .output()
            .unwrap();
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        let why = "gradients of model are not finite (those of rank(s) 1 of 2) at update 11: refusing to update the weights";
        for r in 0..2 {
            assert!(
                t.lines().any(|l| l.starts_with(&format!(
                    "error (rank {r} of 2): teacher iteration 11 failed"
                )) && l.contains(why)),
                "zero1 {zero1}: rank {r} stops at iteration 11 naming rank 1:\n{t}"
            );
        }
        assert!(
            !t.contains("MPI_ABORT") && !t.contains("collective timeout"),
            "{t}"
        );
        assert_eq!(checkpoint_step(&run), 10, "zero1 {zero1}");
    }
}

#[test]
fn a_global_batch_not_divisible_by_the_ranks_and_disagreeing_ranks_are_refused() {
    let _g = serial();
    let d = tmp();
    let o = mpi(2, &teacher_args(&d.path().join("odd"), 2, 15));
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("--batch-size 15") && t.contains("world size 2"),
        "{t}"
    );
    assert!(!d.path().join("odd/checkpoint").exists());
    // Rank 1 gets another seed (through the environment each rank sees): refused at start.
    let script = d.path().join("seed.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} \"$@\" --seed $OMPI_COMM_WORLD_RANK\n",
            bin()
        ),
    )
    .unwrap();
    let _ = Command::new("chmod").arg("+x").arg(&script).status();
    let mut a = teacher_args(&d.path().join("seeds"), 2, 16);
    a.insert(0, "--quiet".into());
    let o = Command::new(mpirun())
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .args(["-x", "DISTILL_THREADS=1"])
        .arg(&script)
        .args(&a)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("rank(s) 1 of 2 differ from rank 0 in the configuration"),
        "{t}"
    );
    assert!(!d.path().join("seeds/checkpoint/config.json").exists());
}

/// The PID of rank `rank` among the children of `mpirun` (by its OMPI_COMM_WORLD_RANK).
fn rank_pid(mpirun_pid: u32, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // ppid is the second field after the parenthesised name.
        let after = &stat[stat.rfind(')')? + 2..];
        let ppid: u32 = after.split(' ').nth(1)?.parse().ok()?;
        if ppid != mpirun_pid {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts a long 2-rank teacher run, waits for its first checkpoint, then sends `signal` to
/// rank 1; returns mpirun's output and how long it took to end after the signal.
fn interrupt(run: &Path, signal: &str) -> (Output, Duration) {
    let mut a = teacher_args(run, 400, 32);
    a.extend(s(&["--collective-timeout", "5"]));
    let child = mpi_command(2, &a)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ckpt = run.join("checkpoint/config.json");
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(child.id(), 1).expect("rank 1's pid");
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let t1 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = t1.elapsed();
    // A stopped rank is killed by mpirun's abort; make sure nothing is left.
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    (out, took)
}

/// The steps of a finished checkpoint's training state.
fn checkpoint_step(run: &Path) -> u64 {
    let bytes = std::fs::read(run.join("checkpoint/train_state.safetensors")).unwrap();
    let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    h.metadata().as_ref().unwrap()["step"].parse().unwrap()
}

/// Resumes `run` (a copy) to `steps` on `np` ranks and checks the curve against the
/// uninterrupted 1-process reference.
fn resume_on(run: &Path, np: usize, reference: &Path, steps: u64) {
    resume_with(run, np, &[], reference, steps)
}

/// [`resume_on`] with extra flags (e.g. `--zero1`).
fn resume_with(run: &Path, np: usize, extra: &[&str], reference: &Path, steps: u64) {
    let mut a = teacher_args(run, steps, 32);
    a.push("--resume".into());
    a.extend(s(extra));
    let o = if np == 1 { single(&a) } else { mpi(np, &a) };
    ok(&o, &format!("resume on {np} rank(s)"));
    let (got, want) = (losses(run), losses(reference));
    for (step, l) in &want {
        let g = got
            .get(step)
            .unwrap_or_else(|| panic!("step {step} missing"));
        for (k, x) in l {
            let rel = (x - g[k]).abs() / x.abs().max(1e-6);
            assert!(
                rel < TOL,
                "resume on {np}: step {step} {k} {} vs uninterrupted {x}",
                g[k]
            );
        }
    }
    let (w, m) = state_diffs(&state(run), &state(reference));
    assert!(
        w.0 < TOL,
        "resume on {np}: final weights differ at {} ({:.2e})",
        w.1,
        w.0
    );
    assert!(
        m.0 < MOMENT_TOL,
        "resume on {np}: final moments differ at {} ({:.2e})",
        m.1,
        m.0
    );
}

#[test]
fn a_killed_rank_ends_the_run_and_its_checkpoint_resumes_on_one_and_two_ranks() {
    let _g = serial();
    let d = tmp();
    let run = d.path().join("killed");
    let (o, took) = interrupt(&run, "-KILL");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{t}");
    assert!(t.contains("rank 1"), "the error names rank 1:\n{t}");
    let at = checkpoint_step(&run);
    assert!(at > 0 && at % 5 == 0, "checkpoint at step {at}");
    // The checkpoint resumes on the uninterrupted curve, on 1 rank and on 2.
    let end = at + 5;
    let reference = d.path().join("reference");
    ok(&single(&teacher_args(&reference, end, 32)), "reference");
    for np in [1, 2] {
        let copy = d.path().join(format!("resume{np}"));
        common::copy_dir(&run, &copy);
        resume_on(&copy, np, &reference, end);
    }
}

#[test]
fn a_hung_rank_makes_the_other_stop_within_the_timeout_naming_it() {
    let _g = serial();
    let d = tmp();
    let run = d.path().join("hung");
    let (o, took) = interrupt(&run, "-STOP");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("rank(s) 1 of 2 did not"),
        "the error names the hung rank:\n{t}"
    );
    assert!(t.contains("--collective-timeout"), "{t}");
    assert!(
        took < Duration::from_secs(25),
        "stopped {took:?} after the hang (timeout 5 s):\n{t}"
    );
    assert!(checkpoint_step(&run) > 0);
}

/// CUDA ranks need the `nccl` build (NCCL between the GPUs): this CPU build refuses them by
/// name, before any training starts.
#[test]
fn cuda_ranks_without_the_nccl_build_are_refused_by_name() {
    let _g = serial();
    let d = tmp();
    let mut a = teacher_args(&d.path().join("gpu"), 2, 16);
    a.insert(0, "--device".into());
    a.insert(1, "cuda".into());
    let o = mpi(2, &a);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("`nccl` feature") && t.contains("--nccl"), "{t}");
    assert!(!d.path().join("gpu/checkpoint").exists());
}
