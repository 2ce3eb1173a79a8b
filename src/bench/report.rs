//! The bench report as text.

use super::*;

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.candle;
        writeln!(
            f,
            "UNet `{}` ({:.2}M parameters), batch {}, {} threads, {} warm-up + {} timed iterations (medians)",
            self.config_name,
            self.params as f64 * 1e-6,
            self.batch,
            self.threads,
            self.warmup,
            self.iters
        )?;
        writeln!(
            f,
            "forward: {}; a train step counts as 3x forward",
            self.forward_flops
        )?;
        let t = self.torch.as_ref();
        if let Some(t) = t {
            writeln!(
                f,
                "PyTorch peer matches candle: max abs diff {:.2e} (denoiser output, batch {PARITY_BATCH}; loss relative diff {:.1e})",
                t.parity_max_abs_diff, t.parity_loss_rel_diff
            )?;
            let same = if t.forward_flops == self.forward_flops.dense() {
                "same count"
            } else {
                "differs"
            };
            writeln!(f, "PyTorch {} ({} threads, {}); its FlopCounterMode: {:.3} GFLOP per forward ({same})", t.version, t.threads, t.python.display(), t.forward_flops as f64 * 1e-9)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<28} {:>12} {:>12} {:>8}",
            "op", "candle", "PyTorch", "ratio"
        )?;
        let row = |f: &mut fmt::Formatter<'_>,
                   name: &str,
                   cv: f64,
                   tv: Option<f64>,
                   ratio: Option<f64>,
                   prec: usize|
         -> fmt::Result {
            let tv = tv.map_or("-".to_string(), |v| format!("{v:.prec$}"));
            let r = ratio.map_or("-".to_string(), |r| format!("{r:.2}x"));
            writeln!(f, "{name:<28} {cv:>12.prec$} {tv:>12} {r:>8}")
        };
        let tr = t.map(|t| &t.result);
        row(
            f,
            "forward (ms)",
            c.forward_median_ms,
            tr.map(|r| r.forward_median_ms),
            tr.map(|r| r.forward_median_ms / c.forward_median_ms),
            1,
        )?;
        row(
            f,
            "train step (ms)",
            c.step_median_ms,
            tr.map(|r| r.step_median_ms),
            tr.map(|r| r.step_median_ms / c.step_median_ms),
            1,
        )?;
        row(
            f,
            "forward GFLOP/s",
            c.forward_gflops,
            tr.map(|r| r.forward_gflops),
            tr.map(|r| c.forward_gflops / r.forward_gflops),
            1,
        )?;
        row(
            f,
            "train step GFLOP/s",
            c.step_gflops,
            tr.map(|r| r.step_gflops),
            tr.map(|r| c.step_gflops / r.step_gflops),
            1,
        )?;
        row(
            f,
            "peak RSS after forward (MiB)",
            c.peak_rss_mb_forward,
            tr.map(|r| r.peak_rss_mb_forward),
            None,
            0,
        )?;
        row(
            f,
            "peak RSS after steps (MiB)",
            c.peak_rss_mb,
            tr.map(|r| r.peak_rss_mb),
            None,
            0,
        )?;
        writeln!(f, "ratio = PyTorch time / candle time: candle's speed relative to PyTorch (below 1: candle is slower)")?;
        writeln!(f, "{}", super::torch::isa_line(t.is_some()))?;
        // The machine's GEMM peak: the faster of the two f32 GEMMs measured here.
        let peak = [self.candle_gemm_gflops, t.and_then(|t| t.gemm_gflops)]
            .into_iter()
            .flatten()
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        if let Some(peak) = peak {
            let part = |name: &str, v: Option<f64>| {
                v.map(|v| format!("{name} {v:.1}")).unwrap_or_default()
            };
            writeln!(
                f,
                "GEMM peak (f32 {GEMM_N}^3, best of 5): {peak:.1} GFLOP/s ({}{}{} GFLOP/s); candle reaches {:.0}% of it in the forward, {:.0}% in the train step",
                part("candle matmul", self.candle_gemm_gflops),
                if self.candle_gemm_gflops.is_some() && t.and_then(|t| t.gemm_gflops).is_some() { ", " } else { "" },
                part("torch.mm", t.and_then(|t| t.gemm_gflops)),
                100.0 * c.forward_gflops / peak,
                100.0 * c.step_gflops / peak
            )?;
        }
        write!(
            f,
            "peak RSS is process-wide (candle: VmHWM of this process, model and inputs included"
        )?;
        match t {
            Some(t) => writeln!(
                f,
                "; PyTorch: VmHWM of its process, {:.0} MiB of it right after `import torch`)",
                t.rss_mb_after_import
            )?,
            None => writeln!(f, ")")?,
        }
        if let Some(note) = &self.torch_note {
            writeln!(f, "{note}")?;
        }
        if let Some(s) = &self.candle_stock {
            writeln!(f)?;
            writeln!(
                f,
                "candle stock ops: forward {:.1} ms, train step {:.1} ms (peak RSS {:.0} MiB); the fast kernels are {:.2}x / {:.2}x faster",
                s.forward_median_ms,
                s.step_median_ms,
                s.peak_rss_mb,
                s.forward_median_ms / c.forward_median_ms,
                s.step_median_ms / c.step_median_ms
            )?;
        }
        if !self.ops.is_empty() {
            writeln!(f)?;
            writeln!(f, "per op, batch {} (vs stock: stock time / ours; vs torch: PyTorch time / ours; above 1 = ours faster):", self.batch)?;
            write!(f, "{}", ops::table(&self.ops))?;
        }
        Ok(())
    }
}
