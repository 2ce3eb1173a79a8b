//! The NCCL engine for CUDA ranks (feature `nccl`: `cuda` + `mpi`; NCCL through cudarc, which candle
//! already uses): `mpirun -np N distill --device cuda train ...` puts rank r on `cuda:LOCAL_RANK`.
//! MPI is the control plane: it shares NCCL's unique id, and every collective starts with its
//! arrival round ([`super::mpi`]: a rank that died, hangs or stopped on an error is named there,
//! within the collective timeout); NCCL moves the bulk data (gradients, ZeRO-1 shards) between
//! the GPUs. The small host-side exchanges (metrics, hashes, rank 0's train state, stops) stay on
//! MPI. Gradient buckets are staged through host memory (the trainer's buckets are host buffers:
//! one copy to the GPU and one back per bucket), NCCL's ring does the inter-GPU transfer.

use super::mpi::Mpi;
use super::Collective;
use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// NCCL's communicator over the MPI world, one GPU per rank.
pub struct Nccl {
    control: Mpi,
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    timeout: Duration,
    version: String,
}

// SAFETY: the communicator and its stream are only used under `comm`'s mutex, one collective at
// a time (NCCL communicators may be used from any thread when calls do not overlap).
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

fn nccl_err(e: cudarc::nccl::result::NcclError, what: &str) -> anyhow::Error {
    anyhow::anyhow!("NCCL {what}: {e:?}")
}

impl Nccl {
    /// Sets up MPI, then NCCL on `cuda:ordinal` (the rank's local rank) with rank 0's unique id.
    pub fn init(timeout: Duration, ordinal: usize) -> Result<Self> {
        let control = Mpi::init(timeout)?;
        let ctx = CudaContext::new(ordinal).with_context(|| {
            format!(
                "rank {}: opening cuda:{ordinal} (its local rank) for NCCL",
                control.rank()
            )
        })?;
        let stream = ctx.default_stream();
        let mut id = [0u8; 128];
        if control.rank() == 0 {
            let fresh = Id::new().map_err(|e| nccl_err(e, "ncclGetUniqueId"))?;
            for (d, s) in id.iter_mut().zip(fresh.internal()) {
                *d = *s as u8;
            }
        }
        control.broadcast(&mut id, "NCCL's unique id")?;
        // Every rank is alive and has the id: ncclCommInitRank below waits for all of them.
        control.barrier("the NCCL communicator set-up")?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            control.rank(),
            control.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_err(e, "ncclCommInitRank"))?;
        let version = cudarc::nccl::result::get_nccl_version()
            .map(|v| format!("NCCL {}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
            .unwrap_or_else(|_| "NCCL".into());
        Ok(Self {
            control,
            comm: Mutex::new(comm),
            stream,
            ordinal,
            timeout,
            version,
        })
    }

    /// Waits for the work queued on the stream, at most the collective timeout. NCCL cannot say
    /// which rank is missing; every rank has just passed the MPI arrival round, so one that died
    /// or hangs now is named by the next round (on the ranks still alive).
    fn wait(&self, what: &str) -> Result<()> {
        let ev = self
            .stream
            .record_event(None)
            .context("recording a CUDA event")?;
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0u32;
        loop {
            if ev.try_is_complete().context("the NCCL stream")? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "collective timeout: NCCL's {what} did not complete within {:.1} s \
                     (--collective-timeout) although every rank reached it; rank {} stops (a rank \
                     died or hangs inside NCCL, or the GPUs cannot reach each other: try \
                     NCCL_DEBUG=INFO)",
                    self.timeout.as_secs_f64(),
                    self.control.rank()
                );
            }
            spins += 1;
            if spins < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// `buf` to the GPU, `op` over the ranks, the result back into a host vector of `out_len`.
    fn staged(
        &self,
        buf: &[f32],
        out_len: usize,
        what: &str,
        op: impl FnOnce(
            &Comm,
            &cudarc::driver::CudaSlice<f32>,
            &mut cudarc::driver::CudaSlice<f32>,
        ) -> std::result::Result<(), cudarc::nccl::result::NcclError>,
    ) -> Result<Vec<f32>> {
        // The arrival round: names a dead, hung or stopped rank before NCCL could block on it.
        self.control.barrier(what)?;
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let send = self
            .stream
            .clone_htod(buf)
            .with_context(|| format!("{what}: copying to cuda:{}", self.ordinal))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(out_len)
            .with_context(|| format!("{what}: allocating on cuda:{}", self.ordinal))?;
        op(&comm, &send, &mut recv).map_err(|e| nccl_err(e, what))?;
        self.wait(what)?;
        let mut out = vec![0f32; out_len];
        self.stream
            .memcpy_dtoh(&recv, &mut out[..])
            .with_context(|| format!("{what}: copying from cuda:{}", self.ordinal))?;
        self.stream.synchronize().context("the NCCL stream")?;
        Ok(out)
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.control.rank()
    }
    fn world_size(&self) -> usize {
        self.control.world_size()
    }
    fn engine(&self) -> String {
        format!(
            "{} on cuda:{} (control: {})",
            self.version,
            self.ordinal,
            self.control.engine()
        )
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32], what: &str) -> Result<()> {
        let out = self.staged(buf, buf.len(), what, |c, s, r| {
            c.all_reduce(s, r, &ReduceOp::Sum).map(|_| ())
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        self.control.all_reduce_sum_f64(buf, what)
    }
    fn broadcast(&self, buf: &mut [u8], what: &str) -> Result<()> {
        self.control.broadcast(buf, what)
    }
    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<u8>> {
        self.control.all_gather(mine, what)
    }
    fn all_gather_f32(&self, mine: &[f32], what: &str) -> Result<Vec<f32>> {
        let n = mine.len() * self.world_size();
        self.staged(mine, n, what, |c, s, r| c.all_gather(s, r).map(|_| ()))
    }
    fn gather_f32(&self, mine: &[f32], what: &str) -> Result<Option<Vec<f32>>> {
        // Checkpoint-time only (ZeRO-1's moments to rank 0): MPI's gather is enough.
        self.control.gather_f32(mine, what)
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], what: &str) -> Result<Vec<f32>> {
        let w = self.world_size();
        if send.len() % w != 0 {
            bail!(
                "{what}: reduce-scatter of {} values over {w} ranks (not a multiple)",
                send.len()
            );
        }
        self.staged(send, send.len() / w, what, |c, s, r| {
            c.reduce_scatter(s, r, &ReduceOp::Sum).map(|_| ())
        })
    }
    fn barrier(&self, what: &str) -> Result<()> {
        self.control.barrier(what)
    }
    fn stop(&self, why: &str) -> Result<()> {
        self.control.stop(why)
    }
    fn abort(&self, code: i32) {
        self.control.abort(code)
    }
    fn finish(&self) {
        self.control.finish()
    }
}
