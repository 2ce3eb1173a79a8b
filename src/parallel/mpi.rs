//! The MPI engine (OpenMPI through rsmpi): every collective is a non-blocking MPI call polled
//! against the collective timeout, preceded by an *arrival* round (each rank tells every other
//! one, point to point, which collective it has reached), so that a rank that died or hangs is
//! named in the error instead of leaving the others blocked. A rank that stops on an error takes
//! part in one more arrival round, marked *stopping* and preceded by its error message: the
//! others end that collective with [`PeerStopped`] instead of running it.

use super::{Collective, PeerStopped};
use ::mpi::collective::SystemOperation;
use ::mpi::datatype::Equivalence;
use ::mpi::environment::Universe;
use ::mpi::request::{scope, Request, Scope};
use ::mpi::topology::SimpleCommunicator;
use ::mpi::traits::*;
use ::mpi::Threading;
use anyhow::{bail, Context, Result};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The message tag of the arrival round.
const ARRIVAL_TAG: i32 = 0x0D15;
/// A stalled rank asks every other one whether it is alive (PING); a live one, polling in a
/// collective, answers (PONG).
const PING_TAG: i32 = 0x0D16;
const PONG_TAG: i32 = 0x0D17;
/// A stopping rank's error message, sent before its stopping arrival.
const STOP_TAG: i32 = 0x0D18;
/// The arrival message's second word: this rank runs the collective, or it stops.
const RUNS: u64 = 0;
const STOPS: u64 = 1;
/// The longest stop message sent (longer ones are cut: an eager send, delivered at once).
const STOP_MSG_MAX: usize = 2000;

/// Answers every pending ping (called while waiting in any collective).
fn serve_pings(world: &SimpleCommunicator) {
    while let Some(st) = world.any_process().immediate_probe_with_tag(PING_TAG) {
        let src = world.process_at_rank(st.source_rank());
        let mut b = [0u64; 1];
        src.receive_into_with_tag(&mut b[..], PING_TAG);
        src.send_with_tag(&b[..], PONG_TAG);
    }
}

/// Waits a little between two tests of a pending request (spins first: collectives of small
/// buffers complete in microseconds).
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 2000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

struct Inner {
    /// Dropped (MPI_Finalize) by [`Collective::finish`].
    universe: Option<Universe>,
    world: SimpleCommunicator,
    /// Collectives started so far (the arrival round's sequence number).
    op: u64,
}

/// MPI_COMM_WORLD of a job started by `mpirun`.
pub struct Mpi {
    inner: Mutex<Inner>,
    rank: usize,
    size: usize,
    timeout: Duration,
    version: String,
    /// A collective was abandoned (timeout): requests are left pending, so this rank can no
    /// longer stop cleanly ([`Collective::stop`] refuses: the caller aborts).
    broken: std::sync::atomic::AtomicBool,
}

// SAFETY: MPI is initialised with MPI_THREAD_SERIALIZED and every call goes through `inner`'s
// mutex, so no two threads call MPI at once.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

/// Polls `req` until it completes (true) or `deadline` passes (false: the request is abandoned
/// and its buffers must never be freed: the caller leaks them); answers pings meanwhile.
fn poll<'a, D: ?Sized, S: Scope<'a>>(
    world: &SimpleCommunicator,
    mut req: Request<'a, D, S>,
    deadline: Instant,
) -> bool {
    let mut spins = 0u32;
    loop {
        match req.test() {
            Ok(_) => return true,
            Err(r) => req = r,
        }
        if Instant::now() >= deadline {
            // SAFETY: unregistered from its scope; the caller leaks the buffers it points at.
            let _ = unsafe { req.into_raw() };
            return false;
        }
        serve_pings(world);
        backoff(&mut spins);
    }
}

impl Mpi {
    pub fn init(timeout: Duration) -> Result<Self> {
        let (universe, _threading) = ::mpi::initialize_with_threading(Threading::Serialized)
            .context("MPI_Init failed (was MPI already initialised?)")?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let version = ::mpi::environment::library_version()
            .ok()
            .and_then(|v| v.split(',').next().map(|s| s.trim().to_string()))
            .unwrap_or_else(|| "MPI".into());
        Ok(Self {
            inner: Mutex::new(Inner {
                universe: Some(universe),
                world,
                op: 0,
            }),
            rank,
            size,
            timeout,
            version,
            broken: Default::default(),
        })
    }

    fn timeout_s(&self) -> String {
        format!("{:.1} s", self.timeout.as_secs_f64())
    }

    /// The arrival round of the next collective: returns its sequence number once every rank
    /// has reached it, or names the ranks that did not within the timeout. `stopping`: this rank
    /// does not run the collective but stops with this message (every other rank gets it).
    /// Another rank stopping ends the round with [`PeerStopped`].
    fn arrive(&self, inner: &mut Inner, what: &str, stopping: Option<&str>) -> Result<u64> {
        if inner.universe.is_none() {
            bail!("{what}: MPI was already finalised");
        }
        inner.op += 1;
        let op = inner.op;
        let me = Box::new([op, if stopping.is_some() { STOPS } else { RUNS }]);
        let msg: Box<[u8]> = stopping
            .map(|m| {
                let mut end = m.len().min(STOP_MSG_MAX);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                m.as_bytes()[..end].to_vec()
            })
            .unwrap_or_default()
            .into_boxed_slice();
        let mut theirs = vec![u64::MAX; 2 * self.size].into_boxed_slice();
        let deadline = Instant::now() + self.timeout;
        let world = &inner.world;
        let rank = self.rank;
        let (missing, abandoned) = scope(|sc| {
            let mut recvs = Vec::new();
            for (p, slot) in theirs.chunks_mut(2).enumerate() {
                if p != rank {
                    let r = world
                        .process_at_rank(p as i32)
                        .immediate_receive_into_with_tag(sc, slot, ARRIVAL_TAG);
                    recvs.push((p, Some(r)));
                }
            }
            let (mut sends, mut msg_sends) = (Vec::new(), Vec::new());
            for p in (0..self.size).filter(|&p| p != rank) {
                let peer = world.process_at_rank(p as i32);
                if stopping.is_some() {
                    // The message first: a peer that sees the stopping arrival receives it.
                    msg_sends.push(Some(peer.immediate_send_with_tag(sc, &msg[..], STOP_TAG)));
                }
                sends.push(Some(peer.immediate_send_with_tag(sc, &me[..], ARRIVAL_TAG)));
            }
            let mut spins = 0u32;
            loop {
                for (_, slot) in recvs.iter_mut() {
                    if let Some(r) = slot.take() {
                        *slot = r.test().err();
                    }
                }
                for slot in sends.iter_mut() {
                    if let Some(r) = slot.take() {
                        *slot = r.test().err();
                    }
                }
                for slot in msg_sends.iter_mut() {
                    if let Some(r) = slot.take() {
                        *slot = r.test().err();
                    }
                }
                let pending = recvs.iter().any(|(_, r)| r.is_some())
                    || sends.iter().any(|r| r.is_some())
                    || msg_sends.iter().any(|r| r.is_some());
                if !pending {
                    return (Vec::new(), false);
                }
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = recvs
                        .iter()
                        .filter(|(_, r)| r.is_some())
                        .map(|(p, _)| *p)
                        .collect();
                    for r in recvs.into_iter().filter_map(|(_, r)| r) {
                        // SAFETY: the buffers are leaked below.
                        let _ = unsafe { r.into_raw() };
                    }
                    for r in sends.into_iter().flatten() {
                        // SAFETY: as above.
                        let _ = unsafe { r.into_raw() };
                    }
                    for r in msg_sends.into_iter().flatten() {
                        // SAFETY: as above.
                        let _ = unsafe { r.into_raw() };
                    }
                    return (missing, true);
                }
                serve_pings(world);
                backoff(&mut spins);
            }
        });
        if abandoned {
            self.broken
                .store(true, std::sync::atomic::Ordering::Relaxed);
            std::mem::forget(me);
            std::mem::forget(msg);
            std::mem::forget(theirs);
            if !missing.is_empty() {
                let names: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
                bail!(
                    "collective timeout: rank(s) {} of {} did not reach the {what} (collective #{op}) within {} (--collective-timeout); rank {rank} stops. The rank died or hangs (or is far slower: raise --collective-timeout)",
                    names.join(", "),
                    self.size,
                    self.timeout_s()
                );
            }
            bail!(
                "collective timeout: the arrival messages of the {what} (collective #{op}) were not delivered within {}; rank {rank} stops",
                self.timeout_s()
            );
        }
        let stopped: Vec<usize> = (0..self.size)
            .filter(|&p| p != rank && theirs[2 * p + 1] == STOPS)
            .collect();
        if stopping.is_some() {
            // This rank stops anyway; every other one has now seen it.
            return Ok(op);
        }
        if !stopped.is_empty() {
            let mut ranks = Vec::new();
            for p in stopped {
                ranks.push((p, self.stop_message(world, p, deadline)));
            }
            return Err(PeerStopped {
                ranks,
                world_size: self.size,
            }
            .into());
        }
        for p in (0..self.size).filter(|&p| p != rank) {
            let t = theirs[2 * p];
            if t != op {
                bail!(
                    "rank {p} is at collective #{t} while rank {rank} is at #{op} ({what}): the ranks run different sequences of collectives (different flags or configs?)"
                );
            }
        }
        Ok(op)
    }

    /// The error message rank `p` sent with its stopping arrival (already delivered: it was
    /// sent first and is short).
    fn stop_message(&self, world: &SimpleCommunicator, p: usize, deadline: Instant) -> String {
        let src = world.process_at_rank(p as i32);
        loop {
            if let Some(st) = src.immediate_probe_with_tag(STOP_TAG) {
                let n = st.count(u8::equivalent_datatype()) as usize;
                let mut buf = vec![0u8; n];
                src.receive_into_with_tag(&mut buf[..], STOP_TAG);
                return String::from_utf8_lossy(&buf).into_owned();
            }
            if Instant::now() >= deadline {
                return "(its error message did not arrive)".into();
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// The error of a collective that every rank reached but that did not complete: pings every
    /// other rank and names those that do not answer (a live rank answers while it polls).
    fn stalled(&self, world: &SimpleCommunicator, what: &str, op: u64) -> anyhow::Error {
        self.broken
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let grace = (self.timeout / 2).min(Duration::from_secs(2));
        let peers: Vec<usize> = (0..self.size).filter(|&p| p != self.rank).collect();
        for &p in &peers {
            // 8 bytes: sent eagerly, also to a rank that no longer receives.
            world
                .process_at_rank(p as i32)
                .send_with_tag(&[op][..], PING_TAG);
        }
        let mut answered = vec![false; self.size];
        answered[self.rank] = true;
        let until = Instant::now() + grace;
        while Instant::now() < until && answered.iter().any(|a| !a) {
            serve_pings(world);
            while let Some(st) = world.any_process().immediate_probe_with_tag(PONG_TAG) {
                let src = st.source_rank();
                let mut b = [0u64; 1];
                world
                    .process_at_rank(src)
                    .receive_into_with_tag(&mut b[..], PONG_TAG);
                answered[src as usize] = true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.size > 2 {
            // Other ranks stalled in the same collective may still ask this one.
            let linger = Instant::now() + grace;
            while Instant::now() < linger {
                serve_pings(world);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let silent: Vec<String> = peers
            .iter()
            .filter(|&&p| !answered[p])
            .map(|p| p.to_string())
            .collect();
        if silent.is_empty() {
            return anyhow::anyhow!(
                "collective timeout: the {what} (collective #{op}) did not complete within {} (--collective-timeout) although every rank reached it and answers; rank {} stops",
                self.timeout_s(),
                self.rank
            );
        }
        anyhow::anyhow!(
            "collective timeout: rank(s) {} of {} did not complete the {what} (collective #{op}) within {} (--collective-timeout) and do not answer; rank {} stops. The rank died or hangs (or is far slower: raise --collective-timeout)",
            silent.join(", "),
            self.size,
            self.timeout_s(),
            self.rank
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn all_reduce_sum<T: Equivalence + Copy + Default>(
        &self,
        buf: &mut [T],
        what: &str,
    ) -> Result<()> {
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        let send = buf.to_vec();
        let mut recv = vec![T::default(); buf.len()];
        let ok = scope(|sc| {
            let req = inner.world.immediate_all_reduce_into(
                sc,
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            );
            poll(&inner.world, req, deadline)
        });
        if !ok {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(self.stalled(&inner.world, what, op));
        }
        buf.copy_from_slice(&recv);
        Ok(())
    }

    fn all_gather_of<T: Equivalence + Copy + Default>(
        &self,
        mine: &[T],
        what: &str,
    ) -> Result<Vec<T>> {
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        let send = mine.to_vec();
        let mut recv = vec![T::default(); mine.len() * self.size];
        let ok = scope(|sc| {
            poll(
                &inner.world,
                inner
                    .world
                    .immediate_all_gather_into(sc, &send[..], &mut recv[..]),
                deadline,
            )
        });
        if !ok {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(self.stalled(&inner.world, what, op));
        }
        Ok(recv)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> String {
        format!("MPI ({})", self.version)
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32], what: &str) -> Result<()> {
        self.all_reduce_sum(buf, what)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64], what: &str) -> Result<()> {
        self.all_reduce_sum(buf, what)
    }
    fn broadcast(&self, buf: &mut [u8], what: &str) -> Result<()> {
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        let mut tmp = buf.to_vec();
        let ok = scope(|sc| {
            let root = inner.world.process_at_rank(0);
            poll(
                &inner.world,
                root.immediate_broadcast_into(sc, &mut tmp[..]),
                deadline,
            )
        });
        if !ok {
            std::mem::forget(tmp);
            return Err(self.stalled(&inner.world, what, op));
        }
        buf.copy_from_slice(&tmp);
        Ok(())
    }
    fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<u8>> {
        self.all_gather_of(mine, what)
    }
    fn all_gather_f32(&self, mine: &[f32], what: &str) -> Result<Vec<f32>> {
        self.all_gather_of(mine, what)
    }
    fn gather_f32(&self, mine: &[f32], what: &str) -> Result<Option<Vec<f32>>> {
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        let send = mine.to_vec();
        let root = inner.world.process_at_rank(0);
        if self.rank != 0 {
            let ok = scope(|sc| {
                poll(
                    &inner.world,
                    root.immediate_gather_into(sc, &send[..]),
                    deadline,
                )
            });
            if !ok {
                std::mem::forget(send);
                return Err(self.stalled(&inner.world, what, op));
            }
            return Ok(None);
        }
        let mut recv = vec![0f32; mine.len() * self.size];
        let ok = scope(|sc| {
            poll(
                &inner.world,
                root.immediate_gather_into_root(sc, &send[..], &mut recv[..]),
                deadline,
            )
        });
        if !ok {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(self.stalled(&inner.world, what, op));
        }
        Ok(Some(recv))
    }
    fn reduce_scatter_sum_f32(&self, send: &[f32], what: &str) -> Result<Vec<f32>> {
        if send.len() % self.size != 0 {
            bail!(
                "{what}: reduce-scatter of {} values over {} ranks (not a multiple)",
                send.len(),
                self.size
            );
        }
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        let send = send.to_vec();
        let mut recv = vec![0f32; send.len() / self.size];
        let ok = scope(|sc| {
            let req = inner.world.immediate_reduce_scatter_block_into(
                sc,
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            );
            poll(&inner.world, req, deadline)
        });
        if !ok {
            std::mem::forget(send);
            std::mem::forget(recv);
            return Err(self.stalled(&inner.world, what, op));
        }
        Ok(recv)
    }
    fn barrier(&self, what: &str) -> Result<()> {
        let mut inner = self.lock();
        let op = self.arrive(&mut inner, what, None)?;
        let deadline = Instant::now() + self.timeout;
        if !poll(&inner.world, inner.world.immediate_barrier(), deadline) {
            return Err(self.stalled(&inner.world, what, op));
        }
        Ok(())
    }
    fn stop(&self, why: &str) -> Result<()> {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("a collective of this rank timed out: it cannot stop in agreement");
        }
        let mut inner = self.lock();
        self.arrive(&mut inner, "stop", Some(why)).map(|_| ())
    }
    fn abort(&self, code: i32) {
        let inner = self.lock();
        if inner.universe.is_some() {
            inner.world.abort(code);
        }
    }
    fn finish(&self) {
        // MPI_Finalize (Universe's drop).
        drop(self.lock().universe.take());
    }
}
