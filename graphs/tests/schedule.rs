//! Noise schedules and preconditioning against closed-form values.

use graphs::schedule::{karras_sigmas, EdmSchedule, VpSchedule};
use graphs::{BetaSchedule, Parameterisation, SamplerKind};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn edm_preconditioning_closed_form() {
    let e = EdmSchedule::default();
    assert_eq!(
        (e.sigma_data, e.sigma_min, e.sigma_max, e.rho),
        (0.5, 0.002, 80.0, 7.0)
    );
    // sigma = sigma_data: c_skip = 1/2, c_out = sd/sqrt(2), c_in = 1/(sd sqrt 2).
    let s = 0.5;
    assert!(close(e.c_skip(s), 0.5, 1e-12));
    assert!(close(e.c_out(s), 0.5 / 2f64.sqrt(), 1e-12));
    assert!(close(e.c_in(s), 1.0 / (0.5 * 2f64.sqrt()), 1e-12));
    assert!(close(e.c_noise(80.0), 80f64.ln() / 4.0, 1e-12));
    // sigma = 1: c_skip = .25/1.25, c_out = .5/sqrt(1.25), weight = 1.25/.25.
    assert!(close(e.c_skip(1.0), 0.2, 1e-12));
    assert!(close(e.c_out(1.0), 0.5 / 1.25f64.sqrt(), 1e-12));
    assert!(close(e.loss_weight(1.0), 5.0, 1e-12));
    // c_skip^2 * sd^2 + c_out^2 ... the EDM identity: D has unit-variance target scaling:
    for s in [0.002, 0.1, 1.0, 10.0, 80.0] {
        let (cs, co) = (e.c_skip(s), e.c_out(s));
        // Var of (x0 - c_skip (x0 + s n)) / c_out equals 1 for x0 ~ sd^2 variance.
        let var = ((1.0 - cs).powi(2) * 0.25 + cs * cs * s * s) / (co * co);
        assert!(close(var, 1.0, 1e-9), "sigma {s}: {var}");
        assert!(close(e.loss_weight(s), 1.0 / (co * co), 1e-9));
    }
}

#[test]
fn karras_grid_endpoints_and_formula() {
    let s = karras_sigmas(18, 0.002, 80.0, 7.0);
    assert_eq!(s.len(), 18);
    assert!(close(s[0], 80.0, 1e-12) && close(s[17], 0.002, 1e-12));
    let (a, b) = (80f64.powf(1.0 / 7.0), 0.002f64.powf(1.0 / 7.0));
    assert!(close(s[5], (a + 5.0 / 17.0 * (b - a)).powf(7.0), 1e-12));
    assert!(s.windows(2).all(|w| w[0] > w[1]));
}

#[test]
fn vp_linear_and_scaled_linear() {
    let v = VpSchedule::default();
    let b = v.betas();
    assert_eq!(b.len(), 1000);
    assert!(close(b[0], 1e-4, 1e-12) && close(b[999], 2e-2, 1e-12));
    assert!(close(b[500], 1e-4 + (2e-2 - 1e-4) * 500.0 / 999.0, 1e-12));
    let ab = v.alphas_cumprod();
    let prod: f64 = b[..10].iter().map(|x| 1.0 - x).product();
    assert!(close(ab[9], prod, 1e-12));
    // linear DDPM: alpha_bar_T ~ 4.0e-5
    assert!(ab[999] > 3e-5 && ab[999] < 5e-5, "{}", ab[999]);
    let sig = v.sigmas();
    assert!(close(sig[9], ((1.0 - ab[9]) / ab[9]).sqrt(), 1e-12));
    assert!(close(v.t_from_sigma(sig[123]), 123.0, 1e-9));
    assert!(close(
        v.t_from_sigma((sig[10] * sig[11]).sqrt()),
        10.5,
        0.05
    ));
    let s = VpSchedule {
        beta_schedule: BetaSchedule::ScaledLinear,
        ..Default::default()
    };
    let bs = s.betas();
    assert!(close(bs[0], 1e-4, 1e-12) && close(bs[999], 2e-2, 1e-12));
    let mid = (1e-4f64.sqrt() + (2e-2f64.sqrt() - 1e-4f64.sqrt()) * 0.5).powi(2);
    assert!(close(s.betas().len() as f64, 1000.0, 0.0));
    assert!((bs[499] - mid).abs() < 1e-4);
    assert_eq!(v.ddim_timesteps(4), vec![999, 749, 500, 250]);
}

#[test]
fn sampler_nfe_counts() {
    assert_eq!(SamplerKind::Heun.nfe(18), 35);
    assert_eq!(SamplerKind::Euler.nfe(18), 18);
    assert_eq!(SamplerKind::Ddim.nfe(50), 50);
    assert_eq!(SamplerKind::Student.nfe(4), 4);
    assert_eq!(Parameterisation::edm().sigma_max(), 80.0);
}
