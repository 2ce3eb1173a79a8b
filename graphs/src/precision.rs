//! Numeric precision: one type for training (autocast), the ONNX export and TensorRT engines.

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Numeric precision. Spelled `fp32` / `fp16` / `bf16` in flags, TOML, JSON and ONNX metadata.
///
/// What it means per consumer (each refuses what it cannot do, naming the precision):
/// * training: weights and optimiser state stay f32 ("master weights"); fp16/bf16 run the
///   convolutions and matrix products (forward and backward) in half precision, like PyTorch's
///   autocast, while norms, softmax, the embeddings and the losses stay f32;
/// * ONNX export (fp32, fp16): f16 conv/linear weights and biases, each Conv/Gemm/MatMul-by-weight
///   in f16 between explicit Casts; norms, softmax, embeddings, the sampler arithmetic and all
///   graph inputs and outputs stay f32 (TensorRT's strongly typed mode wants explicit types);
/// * TensorRT engines (fp32, fp16): fp16 is `trtexec --fp16` (any layer may run in f16, the
///   deployable engine), fp32 is `--noTF32` (true f32, for debugging parity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Self::Fp32, Self::Fp16, Self::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }

    /// The autocast dtype of training (`None` for fp32).
    pub fn autocast(self) -> Option<candle_core::DType> {
        match self {
            Self::Fp32 => None,
            Self::Fp16 => Some(candle_core::DType::F16),
            Self::Bf16 => Some(candle_core::DType::BF16),
        }
    }

    /// fp16 needs dynamic loss scaling (its exponent range is narrow); bf16 does not.
    pub fn needs_loss_scaling(self) -> bool {
        self == Self::Fp16
    }

    /// `Ok(self)` when it is one of `supported`, else an error naming `what` and the choices.
    pub fn require(self, what: &str, supported: &[Precision]) -> Result<Self> {
        if supported.contains(&self) {
            return Ok(self);
        }
        let names: Vec<&str> = supported.iter().map(|p| p.name()).collect();
        anyhow::bail!(
            "{what} supports precision {}, not {}",
            names.join(" or "),
            self.name()
        )
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => anyhow::bail!("unknown precision {s:?} (expected fp32, fp16 or bf16)"),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_str_and_serde() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
            let j = serde_json::to_string(&p).unwrap();
            assert_eq!(j, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<Precision>(&j).unwrap(), p);
        }
        assert!("fp8".parse::<Precision>().is_err());
    }

    #[test]
    fn require_names_the_consumer() {
        let e = Precision::Bf16
            .require("ONNX export", &[Precision::Fp32, Precision::Fp16])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "ONNX export supports precision fp32 or fp16, not bf16");
        assert_eq!(
            Precision::Fp16.require("x", &[Precision::Fp16]).unwrap(),
            Precision::Fp16
        );
    }
}
