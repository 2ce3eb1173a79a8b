//! The distillation losses against their closed forms: DMD2's distribution-matching gradient, the
//! GAN losses' signs, and TDM's trajectory point, diffusion, importance weight, SNR weights and
//! the pseudo-Huber distance.

use candle_core::{Device, Tensor, Var};
use graphs::losses::{dmd2, gan, tdm};

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
}

fn vals(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * y.abs().max(1.0), "[{i}] {x} vs {y}");
    }
}

/// Deterministic pseudo-random values in [-1, 1].
fn pr(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503));
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

#[test]
fn dm_gradient_is_score_difference_over_normaliser_over_numel() {
    let shape = [3, 1, 2, 2];
    let n = 12;
    let xv = pr(n, 1);
    let real = pr(n, 2);
    let fake = pr(n, 3);
    let x = Var::from_tensor(&t(&xv, &shape)).unwrap();
    let l = dmd2::dm_loss(x.as_tensor(), &t(&real, &shape), &t(&fake, &shape)).unwrap();
    let g = l.loss.backward().unwrap();
    let got = vals(g.get(&x).unwrap());
    // grad = (p_real - p_fake) / mean|p_real| per sample, p = x - x0; d loss / dx = grad / numel.
    let mut want = vec![0f32; n];
    let mut norms = vec![];
    for s in 0..3 {
        let r = s * 4..(s + 1) * 4;
        let norm: f32 = r.clone().map(|i| (xv[i] - real[i]).abs()).sum::<f32>() / 4.0;
        norms.push(norm);
        for i in r {
            let p_real = xv[i] - real[i];
            let p_fake = xv[i] - fake[i];
            want[i] = (p_real - p_fake) / norm / n as f32;
        }
    }
    close(&got, &want, 1e-5);
    let mean_norm = norms.iter().sum::<f32>() / 3.0;
    assert!((l.normaliser as f32 - mean_norm).abs() < 1e-5);
    // The loss value: 0.5 * mean(grad^2).
    let gv = vals(&l.grad);
    let want_loss = 0.5 * gv.iter().map(|g| g * g).sum::<f32>() / n as f32;
    let lv: f32 = l.loss.to_scalar().unwrap();
    assert!((lv - want_loss).abs() < 1e-6, "{lv} vs {want_loss}");
}

#[test]
fn dm_gradient_of_a_sample_with_zero_normaliser_is_zeroed_not_nan() {
    let shape = [2, 1, 1, 2];
    let x = Var::from_tensor(&t(&[0.5, 0.5, 0.1, 0.2], &shape)).unwrap();
    // Sample 0: real x0 == x, so mean|p_real| = 0 and grad is x/0 -> nan_to_num.
    let real = t(&[0.5, 0.5, 0.0, 0.0], &shape);
    let fake = t(&[0.4, 0.5, 0.0, 0.1], &shape);
    let l = dmd2::dm_loss(x.as_tensor(), &real, &fake).unwrap();
    let g = vals(&l.grad);
    assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
    assert_eq!(g[1], 0.0, "0/0 becomes 0");
    assert_eq!(
        g[0],
        f32::MIN,
        "-inf (from -0.1/0) becomes the lowest finite f32, like torch"
    );
    close(&g[2..], &[0.0, 0.1 / 0.15], 1e-5); // sample 1 is unaffected
}

#[test]
fn gan_losses_have_the_right_signs() {
    let hi = t(&[4.0, 5.0], &[2]);
    let lo = t(&[-4.0, -5.0], &[2]);
    let s = |x: &Tensor| x.to_scalar::<f32>().unwrap();
    // Critic: low loss when real scores high and fake low.
    assert!(s(&gan::critic_loss(&hi, &lo).unwrap()) < 0.1);
    assert!(s(&gan::critic_loss(&lo, &hi).unwrap()) > 8.0);
    // Generator: low loss when the critic scores its images as real.
    assert!(s(&gan::generator_loss(&hi).unwrap()) < s(&gan::generator_loss(&lo).unwrap()));
    // softplus is stable for large |x|.
    let sp = vals(&gan::softplus(&t(&[-100.0, 0.0, 100.0], &[3])).unwrap());
    close(&sp, &[0.0, std::f32::consts::LN_2, 100.0], 1e-6);
    // The generator's gradient pushes its logits up.
    let f = Var::from_tensor(&t(&[0.0, 1.0], &[2])).unwrap();
    let g = gan::generator_loss(f.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    assert!(vals(g.get(&f).unwrap()).iter().all(|&d| d < 0.0));
}

#[test]
fn trajectory_point_and_diffusion_match_the_vp_formulas() {
    let shape = [2, 1, 1, 3];
    let x0 = t(&pr(6, 4), &shape);
    let eps = t(&pr(6, 5), &shape);
    let fresh = t(&pr(6, 6), &shape);
    let (s_m, s_t) = ([0.5, 2.0], [1.5, 2.0]);
    let x_m = tdm::trajectory_point(&x0, &eps, &s_m).unwrap();
    let x_t = tdm::diffuse(&x_m, &fresh, &s_m, &s_t).unwrap();
    let mixed = tdm::mixed_noise(&eps, &fresh, &s_m, &s_t).unwrap();
    let (x0v, ev, fv) = (vals(&x0), vals(&eps), vals(&fresh));
    let (xmv, xtv, mv) = (vals(&x_m), vals(&x_t), vals(&mixed));
    for i in 0..6 {
        let (sm, st) = (s_m[i / 3] as f32, s_t[i / 3] as f32);
        // VP view: alpha = 1/sqrt(1+s^2), sigma_vp = s*alpha; x_vp = alpha*x0 + sigma_vp*eps.
        let am = 1.0 / (1.0 + sm * sm).sqrt();
        let vp_m = am * x0v[i] + sm * am * ev[i];
        assert!(
            (xmv[i] * am - vp_m).abs() < 1e-6,
            "x_m is the VP point alpha*x0 + sigma*eps"
        );
        // VP transition: x_t = (a_t/a_m) x_m + sqrt(sig_t^2 - (a_t/a_m)^2 sig_m^2) n.
        let at = 1.0 / (1.0 + st * st).sqrt();
        let beta = ((st * at).powi(2) - (at / am * sm * am).powi(2))
            .max(0.0)
            .sqrt();
        let vp_t = at / am * vp_m + beta * fv[i];
        assert!(
            (xtv[i] * at - vp_t).abs() < 1e-5,
            "{} vs {vp_t}",
            xtv[i] * at
        );
        // x_t = x0 + s_t * mixed.
        assert!((xtv[i] - (x0v[i] + st * mv[i])).abs() < 1e-5);
    }
    // Equal levels: no transition noise, x_t == x_m, mixed == eps.
    close(&xtv[3..], &xmv[3..], 1e-6);
    close(&mv[3..], &ev[3..], 1e-6);
    assert!(
        tdm::diffuse(&x_m, &fresh, &[2.0, 2.0], &[1.0, 2.0]).is_err(),
        "t below m"
    );
}

#[test]
fn importance_weight_is_one_when_mixed_equals_fresh() {
    let n = t(&pr(8, 7), &[2, 1, 2, 2]);
    let w = vals(&tdm::importance_weight(&n, &n).unwrap());
    close(&w, &[1.0, 1.0], 1e-7);
    // Larger mixed noise is less likely under N(0, I): weight below 1.
    let big = (&n * 3.0).unwrap();
    let w = vals(&tdm::importance_weight(&big, &n).unwrap());
    assert!(w.iter().all(|&x| x < 1.0), "{w:?}");
    let want: Vec<f32> = (0..2)
        .map(|s| {
            let v = &pr(8, 7)[s * 4..(s + 1) * 4];
            let mf = v.iter().map(|x| x * x).sum::<f32>() / 4.0;
            (-0.5 * (9.0 * mf - mf)).exp()
        })
        .collect();
    close(&w, &want, 1e-5);
}

#[test]
fn min_snr_clamps_and_other_weightings() {
    let snr = [0.1, 5.0, 100.0];
    assert_eq!(
        tdm::Weighting::MinSnr.weights(&snr, 5.0),
        vec![0.1, 5.0, 5.0]
    );
    assert_eq!(tdm::Weighting::Snr.weights(&snr, 5.0), snr.to_vec());
    assert_eq!(tdm::Weighting::Constant.weights(&snr, 5.0), vec![1.0; 3]);
}

#[test]
fn student_target_and_pseudo_huber() {
    let shape = [2, 1, 1, 4];
    let x0v = pr(8, 8);
    let x0 = Var::from_tensor(&t(&x0v, &shape)).unwrap();
    let rc = t(&pr(8, 9), &shape);
    let ru = t(&pr(8, 10), &shape);
    let fk = t(&pr(8, 11), &shape);
    let w = t(&[1.0, 1.0], &[2]);
    let cfg = 2.0;
    let b = graphs::CandleBackend::new(&candle_core::Device::Cpu);
    let real = graphs::guidance::combine(&b, &rc, &ru, cfg).unwrap();
    let mse = tdm::student_loss(x0.as_tensor(), &real, &fk, tdm::Distance::Mse, 1e-3, &w).unwrap();
    // MSE: the gradient is 2 * (x0 - target) / (numel_per_sample * norm * N), target - x0 =
    // real_cfg - fake, so it points from the fake score's x0 to the guided teacher's.
    let g = vals(mse.loss.backward().unwrap().get(&x0).unwrap());
    let (rcv, ruv, fkv) = (vals(&rc), vals(&ru), vals(&fk));
    for s in 0..2 {
        let r = s * 4..(s + 1) * 4;
        let cfgd: Vec<f32> = r
            .clone()
            .map(|i| rcv[i] + (cfg as f32 - 1.0) * (rcv[i] - ruv[i]))
            .collect();
        let norm: f32 = r
            .clone()
            .zip(&cfgd)
            .map(|(i, c)| (x0v[i] - c).abs())
            .sum::<f32>()
            / 4.0;
        for (j, i) in r.enumerate() {
            let want = -2.0 * (cfgd[j] - fkv[i]) / (4.0 * norm * 2.0);
            assert!((g[i] - want).abs() < 1e-5, "[{i}] {} vs {want}", g[i]);
        }
    }
    // Pseudo-Huber sqrt(d^2 + c^2) - c is d^2 / (2c) for |d| << c: a scaled MSE.
    let c = 100.0;
    let hub = tdm::student_loss(x0.as_tensor(), &real, &fk, tdm::Distance::Huber, c, &w).unwrap();
    let (m, h) = (
        mse.loss.to_scalar::<f32>().unwrap() as f64,
        hub.loss.to_scalar::<f32>().unwrap() as f64,
    );
    assert!(
        (h * 2.0 * c / m - 1.0).abs() < 1e-3,
        "huber {h} vs mse/(2c) {}",
        m / (2.0 * c)
    );
    // ...and |d| - c-ish (an L1) for |d| >> c: smaller than the MSE when |d| > 1.
    assert!((mse.normaliser - hub.normaliser).abs() < 1e-9);
}
