//! Quick timing of the fast conv2d against candle's stock conv on the bench UNet's layer shapes
//! (development aid; `distill bench` is the reference measurement).
use candle_core::{Device, Tensor, Var};

/// Process CPU time in ms (all threads): robust to other processes taking the cores.
fn cpu_ms() -> f64 {
    let mut t = libc_timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall wrapper writing into `t`.
    unsafe { clock_gettime(2, &mut t) }; // CLOCK_PROCESS_CPUTIME_ID
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 * 1e-6
}
#[repr(C)]
struct libc_timespec {
    tv_sec: i64,
    tv_nsec: i64,
}
extern "C" {
    fn clock_gettime(clk: i32, t: *mut libc_timespec) -> i32;
}

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let cpu = std::env::var("CPU_TIME").is_ok();
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let (s, c) = (std::time::Instant::now(), cpu_ms());
            f();
            if cpu {
                cpu_ms() - c
            } else {
                s.elapsed().as_secs_f64() * 1e3
            }
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

// As in the binary: mimalloc keeps freed activation memory for reuse.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: usize = std::env::args().nth(1).map_or(64, |a| a.parse().unwrap());
    let stock = std::env::args().nth(2).is_some_and(|a| a == "stock");
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
            (fwd(stock) * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
        });
        // One gradient at a time: input only (weights detached), weights only (input detached).
        let (xd, wd) = (x.as_tensor().detach(), w.as_tensor().detach());
        let one = |xx: &Tensor, ww: &Tensor| {
            let y = if stock {
                xx.conv2d(ww, p, s, 1, 1).unwrap()
            } else {
                graphs::kernels::conv2d(xx, ww, None, s, p).unwrap()
            };
            (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        };
        let dx = time(|| one(x.as_tensor(), &wd)) - f;
        let dw = time(|| one(&xd, w.as_tensor())) - f;
        println!(
            "{c:>3}->{co:<3} {hw:>2}x{hw:<2} k{k} s{s}: fwd {f:6.1} ms ({:5.1} GFLOP/s) dx {dx:6.1} ms ({:5.1}) dw {dw:6.1} ms ({:5.1})  fwd+bwd {fb:6.1} ms ({:5.1} GFLOP/s)",
            gf / f * 1e3,
            gf / dx * 1e3,
            gf / dw * 1e3,
            3.0 * gf / fb * 1e3
        );
    }
}
