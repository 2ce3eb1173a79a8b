//! **ZeRO-1** (stage 1 of ZeRO, Rajbhandari et al. 2020): the AdamW moments sharded over the
//! ranks, so that the optimiser state per rank falls as 1/N. The parameters of a network,
//! flattened in the optimiser's variable order and padded to N equal blocks, are split into N
//! contiguous shards; rank r owns shard r's moments. One update: the gradients are
//! reduce-scattered (each rank gets the sum of its shard, then divides by N), the global gradient
//! norm is the all-reduced sum of every shard's squares (clipping and the fp16 overflow decision
//! see every gradient), each rank steps its shard with the same AdamW formula as an unsharded
//! step, and the updated shards are all-gathered into every rank's weights.
//!
//! The training state keeps its format: for a checkpoint the moments are gathered to rank 0
//! ([`Zero1::gather`], an MPI gather: the other ranks never hold more than their shard), so a
//! run resumes on any number of ranks, with or without ZeRO-1.

use super::optim::{update_tensor, AdamW, LossScaler, StepStats};
use crate::parallel::Collective;
use anyhow::Result;
use candle_core::{DType, Tensor};

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
    /// Elements per shard: the flattened parameters padded to `world * shard`.
    shard: usize,
    /// Each variable's first element in the flattened parameters.
    offsets: Vec<usize>,
    pieces: Vec<Piece>,
    /// This rank's moments, one `[len]` f32 tensor per piece.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl Zero1 {
    /// Takes `opt`'s full moments (the same on every rank: loaded or broadcast from rank 0) and
    /// keeps this rank's shard of them; `opt` holds none afterwards.
    pub fn new(opt: &mut AdamW, c: &dyn Collective) -> Result<Self> {
        let (rank, world) = (c.rank(), c.world_size());
        let mut offsets = Vec::with_capacity(opt.vars.len());
        let mut total = 0;
        for (_, v) in &opt.vars {
            offsets.push(total);
            total += v.elem_count();
        }
        let shard = total.div_ceil(world).max(1);
        let (lo, hi) = (rank * shard, ((rank + 1) * shard).min(total));
        let (m_full, v_full) = opt.take_moments();
        let mut z = Self {
            rank,
            world,
            shard,
            offsets: offsets.clone(),
            pieces: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        };
        for (i, (_, var)) in opt.vars.iter().enumerate() {
            let (a, b) = (offsets[i].max(lo), (offsets[i] + var.elem_count()).min(hi));
            if a >= b {
                continue;
            }
            let p = Piece {
                var: i,
                start: a - offsets[i],
                len: b - a,
                at: a - lo,
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
        let mut flat = vec![0f32; self.shard * self.world];
        let mut local_finite = true;
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let vals = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            local_finite &= vals.iter().all(|x| x.is_finite());
            flat[self.offsets[i]..self.offsets[i] + vals.len()].copy_from_slice(&vals);
        }
        let mut mine = c.reduce_scatter_sum_f32(&flat, &format!("gradients of {what}"))?;
        let mut exchanged = 4 * flat.len() as u64;
        drop(flat);
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
        let t1 = std::time::Instant::now();
        let full = c.all_gather_f32(&out, &format!("updated parameters of {what}"))?;
        exchanged += 4 * full.len() as u64;
        seconds += t1.elapsed().as_secs_f64();
        crate::parallel::record_exchange(exchanged, seconds);
        for (i, (_, var)) in opt.vars.iter().enumerate() {
            if grads[i].is_none() {
                continue;
            }
            let (a, n) = (self.offsets[i], var.elem_count());
            let t = Tensor::from_slice(&full[a..a + n], var.dims(), var.device())?
                .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(Some(StepStats {
            grad_norm: norm,
            lr: p.lr,
        }))
    }

    /// Gathers every rank's shard of the moments to rank 0 (every rank takes part) and gives
    /// rank 0's optimiser the full moments, for a checkpoint in the unsharded format; the other
    /// ranks never hold more than their shard. Undo with [`Self::release`].
    pub fn gather(&self, c: &dyn Collective, opt: &mut AdamW, what: &str) -> Result<()> {
        let mut full = Vec::with_capacity(2);
        for (kind, parts) in [("first", &self.m), ("second", &self.v)] {
            let mut mine = vec![0f32; self.shard];
            for (p, t) in self.pieces.iter().zip(parts) {
                mine[p.at..p.at + p.len].copy_from_slice(&t.to_vec1::<f32>()?);
            }
            full.push(c.gather_f32(&mine, &format!("{kind} moments of {what}"))?);
        }
        let (Some(fm), Some(fv)) = (&full[0], &full[1]) else {
            return Ok(());
        };
        let tensors = |flat: &[f32]| -> Result<Vec<Tensor>> {
            opt.vars
                .iter()
                .zip(&self.offsets)
                .map(|((_, var), &a)| {
                    Ok(Tensor::from_slice(
                        &flat[a..a + var.elem_count()],
                        var.dims(),
                        var.device(),
                    )?
                    .to_dtype(var.dtype())?)
                })
                .collect()
        };
        let (m, v) = (tensors(fm)?, tensors(fv)?);
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
}
