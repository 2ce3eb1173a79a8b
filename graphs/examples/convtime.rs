//! Quick timing of the fast conv2d against candle's stock conv on the bench UNet's layer shapes
//! (development aid; `distill bench` is the reference measurement).
use candle_core::{Device, Tensor, Var};

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

fn main() {
    let n: usize = std::env::args().nth(1).map_or(64, |a| a.parse().unwrap());
    let stock = std::env::args().nth(2).is_some_and(|a| a == "stock");
    graphs::tune_allocator();
    let dev = Device::Cpu;
    for (c, co, hw, k, s, p) in [
        (32, 32, 32, 3, 1, 1),
        (64, 64, 16, 3, 1, 1),
        (128, 128, 8, 3, 1, 1),
        (96, 32, 32, 3, 1, 1),
        (32, 32, 32, 3, 2, 1),
        (96, 32, 32, 1, 1, 0),
        (128, 128, 8, 1, 1, 0),
    ] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (co, c, k, k), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, co, &dev).unwrap()).unwrap();
        let ho = (hw + 2 * p - k) / s + 1;
        let gf = 2.0 * (n * co * c * k * k * ho * ho) as f64 * 1e-9;
        let g = Tensor::randn(0f32, 1.0, (n, co, ho, ho), &dev).unwrap();
        let fwd = |stock: bool| {
            if stock {
                x.conv2d(&w, p, s, 1, 1)
                    .unwrap()
                    .broadcast_add(&b.reshape((1, co, 1, 1)).unwrap())
                    .unwrap()
            } else {
                graphs::kernels::conv2d(&x, &w, Some(&b), s, p).unwrap()
            }
        };
        let f = time(|| {
            fwd(stock);
        });
        let fb = time(|| {
            (fwd(stock) * &g).unwrap().sum_all().unwrap().backward().unwrap();
        });
        println!(
            "{c:>3}->{co:<3} {hw:>2}x{hw:<2} k{k} s{s}: fwd {f:7.1} ms ({:5.1} GFLOP/s)  fwd+bwd {fb:7.1} ms ({:5.1} GFLOP/s)",
            gf / f * 1e3,
            3.0 * gf / fb * 1e3
        );
    }
}
