//! **ZeRO-1** (stage 1 of ZeRO, Rajbhandari et al. 2020): the AdamW moments sharded over the
//! ranks, so that the optimiser state per rank falls as 1/N. A network's variables, in the
//! optimiser's order, are grouped into buckets of whole variables of at most
//! [`BUCKET_ELEMS`](crate::parallel::BUCKET_ELEMS) values (a bigger variable alone), as the
//! gradient all-reduce groups them; each bucket, flattened and padded to N equal blocks, is split
//! into N contiguous blocks, and rank r owns block r of every bucket: its **shard**. One update:
//! the gradients are reduce-scattered bucket by bucket (each rank gets the sum of its blocks, then
//! divides by N), the global gradient norm is the all-reduced sum of every shard's squares
//! (clipping and the fp16 overflow decision see every gradient), each rank steps its shard with
//! the same AdamW formula as an unsharded step, and the updated blocks are all-gathered bucket by
//! bucket into every rank's weights. Buckets bound the exchange's buffers to a bucket's size.
//!
//! The training state keeps its format: for a checkpoint the moments are gathered to rank 0
//! ([`Zero1::gather`], an MPI gather: the other ranks never hold more than their shard), so a
//! run resumes on any number of ranks, with or without ZeRO-1.

use super::optim::{update_tensor, AdamW, LossScaler, StepStats};
use crate::parallel::Collective;
use anyhow::Result;
use candle_core::{DType, Tensor};
use std::ops::Range;

/// Consecutive whole variables, exchanged together.
struct Bucket {
    vars: Range<usize>,
    /// Its first value in the flattened parameters.
    start: usize,
    /// Values per rank's block (the bucket padded to `world * block`).
    block: usize,
    /// This rank's block's position in its shard.
    at: usize,
}

/// The part of one variable inside this rank's shard.
struct Piece {
    /// The variable's index in the optimiser.
    var: usize,
    /// The first element of the variable (flattened) in the shard.
    start: usize,
    len: usize,
    /// Its position in the shard.
    at: usize,
}

/// One network's optimiser moments, sharded over the ranks.
pub struct Zero1 {
    rank: usize,
    world: usize,
    /// Values in this rank's shard (its blocks, padding included).
    shard: usize,
    /// Each variable's first element in the flattened parameters.
    offsets: Vec<usize>,
    buckets: Vec<Bucket>,
    pieces: Vec<Piece>,
    /// This rank's moments, one `[len]` f32 tensor per piece.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Zero1 {
    /// Takes `opt`'s full moments (the same on every rank: loaded or broadcast from rank 0) and
    /// keeps this rank's shard of them; `opt` holds none afterwards.
    pub fn new(opt: &mut AdamW, c: &dyn Collective) -> Result<Self> {
        Self::with_buckets(opt, c, crate::parallel::BUCKET_ELEMS)
    }

    /// [`Self::new`] with buckets of at most `cap` values.
    pub fn with_buckets(opt: &mut AdamW, c: &dyn Collective, cap: usize) -> Result<Self> {
        let (rank, world) = (c.rank(), c.world_size());
        let sizes: Vec<usize> = opt.vars.iter().map(|(_, v)| v.elem_count()).collect();
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for n in &sizes {
            offsets.push(total);
            total += n;
        }
        let mut buckets = Vec::new();
        let (mut first, mut shard) = (0, 0);
        while first < sizes.len() {
            let (mut end, mut len) = (first, 0);
            while end < sizes.len() && (end == first || len + sizes[end] <= cap) {
                len += sizes[end];
                end += 1;
            }
            let block = len.div_ceil(world).max(1);
            buckets.push(Bucket {
                vars: first..end,
                start: offsets[first],
                block,
                at: shard,
            });
            shard += block;
            first = end;
        }
        let (m_full, v_full) = opt.take_moments();
        let mut z = Self {
            rank,
            world,
            shard,
            offsets,
            buckets: Vec::new(),
            pieces: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        };
        for b in &buckets {
            let end = b
                .vars
                .end
                .checked_sub(1)
                .map_or(b.start, |l| z.offsets[l] + sizes[l]);
            let (lo, hi) = (
                (b.start + rank * b.block).min(end),
                (b.start + (rank + 1) * b.block).min(end),
            );
            for i in b.vars.clone() {
                let (a, e) = (z.offsets[i].max(lo), (z.offsets[i] + sizes[i]).min(hi));
                if a >= e {
                    continue;
                }
                let p = Piece {
                    var: i,
                    start: a - z.offsets[i],
                    len: e - a,
                    at: b.at + (a - lo),
                };
                let part = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.flatten_all()?
                        .narrow(0, p.start, p.len)?
                        .to_dtype(DType::F32)?
                        .copy()?)
                };
                z.m.push(part(&m_full[i])?);
                z.v.push(part(&v_full[i])?);
                z.pieces.push(p);
            }
        }
        z.buckets = buckets;
        Ok(z)
    }

    /// Bytes of the moments this rank holds.
    pub fn moment_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| 8 * p.len as u64).sum()
    }

    /// One update from this rank's (scaled, under fp16) gradients in variable order, on every
    /// rank alike: reduce-scatter and average, unscale, the global norm and overflow decision,
    /// the AdamW step of this shard, all-gather of the updated parameters. `None`: a skipped
    /// fp16 step (overflow somewhere).
    pub fn step(
        &mut self,
        c: &dyn Collective,
        opt: &mut AdamW,
        scaler: Option<&mut LossScaler>,
        grads: Vec<Option<Tensor>>,
        what: &str,
    ) -> Result<Option<StepStats>> {
        anyhow::ensure!(
            grads.len() == opt.vars.len(),
            "{} gradients for {} variables",
            grads.len(),
            opt.vars.len()
        );
        let t0 = std::time::Instant::now();
        let mut mine = vec![0f32; self.shard];
        let mut local_finite = true;
        let mut exchanged = 0u64;
        for b in &self.buckets {
            let mut send = vec![0f32; b.block * self.world];
            for i in b.vars.clone() {
                let Some(g) = &grads[i] else { continue };
                let vals = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                local_finite &= vals.iter().all(|x| x.is_finite());
                let a = self.offsets[i] - b.start;
                send[a..a + vals.len()].copy_from_slice(&vals);
            }
            let got = c.reduce_scatter_sum_f32(&send, &format!("gradients of {what}"))?;
            exchanged += 4 * send.len() as u64;
            mine[b.at..b.at + b.block].copy_from_slice(&got);
        }
        let mut seconds = t0.elapsed().as_secs_f64();
        // As the unsharded path: the average, then (fp16) the unscaled value, each in f32.
        let inv = 1.0 / self.world as f32;
        mine.iter_mut().for_each(|x| *x *= inv);
        if let Some(s) = &scaler {
            let inv = (1.0 / s.scale) as f32;
            mine.iter_mut().for_each(|x| *x *= inv);
        }
        // The global norm's square, and which ranks' own gradients were not finite.
        let mut red = vec![0f64; 1 + self.world];
        red[0] = mine.iter().map(|&x| (x as f64) * (x as f64)).sum();
        red[1 + self.rank] = if local_finite { 0.0 } else { 1.0 };
        c.all_reduce_sum_f64(&mut red, &format!("gradient norm of {what}"))?;
        let finite = red[0].is_finite();
        match scaler {
            Some(s) => {
                if !s.record(finite) {
                    return Ok(None);
                }
            }
            None if !finite => {
                let bad: Vec<usize> = (0..self.world).filter(|&r| red[1 + r] > 0.0).collect();
                return Err(crate::parallel::nonfinite_grads(
                    what, &bad, self.world, opt.t,
                ));
            }
            _ => {}
        }
        let norm = red[0].sqrt();
        let p = opt.begin_step(norm)?;
        let mut out = vec![0f32; self.shard];
        for (k, piece) in self.pieces.iter().enumerate() {
            if grads[piece.var].is_none() {
                continue;
            }
            let var = &opt.vars[piece.var].1;
            let dev = var.device();
            let w = var
                .as_tensor()
                .detach()
                .flatten_all()?
                .narrow(0, piece.start, piece.len)?
                .to_dtype(DType::F32)?
                .copy()?;
            let g = Tensor::from_slice(&mine[piece.at..piece.at + piece.len], piece.len, dev)?;
            let w = update_tensor(&w, &mut self.m[k], &mut self.v[k], &g, &p)?.unwrap_or(w);
            out[piece.at..piece.at + piece.len].copy_from_slice(&w.to_vec1::<f32>()?);
        }
        drop(mine);
        let t1 = std::time::Instant::now();
        for b in &self.buckets {
            let full = c.all_gather_f32(
                &out[b.at..b.at + b.block],
                &format!("updated parameters of {what}"),
            )?;
            exchanged += 4 * full.len() as u64;
            for i in b.vars.clone() {
                if grads[i].is_none() {
                    continue;
                }
                let var = &opt.vars[i].1;
                let (a, n) = (self.offsets[i] - b.start, var.elem_count());
                let t = Tensor::from_slice(&full[a..a + n], var.dims(), var.device())?
                    .to_dtype(var.dtype())?;
                var.set(&t)?;
            }
        }
        seconds += t1.elapsed().as_secs_f64();
        crate::parallel::record_exchange(exchanged, seconds);
        Ok(Some(StepStats {
            grad_norm: norm,
            lr: p.lr,
        }))
    }

    /// Gathers every rank's shard of the moments to rank 0 (every rank takes part) and gives
    /// rank 0's optimiser the full moments, for a checkpoint in the unsharded format; the other
    /// ranks never hold more than their shard. Undo with [`Self::release`].
    pub fn gather(&self, c: &dyn Collective, opt: &mut AdamW, what: &str) -> Result<()> {
        let mut full: [Vec<Tensor>; 2] = Default::default();
        for (slot, (kind, parts)) in full
            .iter_mut()
            .zip([("first", &self.m), ("second", &self.v)])
        {
            let mut mine = vec![0f32; self.shard];
            for (p, t) in self.pieces.iter().zip(parts) {
                mine[p.at..p.at + p.len].copy_from_slice(&t.to_vec1::<f32>()?);
            }
            for b in &self.buckets {
                let got = c.gather_f32(
                    &mine[b.at..b.at + b.block],
                    &format!("{kind} moments of {what}"),
                )?;
                // Rank 0: the bucket's values, in order (then the padding).
                let Some(got) = got else { continue };
                for i in b.vars.clone() {
                    let var = &opt.vars[i].1;
                    let a = self.offsets[i] - b.start;
                    slot.push(
                        Tensor::from_slice(
                            &got[a..a + var.elem_count()],
                            var.dims(),
                            var.device(),
                        )?
                        .to_dtype(var.dtype())?,
                    );
                }
            }
        }
        if self.rank != 0 {
            return Ok(());
        }
        let [m, v] = full;
        opt.set_moments(m, v)
    }

    /// Drops the full moments [`Self::gather`] gave rank 0 (once the checkpoint is serialised).
    pub fn release(&self, opt: &mut AdamW) {
        drop(opt.take_moments());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::SingleProcess;
    use crate::train::optim::AdamWConfig;
    use candle_core::{Device, Var};

    /// In a world of one, ZeRO-1's step is the unsharded step (same formula, one shard), and the
    /// gathered moments are the unsharded optimiser's, within round-off: the global norm (the
    /// clipping factor) is summed in another order.
    #[test]
    fn a_single_shard_steps_as_the_unsharded_optimiser() {
        let dev = Device::Cpu;
        let mk = || -> Vec<(String, Var)> {
            vec![
                (
                    "a".into(),
                    Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &dev).unwrap())
                        .unwrap(),
                ),
                (
                    "b".into(),
                    Var::from_tensor(&Tensor::new(&[3.0f32, -0.25, 0.0], &dev).unwrap()).unwrap(),
                ),
            ]
        };
        let cfg = AdamWConfig {
            warmup_steps: 0,
            grad_clip: 0.5,
            ..Default::default()
        };
        let (mut plain, mut sharded) = (
            AdamW::new(mk(), cfg.clone()).unwrap(),
            AdamW::new(mk(), cfg).unwrap(),
        );
        let c = SingleProcess;
        let mut z = Zero1::new(&mut sharded, &c).unwrap();
        assert!(!sharded.holds_moments());
        assert_eq!(z.moment_bytes(), 2 * 4 * 7);
        for k in 0..3 {
            let g = vec![
                Some(Tensor::new(&[[1.0f32, -2.0], [0.5, k as f32]], &dev).unwrap()),
                (k != 1).then(|| Tensor::new(&[0.3f32, 0.2, -4.0], &dev).unwrap()),
            ];
            let a = plain.step_grads(&g).unwrap();
            let b = z.step(&c, &mut sharded, None, g, "net").unwrap().unwrap();
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-6 * a.grad_norm);
            assert_eq!(a.lr, b.lr);
        }
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                    "{what}: {a:?} vs {b:?}"
                );
            }
        };
        for ((n, x), (_, y)) in plain.vars.iter().zip(&sharded.vars) {
            close(x.as_tensor(), y.as_tensor(), n);
        }
        z.gather(&c, &mut sharded, "net").unwrap();
        let (s1, s2) = (plain.state(), sharded.state());
        assert_eq!(s1.len(), 4);
        for (k, t) in &s1 {
            close(t, &s2[k], k);
        }
        z.release(&mut sharded);
        assert!(sharded.state().is_empty());
    }

    /// Two ranks as two threads exchanging through shared memory (the MPI engine itself is
    /// tested across processes in tests/parallel.rs).
    struct Threads {
        rank: usize,
        shared: std::sync::Arc<(std::sync::Barrier, std::sync::Mutex<Vec<Vec<f64>>>)>,
    }

    impl Threads {
        /// Every rank's values, in rank order.
        fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
            let (barrier, slots) = &*self.shared;
            slots.lock().unwrap()[self.rank] = mine;
            barrier.wait();
            let all = slots.lock().unwrap().clone();
            barrier.wait();
            all
        }
        fn exchange32(&self, mine: &[f32]) -> Vec<Vec<f32>> {
            self.exchange(mine.iter().map(|&x| x as f64).collect())
                .into_iter()
                .map(|v| v.into_iter().map(|x| x as f32).collect())
                .collect()
        }
    }

    impl Collective for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            2
        }
        fn engine(&self) -> String {
            "threads".into()
        }
        fn all_reduce_sum_f32(&self, _: &mut [f32], _: &str) -> Result<()> {
            unreachable!("ZeRO-1 does not all-reduce f32")
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64], _: &str) -> Result<()> {
            let all = self.exchange(buf.to_vec());
            for (i, x) in buf.iter_mut().enumerate() {
                *x = all[0][i] + all[1][i];
            }
            Ok(())
        }
        fn broadcast(&self, _: &mut [u8], _: &str) -> Result<()> {
            unreachable!()
        }
        fn all_gather(&self, _: &[u8], _: &str) -> Result<Vec<u8>> {
            unreachable!()
        }
        fn all_gather_f32(&self, mine: &[f32], _: &str) -> Result<Vec<f32>> {
            Ok(self.exchange32(mine).concat())
        }
        fn gather_f32(&self, mine: &[f32], _: &str) -> Result<Option<Vec<f32>>> {
            let all = self.exchange32(mine).concat();
            Ok((self.rank == 0).then_some(all))
        }
        fn reduce_scatter_sum_f32(&self, send: &[f32], _: &str) -> Result<Vec<f32>> {
            let all = self.exchange32(send);
            let n = send.len() / 2;
            let r = self.rank * n..(self.rank + 1) * n;
            Ok(all[0][r.clone()]
                .iter()
                .zip(&all[1][r])
                .map(|(a, b)| a + b)
                .collect())
        }
        fn barrier(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn stop(&self, _: &str) -> Result<()> {
            Ok(())
        }
        fn abort(&self, _: i32) {}
    }

    /// Two ranks with buckets of at most 6 values (variables of 4, 3 and 5 values: three
    /// buckets, two of them padded) step as one unsharded optimiser on the averaged gradients,
    /// and the moments gathered to rank 0 are that optimiser's.
    #[test]
    fn two_ranks_in_buckets_step_as_one_unsharded_optimiser() {
        let mk = || -> Vec<(String, Var)> {
            ["a", "b", "c"]
                .iter()
                .zip([4usize, 3, 5])
                .map(|(n, k)| {
                    let v: Vec<f32> = (0..k).map(|i| 0.3 * i as f32 - 0.5).collect();
                    (n.to_string(), Var::from_vec(v, k, &Device::Cpu).unwrap())
                })
                .collect()
        };
        let cfg = AdamWConfig {
            warmup_steps: 0,
            grad_clip: 0.7,
            ..Default::default()
        };
        // Rank r's gradients at step k (b has none at step 1).
        let grads = |r: usize, k: usize| -> Vec<Option<Tensor>> {
            [4usize, 3, 5]
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    let v: Vec<f32> = (0..n)
                        .map(|i| ((i + 3 * j + 5 * k + 7 * r) % 11) as f32 * 0.2 - 1.0)
                        .collect();
                    (j != 1 || k != 1).then(|| Tensor::from_vec(v, n, &Device::Cpu).unwrap())
                })
                .collect()
        };
        let mut plain = AdamW::new(mk(), cfg.clone()).unwrap();
        for k in 0..3 {
            let avg: Vec<Option<Tensor>> = grads(0, k)
                .into_iter()
                .zip(grads(1, k))
                .map(|(a, b)| a.zip(b).map(|(a, b)| ((a + b).unwrap() * 0.5).unwrap()))
                .collect();
            plain.step_grads(&avg).unwrap();
        }
        let shared = std::sync::Arc::new((
            std::sync::Barrier::new(2),
            std::sync::Mutex::new(vec![Vec::new(); 2]),
        ));
        let runs: Vec<_> = (0..2)
            .map(|rank| {
                let shared = shared.clone();
                let cfg = cfg.clone();
                std::thread::spawn(move || {
                    let c = Threads { rank, shared };
                    let mut opt = AdamW::new(mk(), cfg).unwrap();
                    let mut z = Zero1::with_buckets(&mut opt, &c, 6).unwrap();
                    assert_eq!(z.buckets.len(), 3);
                    for k in 0..3 {
                        z.step(&c, &mut opt, None, grads(rank, k), "net").unwrap();
                    }
                    let held = z.moment_bytes();
                    z.gather(&c, &mut opt, "net").unwrap();
                    let weights: Vec<Vec<f32>> = opt
                        .vars
                        .iter()
                        .map(|(_, v)| v.to_vec1::<f32>().unwrap())
                        .collect();
                    let state: Vec<(String, Vec<f32>)> = opt
                        .state()
                        .into_iter()
                        .map(|(k, t)| (k, t.to_vec1::<f32>().unwrap()))
                        .collect();
                    (held, weights, state)
                })
            })
            .collect();
        let out: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                    "{what}: {a:?} vs {b:?}"
                );
            }
        };
        // Blocks of 2, 2 and 3 values: rank 0 holds 2 + 2 + 3, rank 1 2 + 1 + 2 of the 12.
        assert_eq!((out[0].0, out[1].0), (8 * 7, 8 * 5));
        for (_, weights, _) in &out {
            for ((n, v), w) in plain.vars.iter().zip(weights) {
                close(&v.to_vec1::<f32>().unwrap(), w, n);
            }
        }
        let want = plain.state();
        assert_eq!(out[0].2.len(), want.len());
        for (k, got) in &out[0].2 {
            close(&want[k].to_vec1::<f32>().unwrap(), got, k);
        }
        assert!(out[1].2.is_empty(), "rank 1 never holds the full moments");
    }
}
