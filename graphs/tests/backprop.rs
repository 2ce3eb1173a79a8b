//! Gradients through candle's backprop as patched in `vendor/candle-core` (the first gradient
//! of a node is stored as is, later ones added): against closed forms, for the cases where the
//! patch changes which code path runs (one consumer, several consumers, subtraction, broadcast,
//! views, an identity custom op) and against central differences on a small network.

use candle_core::{CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var, D};

fn close(a: &Tensor, b: &[f32], tol: f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "element {i}: {x} vs {y}");
    }
}

#[test]
fn single_and_multiple_consumers() -> Result<()> {
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
    // x used three times: d/dx (x*x + x) - 2x = 2x + 1 - 2.
    let y = ((x.as_tensor() * x.as_tensor())? + x.as_tensor())?;
    let z = (y - (x.as_tensor() * 2.0)?)?;
    let g = z.sum_all()?.backward()?;
    close(g.get(&x).unwrap(), &[1.0, -5.0, 5.0], 1e-6);
    Ok(())
}

#[test]
fn subtraction_negates_a_first_gradient() -> Result<()> {
    let a = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let b = Var::new(&[5f32, 7.0], &Device::Cpu)?;
    let g = (a.as_tensor() - b.as_tensor())?.sum_all()?.backward()?;
    close(g.get(&a).unwrap(), &[1.0, 1.0], 0.0);
    close(g.get(&b).unwrap(), &[-1.0, -1.0], 0.0);
    Ok(())
}

#[test]
fn shared_gradients_do_not_alias_into_each_other() -> Result<()> {
    // a + b hands both the same gradient; a also gets a second one afterwards, which must not
    // leak into b's.
    let a = Var::new(&[1f32, 2.0], &Device::Cpu)?;
    let b = Var::new(&[3f32, 4.0], &Device::Cpu)?;
    let s = (a.as_tensor() + b.as_tensor())?;
    let l = ((&s * 3.0)? + (a.as_tensor() * a.as_tensor())?)?;
    let g = l.sum_all()?.backward()?;
    close(g.get(&a).unwrap(), &[5.0, 7.0], 1e-6);
    close(g.get(&b).unwrap(), &[3.0, 3.0], 0.0);
    Ok(())
}

#[test]
fn broadcast_and_views_give_contiguous_gradients() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev)?;
    let bias = Var::new(&[10f32, 20.0, 30.0], &dev)?;
    let y = x.as_tensor().broadcast_add(bias.as_tensor())?;
    // Only a column of y and a transposed view reach the loss.
    let l = (y.narrow(1, 1, 1)?.sum_all()? + (y.t()? * 2.0)?.sum_all()?)?;
    let g = l.backward()?;
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    close(gx, &[2.0, 3.0, 2.0, 2.0, 3.0, 2.0], 0.0);
    let gb = g.get(&bias).unwrap();
    assert!(gb.is_contiguous());
    close(gb, &[4.0, 6.0, 4.0], 0.0);
    Ok(())
}

/// y = x, with the incoming gradient handed back as is (the case where the stored gradient
/// is literally another node's gradient).
struct Identity;

impl CustomOp1 for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("f32 only")
        };
        let (a, b) = l.contiguous_offsets().expect("contiguous");
        Ok((
            candle_core::CpuStorage::F32(v[a..b].to_vec()),
            l.shape().clone(),
        ))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

#[test]
fn a_gradient_handed_back_unchanged_stays_correct() -> Result<()> {
    let x = Var::new(&[1f32, 2.0, 3.0], &Device::Cpu)?;
    let y = x.as_tensor().apply_op1(Identity)?;
    let l = ((&y * &y)? + (x.as_tensor() * 4.0)?)?.sum_all()?;
    let g = l.backward()?;
    close(g.get(&x).unwrap(), &[6.0, 8.0, 10.0], 1e-6);
    Ok(())
}

#[test]
fn small_network_matches_central_differences() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::randn(0f64, 0.5, (4, 3), &dev)?)?;
    let x = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
    let loss = |w: &Tensor| -> Result<Tensor> {
        let h = x.matmul(&w.t()?)?; // [5, 4]
        let a = candle_nn::ops::silu(&h)?;
        let s = candle_nn::ops::softmax(&(&a + &h)?, D::Minus1)?;
        (s.sqr()?.sum_all()? + a.mean_all()?)?.to_dtype(DType::F64)
    };
    let g = loss(w.as_tensor())?.backward()?;
    let gw = g.get(&w).unwrap().flatten_all()?.to_vec1::<f64>()?;
    let w0 = w.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let eps = 1e-6;
    for i in 0..w0.len() {
        let at = |d: f64| -> Result<f64> {
            let mut v = w0.clone();
            v[i] += d;
            loss(&Tensor::from_vec(v, (4, 3), &dev)?)?.to_scalar::<f64>()
        };
        let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
        assert!((fd - gw[i]).abs() < 1e-7, "weight {i}: {} vs {fd}", gw[i]);
    }
    Ok(())
}
