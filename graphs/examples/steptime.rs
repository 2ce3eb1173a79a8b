//! Where a teacher training step's time goes (development aid): forward without gradients, loss
//! forward with the graph, backward, AdamW step; fast kernels vs candle's stock ops.
use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW, VarBuilder, VarMap};
use graphs::{CandleBackend, Denoiser, ModelConfig, Parameterisation, UNetConfig};
use std::time::Instant;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

// As in the binary: mimalloc keeps freed activation memory for reuse.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map_or(64, |a| a.parse().unwrap());
    let cfg = match args.get(2).map(String::as_str) {
        Some("mnist_small") => UNetConfig::mnist_small(),
        _ => UNetConfig::bench(),
    };
    let stock = args.get(3).is_some_and(|a| a == "stock");
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let den = Denoiser::new(
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
        &ModelConfig::ours(cfg.clone(), Parameterisation::edm()),
    )?;
    let r = cfg.resolution;
    let x0 = Tensor::randn(0f32, 1.0, (n, 1, r, r), &dev)?;
    let noise = Tensor::randn(0f32, 1.0, (n, 1, r, r), &dev)?;
    let labels = Tensor::from_vec((0..n as u32).map(|i| i % 11).collect::<Vec<_>>(), n, &dev)?;
    let sigma = Tensor::randn(0f32, 1.0, n, &dev)?
        .affine(1.2, -1.2)?
        .exp()?;
    let (mut b, mut bt) = (CandleBackend::new(&dev), CandleBackend::training(&dev));
    if stock {
        (b, bt) = (b.stock(), bt.stock());
    }
    let mut opt = candle_nn::AdamW::new(vm.all_vars(), ParamsAdamW::default())?;
    for it in 0..4 {
        let t = Instant::now();
        let level = den.level_from_sigma(&b, &sigma)?;
        let x = (&x0 + noise.broadcast_mul(&sigma.reshape((n, 1, 1, 1))?)?)?;
        den.forward(&b, &x, &level, &labels)?;
        let f = ms(t);
        let t = Instant::now();
        let loss = graphs::losses::teacher_loss(&bt, &den, &x0, &labels, &sigma, &noise)?;
        let lf = ms(t);
        let t = Instant::now();
        let grads = loss.backward()?;
        let bw = ms(t);
        let t = Instant::now();
        opt.step(&grads)?;
        let os = ms(t);
        println!("iter {it}: forward {f:.1} ms | step: loss fwd {lf:.1} + backward {bw:.1} + adamw {os:.1} = {:.1} ms", lf + bw + os);
    }
    Ok(())
}
