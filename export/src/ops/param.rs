//! `param_value` -> the parameter as an f32 initializer named by its key (no node): a learned
//! table used as a whole tensor (CLIP's position embeddings) rather than through Gather or a
//! matrix product. Kept f32 in every precision, like embedding tables.

use crate::builder::{ElemType, OnnxBackend};
use anyhow::Result;
use graphs::Param;

pub fn param_value(b: &OnnxBackend, p: &Param) -> Result<String> {
    let dims: Vec<i64> = p.dims().iter().map(|&d| d as i64).collect();
    b.param_init(p, &p.name, &dims, ElemType::F32, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::Dim;
    use candle_core::{Device, Tensor};

    #[test]
    fn an_initializer_with_the_params_name_shape_and_values() {
        let b = OnnxBackend::new(graphs::Precision::Fp16).unwrap();
        let p = Param {
            name: "pos.weight".into(),
            t: Tensor::from_vec(vec![1f32, -2.0, 3.5, 0.25, 5.0, 6.0], (3, 2), &Device::Cpu)
                .unwrap(),
        };
        let v = param_value(&b, &p).unwrap();
        assert_eq!(v, "pos.weight");
        let info = b.info(&v).unwrap();
        assert_eq!(info.elem, ElemType::F32);
        assert_eq!(info.dims, [Dim::Fixed(3), Dim::Fixed(2)]);
        // Used twice: one initializer.
        assert_eq!(param_value(&b, &p).unwrap(), v);
        let g = b.take();
        assert!(g.nodes.is_empty());
        assert_eq!(g.initializers.len(), 1);
        let raw = &g.initializers[0].raw_data;
        let vals: Vec<f32> = raw
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, [1.0, -2.0, 3.5, 0.25, 5.0, 6.0]);
    }
}
