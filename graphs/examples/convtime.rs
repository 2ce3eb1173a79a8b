use candle_core::{Device, Tensor, Var, D};
fn t<F: FnMut()>(name: &str, mut f: F) {
    f();
    let s = std::time::Instant::now();
    for _ in 0..3 {
        f();
    }
    println!("{name}: {:?}", s.elapsed() / 3);
}
fn main() {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (64, 32, 32, 32), &Device::Cpu).unwrap())
        .unwrap();
    let w =
        Var::from_tensor(&Tensor::randn(0f32, 0.1, (32, 32, 3, 3), &Device::Cpu).unwrap()).unwrap();
    t("ours fwd", || {
        graphs::kernels::conv2d(&x, &w, 1, 1).unwrap();
    });
    t("stock fwd", || {
        x.conv2d(&w, 1, 1, 1, 1).unwrap();
    });
    t("ours fwd+bwd", || {
        graphs::kernels::conv2d(&x, &w, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    t("stock fwd+bwd", || {
        x.conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    });
    let cols = Tensor::randn(0f32, 1.0, (64, 288, 1024), &Device::Cpu).unwrap();
    let wm = Tensor::randn(0f32, 1.0, (32, 288), &Device::Cpu).unwrap();
    t("bmm", || {
        wm.broadcast_matmul(&cols).unwrap();
    });
    t("gn", || {
        let xg = x.reshape((64, 8, 4096)).unwrap();
        let m = xg.mean_keepdim(D::Minus1).unwrap();
        let c = xg.broadcast_sub(&m).unwrap();
        let v = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        c.broadcast_div(&(v + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
    });
    t("silu", || {
        candle_nn::ops::silu(&x).unwrap();
    });
    t("add", || {
        (x.as_tensor() + x.as_tensor()).unwrap();
    });
}
