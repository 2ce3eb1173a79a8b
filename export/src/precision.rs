//! The exported graph's numeric precision.

use crate::backend::ElemType;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Numeric precision of the exported weights and of Conv/Gemm/MatMul-by-weight.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything f32.
    #[default]
    Fp32,
    /// f16 conv/linear weights and biases; each Conv/Gemm/MatMul-by-weight runs in f16 between
    /// explicit Casts (its input to f16, its output back to f32). GroupNorm (InstanceNormalization),
    /// Softmax, embeddings, the preconditioning and sampler arithmetic and all graph inputs and
    /// outputs stay f32 (TensorRT's strongly typed mode wants such explicit types).
    Fp16,
}

impl Precision {
    pub fn weight_elem(self) -> ElemType {
        match self {
            Self::Fp32 => ElemType::F32,
            Self::Fp16 => ElemType::F16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "fp16" | "f16" | "float16" | "half" => Ok(Self::Fp16),
            _ => anyhow::bail!("unknown precision {s:?} (expected fp32 or fp16)"),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
