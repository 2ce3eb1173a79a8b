use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use graphs::*;
fn main() {
    graphs::tune_allocator();
    let args: Vec<String> = std::env::args().collect();
    let base: usize = args[1].parse().unwrap();
    let mult: Vec<usize> = args[2].split(',').map(|s| s.parse().unwrap()).collect();
    let nres: usize = args[3].parse().unwrap();
    let bs: usize = args[4].parse().unwrap();
    let cfg = ModelConfig {
        unet: UNetConfig {
            base_channels: base,
            channel_mult: mult,
            num_res_blocks: nres,
            ..UNetConfig::mnist_small()
        },
        parameterisation: Parameterisation::edm(),
    };
    let vm = VarMap::new();
    let den = Denoiser::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &cfg).unwrap();
    println!("params {}", graphs::params::count(&den));
    let b = CandleBackend::training(&Device::Cpu);
    let x = Tensor::randn(0f32, 1.0, (bs, 1, 32, 32), &Device::Cpu).unwrap();
    let l = Tensor::zeros(bs, DType::U32, &Device::Cpu).unwrap();
    let s = Tensor::ones(bs, DType::F32, &Device::Cpu).unwrap();
    for i in 0..4 {
        let t = std::time::Instant::now();
        let loss = graphs::losses::teacher_loss(&b, &den, &x, &l, &s, &x).unwrap();
        let t1 = t.elapsed();
        let _g = loss.backward().unwrap();
        println!("{i}: fwd {:?} total {:?}", t1, t.elapsed());
    }
}
