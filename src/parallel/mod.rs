//! Data-parallel training: one process per device (a **rank**), talking through an established
//! collective library: MPI (OpenMPI through the `mpi` crate, feature `mpi`, on by default) for CPU
//! processes started by `mpirun`; a single process is the world of one rank at no cost.
//!
//! The [`Collective`] trait is what training needs (rank, world size, all-reduce sums of f32 /
//! f64 buffers, reduce-scatter, all-gather and gather of f32 for ZeRO-1, broadcast from rank 0,
//! all-gather, barrier, the agreed stop); [`world`] is the process's one instance, chosen by
//! [`init`] from the environment ([`launch_from`]: `mpirun`'s or torchrun's variables): under
//! `mpirun` (`OMPI_COMM_WORLD_SIZE`) MPI, otherwise [`SingleProcess`]. On top of it: gradient
//! averaging in buckets ([`average_grads`]), a rank's slice of the global batch ([`shard`]), byte
//! broadcasts and the equal-on-every-rank check ([`check_same`]).
//!
//! Every MPI collective waits at most the **collective timeout** (`--collective-timeout`): a rank
//! that died or hangs makes the others stop with an error naming it instead of hanging.
//!
//! A rank that stops on an error (a non-finite loss, a failed write) calls [`Collective::stop`]:
//! every other rank ends its next collective with [`PeerStopped`] (naming the rank and carrying
//! its error) and exits cleanly, so no rank is left waiting and none is killed mid-checkpoint.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The default collective timeout (`--collective-timeout`), seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// Gradients are all-reduced in buckets of at most this many f32 (25 MiB, PyTorch DDP's default
/// bucket size): few collectives per step, bounded extra memory.
pub const BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

/// The collective operations data-parallel training uses. `what` names the operation in errors
/// (e.g. "gradients of student").
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The engine, for messages: `single process` or `MPI (...)`.
    fn engine(&self) -> String;
    /// Element-wise sum over the ranks, in place (every rank gets the sum).
    fn all_reduce_sum_f32(&self, buf: &mut [f32], what: &str) -> Result<()>;
    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()>;
    /// Rank 0's `buf` into every rank's `buf` (all of the same length).
    fn broadcast(&self, buf: &mut [u8], what: &str) -> Result<()>;
    /// Every rank's `mine` (all of the same length), concatenated in rank order.
    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<u8>>;
    /// [`Self::all_gather`] of f32 values (ZeRO-1: every rank's updated parameter shard).
    fn all_gather_f32(&self, mine: &[f32], what: &str) -> Result<Vec<f32>>;
    /// Every rank's `mine` (all of the same length) concatenated in rank order, on rank 0 only
    /// (`None` on the others): ZeRO-1's moments for a checkpoint, never whole on other ranks.
    fn gather_f32(&self, mine: &[f32], what: &str) -> Result<Option<Vec<f32>>>;
    /// Element-wise sum over the ranks of `send` (world size x n values, the same length on
    /// every rank), of which this rank gets block `rank` (n values): ZeRO-1's gradient exchange.
    fn reduce_scatter_sum_f32(&self, send: &[f32], what: &str) -> Result<Vec<f32>>;
    fn barrier(&self, what: &str) -> Result<()>;
    /// This rank stops (after an error, `why`): tells every other rank, whose next collective then
    /// fails with [`PeerStopped`], and waits (up to the collective timeout) until every rank has
    /// reached that collective, so that none is left waiting and rank 0 is not killed while it
    /// writes a checkpoint. An error: some rank did not come (the caller then [`Self::abort`]s).
    fn stop(&self, why: &str) -> Result<()>;
    /// Ends every rank of the job (after an error on this one); returns only without peers.
    fn abort(&self, code: i32);
    /// Ends the engine cleanly at the end of a successful run (MPI_Finalize).
    fn finish(&self) {}
}

/// The world of one process: every collective is the identity, at no cost.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> String {
        "single process".into()
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [u8], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, mine: &[u8], _: &str) -> Result<Vec<u8>> {
        Ok(mine.to_vec())
    }
    fn all_gather_f32(&self, mine: &[f32], _: &str) -> Result<Vec<f32>> {
        Ok(mine.to_vec())
    }
    fn gather_f32(&self, mine: &[f32], _: &str) -> Result<Option<Vec<f32>>> {
        Ok(Some(mine.to_vec()))
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], _: &str) -> Result<Vec<f32>> {
        Ok(send.to_vec())
    }
    fn barrier(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn stop(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: i32) {}
}

/// The error of a collective that ended because other ranks stopped ([`Collective::stop`]):
/// names them and carries their errors. A rank that gets it stops too, without stopping others.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStopped {
    /// The ranks that stopped, with their errors.
    pub ranks: Vec<(usize, String)>,
    pub world_size: usize,
}

impl fmt::Display for PeerStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (r, why)) in self.ranks.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "rank {r} of {} stopped: {why}", self.world_size)?;
        }
        Ok(())
    }
}

impl std::error::Error for PeerStopped {}

/// True when `e` is (or was caused by) other ranks stopping: this rank then stops without
/// telling the others (they know).
pub fn is_peer_stop(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<PeerStopped>())
}

/// Which launcher started this process, from its environment ([`launch_from`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: a world of one.
    Single,
    /// OpenMPI's `mpirun` / `mpiexec` (`OMPI_COMM_WORLD_*`).
    Mpirun,
    /// torchrun or any launcher that sets `RANK`, `WORLD_SIZE` and `LOCAL_RANK`.
    Torchrun,
}

/// This process's place in the job as its launcher describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub by: Launcher,
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this host: `--device cuda` opens `cuda:LOCAL_RANK`.
    pub local_rank: usize,
}

/// Reads the launcher's variables from `vars` (the environment, as a map, so that it is testable):
/// `mpirun`'s `OMPI_COMM_WORLD_SIZE` / `_RANK` / `_LOCAL_RANK` first; torchrun's `WORLD_SIZE` /
/// `RANK` / `LOCAL_RANK` otherwise. Under `mpirun`, torchrun's variables, when set too, must agree
/// with MPI's (a job script that sets both for different jobs is refused).
pub fn launch_from(vars: &BTreeMap<String, String>) -> Result<Launch> {
    let num = |k: &str| -> Result<Option<usize>> {
        vars.get(k)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("environment variable {k}={v:?} is not a number"))
            })
            .transpose()
    };
    let launch = if let Some(world_size) = num("OMPI_COMM_WORLD_SIZE")? {
        let l = Launch {
            by: Launcher::Mpirun,
            rank: num("OMPI_COMM_WORLD_RANK")?
                .context("OMPI_COMM_WORLD_SIZE is set but OMPI_COMM_WORLD_RANK is not")?,
            world_size,
            local_rank: num("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
        };
        for (theirs, ours, v) in [
            ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", l.world_size),
            ("RANK", "OMPI_COMM_WORLD_RANK", l.rank),
            ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", l.local_rank),
        ] {
            if let Some(t) = num(theirs)? {
                if t != v {
                    bail!(
                        "started by mpirun with {ours}={v} but {theirs}={t} (torchrun's variable) \
                         is set too and disagrees: unset {theirs} or launch with one launcher"
                    );
                }
            }
        }
        l
    } else if let Some(world_size) = num("WORLD_SIZE")? {
        Launch {
            by: Launcher::Torchrun,
            rank: num("RANK")?.context("WORLD_SIZE is set but RANK is not (torchrun sets both)")?,
            world_size,
            local_rank: num("LOCAL_RANK")?.unwrap_or(0),
        }
    } else {
        return Ok(Launch {
            by: Launcher::Single,
            rank: 0,
            world_size: 1,
            local_rank: 0,
        });
    };
    if launch.world_size == 0 || launch.rank >= launch.world_size {
        bail!(
            "the launcher gives rank {} in a world of {}: the rank must be below the world size",
            launch.rank,
            launch.world_size
        );
    }
    Ok(launch)
}

static LAUNCH: OnceLock<Launch> = OnceLock::new();

/// How this process was launched (read from the environment once).
pub fn launch() -> Result<Launch> {
    if let Some(l) = LAUNCH.get() {
        return Ok(*l);
    }
    let vars: BTreeMap<String, String> = std::env::vars().collect();
    let l = launch_from(&vars)?;
    Ok(*LAUNCH.get_or_init(|| l))
}

/// The CUDA ordinal a bare `--device cuda` opens: the launcher's local rank (0 without one).
pub fn local_rank() -> usize {
    launch().map_or(0, |l| l.local_rank)
}

static WORLD: OnceLock<Box<dyn Collective>> = OnceLock::new();

/// True when this process was started by OpenMPI's `mpirun` / `mpiexec`.
pub fn launched_by_mpirun() -> bool {
    launch().is_ok_and(|l| l.by == Launcher::Mpirun)
}

/// Sets up the process's collective engine: MPI under `mpirun`, else a single process (torchrun's
/// variables with a world of more than one are refused: no engine for them is built).
/// `timeout`: the longest any collective waits for the other ranks. Idempotent (the first call
/// decides); [`world`] calls it with the default timeout when the program did not.
pub fn init(timeout: Duration) -> Result<&'static dyn Collective> {
    init_with(timeout, None)
}

/// [`init`] for a process that trains on `cuda:gpu` (`Some`): under `mpirun`, NCCL moves the
/// gradients between the ranks' GPUs and MPI does the rest ([`nccl`], feature `nccl`); a build
/// without it refuses a multi-rank CUDA run by name.
pub fn init_with(timeout: Duration, gpu: Option<usize>) -> Result<&'static dyn Collective> {
    if let Some(w) = WORLD.get() {
        return Ok(w.as_ref());
    }
    let l = launch()?;
    let c: Box<dyn Collective> = match l.by {
        Launcher::Mpirun => {
            let c = match gpu {
                Some(ordinal) if l.world_size > 1 => nccl_world(timeout, ordinal)?,
                _ => mpi_world(timeout)?,
            };
            if (c.rank(), c.world_size()) != (l.rank, l.world_size) {
                bail!(
                    "MPI gives rank {} of {} but the environment says rank {} of {}",
                    c.rank(),
                    c.world_size(),
                    l.rank,
                    l.world_size
                );
            }
            c
        }
        Launcher::Torchrun if l.world_size > 1 => bail!(
            "started by torchrun-style variables (WORLD_SIZE={}, RANK={}) but this distill's only \
             multi-process engine is MPI: launch the ranks with `mpirun -np {} distill train ...` \
             (NCCL through torchrun's variables is not built)",
            l.world_size,
            l.rank,
            l.world_size
        ),
        Launcher::Torchrun | Launcher::Single => Box::new(SingleProcess),
    };
    Ok(WORLD.get_or_init(|| c).as_ref())
}

#[cfg(feature = "mpi")]
fn mpi_world(timeout: Duration) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi::Mpi::init(timeout)?))
}

#[cfg(feature = "nccl")]
fn nccl_world(timeout: Duration, ordinal: usize) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl::Nccl::init(timeout, ordinal)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_world(_: Duration, ordinal: usize) -> Result<Box<dyn Collective>> {
    bail!(
        "started by mpirun with --device cuda (cuda:{ordinal} on this rank), but this distill was \
         built without the `nccl` feature that moves gradients between GPUs: build it with \
         `scripts/build-cuda.sh 90 --nccl` (cargo build --release --features nccl), or train the \
         ranks on the CPU"
    )
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(_: Duration) -> Result<Box<dyn Collective>> {
    bail!(
        "started by mpirun (OMPI_COMM_WORLD_SIZE is set) but this distill was built without the \
         `mpi` feature: rebuild with default features (needs the Debian packages libopenmpi-dev \
         and libclang-dev; scripts/setup.sh installs them)"
    )
}

/// The engine [`init`] set up, if it did.
pub fn current() -> Option<&'static dyn Collective> {
    WORLD.get().map(|w| w.as_ref())
}

/// The process's collective engine (set up by [`init`]; a single process unless under `mpirun`).
pub fn world() -> &'static dyn Collective {
    match init(Duration::from_secs_f64(DEFAULT_TIMEOUT_S)) {
        Ok(w) => w,
        Err(e) => panic!("setting up the collective engine: {e:#}"),
    }
}

/// True on rank 0 (the rank that writes checkpoints, metrics and sample grids).
pub fn is_rank0() -> bool {
    world().rank() == 0
}

/// This rank's slice of a global batch of `global` samples: `rank * n .. (rank + 1) * n` with
/// `n = global / world_size`; refused when `global` is not divisible by the world size.
pub fn shard(global: usize) -> Result<Range<usize>> {
    shard_of(global, world().rank(), world().world_size())
}

/// [`shard`] for an explicit rank and world size.
pub fn shard_of(global: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    if global % world != 0 {
        bail!(
            "--batch-size {global} (the global batch, over all ranks) is not divisible by the world size {world}: pass a multiple of {world}"
        );
    }
    let n = global / world;
    Ok(rank * n..(rank + 1) * n)
}

/// What the gradient all-reduces cost so far in this process (for `distill bench`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReduceStats {
    pub calls: u64,
    pub bytes: u64,
    pub seconds: f64,
}

static REDUCE_CALLS: AtomicU64 = AtomicU64::new(0);
static REDUCE_BYTES: AtomicU64 = AtomicU64::new(0);
static REDUCE_NANOS: AtomicU64 = AtomicU64::new(0);

/// Counts one gradient exchange (`bytes` of buffers exchanged, `seconds` spent) in
/// [`reduce_stats`]: [`average_grads`]'s all-reduces, or ZeRO-1's reduce-scatter + all-gather.
pub fn record_exchange(bytes: u64, seconds: f64) {
    REDUCE_CALLS.fetch_add(1, Ordering::Relaxed);
    REDUCE_BYTES.fetch_add(bytes, Ordering::Relaxed);
    REDUCE_NANOS.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
}

/// Totals of the gradient exchanges ([`record_exchange`]) since the process started.
pub fn reduce_stats() -> ReduceStats {
    ReduceStats {
        calls: REDUCE_CALLS.load(Ordering::Relaxed),
        bytes: REDUCE_BYTES.load(Ordering::Relaxed),
        seconds: REDUCE_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// Replaces every rank's gradients by their average over the ranks (sum / world size), in
/// buckets of at most [`BUCKET_ELEMS`] f32; a no-op in a world of one. `grads` are in the
/// optimiser's variable order (the same on every rank); `None` (no gradient) stays `None` and
/// must be `None` on every rank. Called after backward, before unscaling, clipping and the
/// optimiser step, so every rank steps with identical gradients (and the fp16 overflow decision
/// is the same everywhere: an inf on one rank is an inf in the sum). Returns the ranks whose own
/// gradients held an inf or NaN (one flag per rank rides in the last bucket), the same list on
/// every rank, so a divergence is reported naming them.
pub fn average_grads(grads: &mut [Option<Tensor>], what: &str) -> Result<Vec<usize>> {
    average_grads_with(world(), grads, what)
}

/// [`average_grads`] over an explicit engine.
pub fn average_grads_with(
    c: &dyn Collective,
    grads: &mut [Option<Tensor>],
    what: &str,
) -> Result<Vec<usize>> {
    let world = c.world_size();
    if world == 1 {
        return Ok(Vec::new());
    }
    let t0 = Instant::now();
    let inv = 1.0 / world as f32;
    let idx: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
    let mut bytes = 0u64;
    let mut start = 0;
    let mut finite = true;
    let mut bad = Vec::new();
    while start < idx.len() {
        // One bucket: consecutive gradients up to BUCKET_ELEMS (a bigger one goes alone).
        let mut end = start;
        let mut elems = 0;
        while end < idx.len() {
            let n = grads[idx[end]].as_ref().expect("some").elem_count();
            if end > start && elems + n > BUCKET_ELEMS {
                break;
            }
            elems += n;
            end += 1;
        }
        let last = end == idx.len();
        let mut buf = Vec::with_capacity(elems + if last { world } else { 0 });
        for &i in &idx[start..end] {
            let g = grads[i].as_ref().expect("some");
            buf.extend(
                g.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        finite &= buf.iter().all(|x| x.is_finite());
        if last {
            // Every rank's "my own gradients were not finite" flag, summed into place.
            buf.extend((0..world).map(|r| (r == c.rank() && !finite) as u8 as f32));
        }
        c.all_reduce_sum_f32(&mut buf, &format!("gradients of {what}"))?;
        bytes += 4 * elems as u64;
        if last {
            bad = (0..world).filter(|&r| buf[elems + r] > 0.0).collect();
        }
        let mut off = 0;
        for &i in &idx[start..end] {
            let g = grads[i].as_ref().expect("some");
            let n = g.elem_count();
            let avg: Vec<f32> = buf[off..off + n].iter().map(|x| x * inv).collect();
            let t = Tensor::from_vec(avg, g.dims(), g.device())?.to_dtype(g.dtype())?;
            grads[i] = Some(t);
            off += n;
        }
        start = end;
    }
    record_exchange(bytes, t0.elapsed().as_secs_f64());
    Ok(bad)
}

/// The error of an update whose averaged gradients are not finite (no fp16 loss scaler to skip
/// it): the same on every rank, naming the ranks whose own gradients were not (`bad`, from
/// [`average_grads`]).
pub fn nonfinite_grads(what: &str, bad: &[usize], world: usize, update: u64) -> anyhow::Error {
    let who = if bad.is_empty() {
        "no rank's alone: their sum overflowed".to_string()
    } else {
        let r: Vec<String> = bad.iter().map(|r| r.to_string()).collect();
        format!("those of rank(s) {} of {world}", r.join(", "))
    };
    anyhow::anyhow!(
        "gradients of {what} are not finite ({who}) at update {update}: refusing to update the weights"
    )
}

/// Averages metric values over the ranks (the values of equal-sized batch slices: the average
/// is the global batch's value). Every rank must pass the same keys in the same order.
pub fn average_values(values: &mut [f64], what: &str) -> Result<()> {
    let c = world();
    if c.world_size() == 1 {
        return Ok(());
    }
    c.all_reduce_sum_f64(values, what)?;
    let w = c.world_size() as f64;
    values.iter_mut().for_each(|v| *v /= w);
    Ok(())
}

/// Rank 0's bytes on every rank (any length: the length goes first). `mine` is only read on
/// rank 0.
pub fn broadcast_bytes(c: &dyn Collective, mine: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if c.world_size() == 1 {
        return Ok(mine);
    }
    let mut len = (mine.len() as u64).to_le_bytes();
    c.broadcast(&mut len, &format!("{what} (length)"))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut buf = if c.rank() == 0 { mine } else { vec![0u8; n] };
    // MPI counts are i32: broadcast in chunks of 1 GiB.
    for chunk in buf.chunks_mut(1 << 30) {
        c.broadcast(chunk, what)?;
    }
    Ok(buf)
}

/// Rank 0's outcome of a step only it performs (e.g. reading the resume state) on every rank:
/// `Ok(bytes)` or rank 0's error, which every other rank then reports as its own.
pub fn broadcast_result(c: &dyn Collective, mine: Result<Vec<u8>>, what: &str) -> Result<Vec<u8>> {
    if c.world_size() == 1 {
        return mine;
    }
    if c.rank() != 0 {
        let got = broadcast_bytes(c, Vec::new(), what)?;
        return match got.split_first() {
            Some((0, rest)) => Ok(rest.to_vec()),
            Some((_, msg)) => bail!("rank 0 stopped: {}", String::from_utf8_lossy(msg)),
            None => bail!("{what}: rank 0 sent nothing"),
        };
    }
    let (tag, body, err) = match mine {
        Ok(b) => (0u8, b, None),
        Err(e) => (1u8, format!("{e:#}").into_bytes(), Some(e)),
    };
    let mut msg = Vec::with_capacity(body.len() + 1);
    msg.push(tag);
    msg.extend_from_slice(&body);
    let back = broadcast_bytes(c, msg, what)?;
    match err {
        Some(e) => Err(e),
        None => Ok(back[1..].to_vec()),
    }
}

/// sha256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Refuses to go on unless every rank passed the same `digest` (e.g. of its config and teacher):
/// the error names the ranks that differ from rank 0 and `what` they disagree on.
pub fn check_same(c: &dyn Collective, digest: [u8; 32], what: &str) -> Result<()> {
    if c.world_size() == 1 {
        return Ok(());
    }
    let all = c
        .all_gather(&digest, &format!("the {what} check"))
        .context("comparing the ranks")?;
    let d: Vec<&[u8]> = all.chunks(32).collect();
    let bad: Vec<String> = (1..d.len())
        .filter(|&r| d[r] != d[0])
        .map(|r| r.to_string())
        .collect();
    if !bad.is_empty() {
        bail!(
            "rank(s) {} of {} differ from rank 0 in {what}: every rank must start the same run (same flags, config and teacher)",
            bad.join(", "),
            d.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shards_cover_the_global_batch_and_refuse_a_remainder() {
        assert_eq!(shard_of(32, 0, 2).unwrap(), 0..16);
        assert_eq!(shard_of(32, 1, 2).unwrap(), 16..32);
        assert_eq!(shard_of(7, 0, 1).unwrap(), 0..7);
        let e = shard_of(30, 0, 4).unwrap_err().to_string();
        assert!(e.contains("30") && e.contains("world size 4"), "{e}");
    }

    #[test]
    fn a_single_process_is_the_identity() {
        let c = SingleProcess;
        let g = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let mut grads = vec![Some(g.clone()), None];
        average_grads_with(&c, &mut grads, "x").unwrap();
        assert_eq!(
            grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
        assert!(grads[1].is_none());
        assert_eq!(broadcast_bytes(&c, vec![7, 8], "b").unwrap(), vec![7, 8]);
        check_same(&c, sha256(b"a"), "config").unwrap();
    }

    /// A fake two-rank world whose "other rank" holds fixed data: checks the bucketing and the
    /// averaging arithmetic (the MPI engine itself is tested across processes in tests/parallel.rs).
    struct Mirror {
        other: f32,
        calls: std::sync::Mutex<Vec<usize>>,
    }
    impl Collective for Mirror {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn engine(&self) -> String {
            "mirror".into()
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32], _: &str) -> Result<()> {
            self.calls.lock().unwrap().push(buf.len());
            buf.iter_mut().for_each(|x| *x += self.other);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _: &mut [f64], _: &str) -> Result<()> {
            unreachable!()
        }
        fn broadcast(&self, _: &mut [u8], _: &str) -> Result<()> {
            Ok(())
        }
        fn all_gather(&self, mine: &[u8], _: &str) -> Result<Vec<u8>> {
            let mut v = mine.to_vec();
            v.extend(vec![0u8; mine.len()]);
            Ok(v)
        }
        fn all_gather_f32(&self, mine: &[f32], _: &str) -> Result<Vec<f32>> {
            let mut v = mine.to_vec();
            v.extend(vec![self.other; mine.len()]);
            Ok(v)
        }
        fn gather_f32(&self, mine: &[f32], w: &str) -> Result<Option<Vec<f32>>> {
            self.all_gather_f32(mine, w).map(Some)
        }
        fn reduce_scatter_sum_f32(&self, send: &[f32], _: &str) -> Result<Vec<f32>> {
            let n = send.len() / 2;
            Ok(send[..n].iter().map(|x| x + self.other).collect())
        }
        fn barrier(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn stop(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn abort(&self, _: i32) {}
    }

    #[test]
    fn gradients_are_averaged_in_buckets() {
        let c = Mirror {
            other: 1.0,
            calls: Default::default(),
        };
        let dev = Device::Cpu;
        let big = Tensor::zeros(BUCKET_ELEMS - 2, candle_core::DType::F32, &dev).unwrap();
        let small = Tensor::new(&[[3f32, 5.]], &dev).unwrap();
        let mut grads = vec![Some(big), None, Some(small.clone()), Some(small)];
        average_grads_with(&c, &mut grads, "net").unwrap();
        // The big one and the first small one fill a bucket; the last small one starts the next,
        // with one not-finite flag per rank.
        assert_eq!(*c.calls.lock().unwrap(), vec![BUCKET_ELEMS, 2 + 2]);
        assert_eq!(
            grads[2].as_ref().unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2., 3.]]
        );
        assert_eq!(grads[2].as_ref().unwrap().dims(), &[1, 2]);
        assert!(grads[1].is_none());
        let e = check_same(&c, sha256(b"a"), "config and teacher")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank(s) 1 of 2"), "{e}");
    }

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_launch_is_read_from_mpiruns_or_torchruns_variables() {
        let single = launch_from(&vars(&[("PATH", "/bin")])).unwrap();
        assert_eq!(
            (single.by, single.rank, single.world_size),
            (Launcher::Single, 0, 1)
        );
        let mpi = launch_from(&vars(&[
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]))
        .unwrap();
        assert_eq!(
            mpi,
            Launch {
                by: Launcher::Mpirun,
                rank: 3,
                world_size: 4,
                local_rank: 1
            }
        );
        let torch = launch_from(&vars(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "5"),
            ("MASTER_ADDR", "10.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(
            torch,
            Launch {
                by: Launcher::Torchrun,
                rank: 5,
                world_size: 8,
                local_rank: 5
            }
        );
        // Both launchers' variables: they must agree.
        let both = vars(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
        ]);
        assert_eq!(launch_from(&both).unwrap().by, Launcher::Mpirun);
        let mut bad = both.clone();
        bad.insert("RANK".into(), "0".into());
        let e = launch_from(&bad).unwrap_err().to_string();
        assert!(
            e.contains("OMPI_COMM_WORLD_RANK=1") && e.contains("RANK=0"),
            "{e}"
        );
        let mut bad = both;
        bad.insert("LOCAL_RANK".into(), "0".into());
        assert!(launch_from(&bad)
            .unwrap_err()
            .to_string()
            .contains("LOCAL_RANK=0"));
    }

    #[test]
    fn a_broken_launch_environment_is_refused_by_name() {
        let e = launch_from(&vars(&[("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK is not"), "{e}");
        let e = launch_from(&vars(&[("WORLD_SIZE", "2"), ("RANK", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 in a world of 2"), "{e}");
        let e = launch_from(&vars(&[("WORLD_SIZE", "two"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
        // LOCAL_RANK defaults to 0 when a launcher does not set it.
        let l = launch_from(&vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap();
        assert_eq!(l.local_rank, 0);
    }

    #[test]
    fn a_peer_stop_is_recognised_through_context() {
        let e = anyhow::Error::new(PeerStopped {
            ranks: vec![(1, "loss is NaN".into())],
            world_size: 2,
        })
        .context("teacher iteration 3 failed");
        assert!(is_peer_stop(&e));
        assert!(format!("{e:#}").contains("rank 1 of 2 stopped: loss is NaN"));
        assert!(!is_peer_stop(&anyhow::anyhow!("disk full")));
    }
}
