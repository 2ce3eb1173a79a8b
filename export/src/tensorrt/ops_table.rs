//! The ONNX operators TensorRT 10's ONNX parser imports at opset 17, as data: one entry per op
//! with the attribute/input constraints [`super::lint`] checks. Sources: onnx-tensorrt's
//! `docs/operators.md` for TensorRT 10 (op list and "Restrictions" column) and the ONNX opset-17
//! operator schemas (attribute defaults).
//!
//! Ops TensorRT 10 rejects at opset 17 are simply absent (e.g. `Unique`, `StringNormalizer`,
//! `TfIdfVectorizer`, the `Sequence*` family, `Optional*`, `DFT`, `STFT`, `MelWeightMatrix`, the window functions,
//! `Multinomial`, `NegativeLogLikelihoodLoss`, `SoftmaxCrossEntropyLoss`, `ConvInteger`,
//! `MatMulInteger`, `QLinearConv`, `QLinearMatMul`, `DynamicQuantizeLinear`, `Compress`,
//! `ConcatFromSequence`, `SplitToSequence`, `Det`, `BitShift`, `Bernoulli`, `MaxUnpool`,
//! `CenterCropPad`). Control flow (`If`, `Loop`, `Scan`) is supported but its subgraphs are not
//! linted; the exporter never emits it.

/// One constraint the lint checks on a node.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    /// A string attribute (absent = `default`) must be one of `allowed`.
    StrAttr {
        name: &'static str,
        default: &'static str,
        allowed: &'static [&'static str],
    },
    /// An int attribute (absent = `default`) must be one of `allowed`.
    IntAttr {
        name: &'static str,
        default: i64,
        allowed: &'static [i64],
    },
    /// Input `index` (when present and non-empty) must be an initializer or a `Constant` output.
    ConstInput { index: usize, what: &'static str },
    /// Number of spatial dims of a convolution kernel (`kernel_shape`, else weight rank - 2).
    KernelDims { min: usize, max: usize },
    /// Rank of input `index`, where known from the graph's shapes.
    InputRank {
        index: usize,
        min: usize,
        max: usize,
    },
    /// `axis` attribute (absent = 0) within the rank of input 0 where known, and indices (input 1)
    /// int32, or int64 only when shape-like.
    GatherAxis,
    /// The `to` attribute of `Cast` names an element type TensorRT has.
    CastTo,
}

/// An operator TensorRT 10's parser supports, with what the lint checks about it.
#[derive(Clone, Copy, Debug)]
pub struct OpRule {
    pub op: &'static str,
    pub checks: &'static [Check],
}

const fn op(op: &'static str) -> OpRule {
    OpRule { op, checks: &[] }
}

const AUTO_PAD: Check = Check::StrAttr {
    name: "auto_pad",
    default: "NOTSET",
    allowed: &["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"],
};

/// The table, alphabetical.
pub static OPS: &[OpRule] = &[
    op("Abs"),
    op("Acos"),
    op("Acosh"),
    op("Add"),
    op("And"),
    op("ArgMax"),
    op("ArgMin"),
    op("Asin"),
    op("Asinh"),
    op("Atan"),
    op("Atanh"),
    OpRule {
        op: "AveragePool",
        checks: &[AUTO_PAD, Check::KernelDims { min: 1, max: 3 }],
    },
    op("BatchNormalization"),
    OpRule {
        op: "Cast",
        checks: &[Check::CastTo],
    },
    op("Ceil"),
    op("Celu"),
    op("Clip"),
    op("Concat"),
    op("Constant"),
    op("ConstantOfShape"),
    OpRule {
        op: "Conv",
        checks: &[AUTO_PAD, Check::KernelDims { min: 1, max: 3 }],
    },
    OpRule {
        op: "ConvTranspose",
        checks: &[AUTO_PAD, Check::KernelDims { min: 1, max: 3 }],
    },
    op("Cos"),
    op("Cosh"),
    OpRule {
        op: "CumSum",
        checks: &[Check::ConstInput {
            index: 1,
            what: "axis",
        }],
    },
    op("DepthToSpace"),
    op("DequantizeLinear"),
    op("Div"),
    op("Dropout"),
    OpRule {
        op: "Einsum",
        checks: &[],
    },
    op("Elu"),
    op("Equal"),
    op("Erf"),
    op("Exp"),
    op("Expand"),
    op("EyeLike"),
    op("Flatten"),
    op("Floor"),
    OpRule {
        op: "Gather",
        checks: &[Check::GatherAxis],
    },
    op("GatherElements"),
    op("GatherND"),
    op("Gemm"),
    op("GlobalAveragePool"),
    op("GlobalLpPool"),
    op("GlobalMaxPool"),
    op("Greater"),
    op("GreaterOrEqual"),
    OpRule {
        op: "GridSample",
        checks: &[Check::InputRank {
            index: 0,
            min: 4,
            max: 4,
        }],
    },
    op("GRU"),
    op("Hardmax"),
    op("HardSigmoid"),
    op("HardSwish"),
    op("Identity"),
    op("If"),
    OpRule {
        op: "InstanceNormalization",
        checks: &[
            Check::ConstInput {
                index: 1,
                what: "scale",
            },
            Check::ConstInput {
                index: 2,
                what: "B (bias)",
            },
            Check::InputRank {
                index: 0,
                min: 3,
                max: 5,
            },
        ],
    },
    op("IsInf"),
    op("IsNaN"),
    op("LayerNormalization"),
    op("LeakyRelu"),
    op("Less"),
    op("LessOrEqual"),
    op("Log"),
    op("LogSoftmax"),
    op("Loop"),
    op("LpNormalization"),
    OpRule {
        op: "LpPool",
        checks: &[AUTO_PAD, Check::KernelDims { min: 1, max: 3 }],
    },
    op("LRN"),
    op("LSTM"),
    op("MatMul"),
    op("Max"),
    OpRule {
        op: "MaxPool",
        checks: &[AUTO_PAD, Check::KernelDims { min: 1, max: 3 }],
    },
    op("Mean"),
    op("MeanVarianceNormalization"),
    op("Min"),
    op("Mod"),
    op("Mul"),
    op("Neg"),
    OpRule {
        op: "NonMaxSuppression",
        checks: &[
            Check::ConstInput {
                index: 2,
                what: "max_output_boxes_per_class",
            },
            Check::ConstInput {
                index: 3,
                what: "iou_threshold",
            },
            Check::ConstInput {
                index: 4,
                what: "score_threshold",
            },
        ],
    },
    op("NonZero"),
    op("Not"),
    op("OneHot"),
    op("Or"),
    OpRule {
        op: "Pad",
        checks: &[Check::StrAttr {
            name: "mode",
            default: "constant",
            allowed: &["constant", "reflect", "edge"],
        }],
    },
    op("Pow"),
    op("PRelu"),
    op("QuantizeLinear"),
    op("RandomNormal"),
    op("RandomNormalLike"),
    op("RandomUniform"),
    op("RandomUniformLike"),
    op("Range"),
    op("Reciprocal"),
    op("ReduceL1"),
    op("ReduceL2"),
    op("ReduceLogSum"),
    op("ReduceLogSumExp"),
    op("ReduceMax"),
    op("ReduceMean"),
    op("ReduceMin"),
    op("ReduceProd"),
    op("ReduceSum"),
    op("ReduceSumSquare"),
    op("Relu"),
    op("Reshape"),
    OpRule {
        op: "Resize",
        checks: &[
            Check::StrAttr {
                name: "mode",
                default: "nearest",
                allowed: &["nearest", "linear", "cubic"],
            },
            Check::StrAttr {
                name: "coordinate_transformation_mode",
                default: "half_pixel",
                allowed: &[
                    "half_pixel",
                    "pytorch_half_pixel",
                    "tf_half_pixel_for_nn",
                    "asymmetric",
                    "align_corners",
                ],
            },
            Check::StrAttr {
                name: "nearest_mode",
                default: "round_prefer_floor",
                allowed: &["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"],
            },
            Check::IntAttr {
                name: "exclude_outside",
                default: 0,
                allowed: &[0],
            },
        ],
    },
    op("ReverseSequence"),
    op("RNN"),
    op("RoiAlign"),
    op("Round"),
    op("Scan"),
    op("Scatter"),
    op("ScatterElements"),
    op("ScatterND"),
    op("Selu"),
    op("Shape"),
    op("Shrink"),
    op("Sigmoid"),
    op("Sign"),
    op("Sin"),
    op("Sinh"),
    op("Size"),
    OpRule {
        op: "Slice",
        checks: &[Check::ConstInput {
            index: 3,
            what: "axes",
        }],
    },
    op("Softmax"),
    op("Softplus"),
    op("Softsign"),
    op("SpaceToDepth"),
    op("Split"),
    op("Sqrt"),
    OpRule {
        op: "Squeeze",
        checks: &[Check::ConstInput {
            index: 1,
            what: "axes",
        }],
    },
    op("Sub"),
    op("Sum"),
    op("Tan"),
    op("Tanh"),
    op("ThresholdedRelu"),
    op("Tile"),
    OpRule {
        op: "TopK",
        checks: &[Check::ConstInput {
            index: 1,
            what: "K",
        }],
    },
    op("Transpose"),
    op("Trilu"),
    OpRule {
        op: "Unsqueeze",
        checks: &[Check::ConstInput {
            index: 1,
            what: "axes",
        }],
    },
    op("Where"),
    op("Xor"),
];

/// The rule for `op_type`, if TensorRT 10 supports it.
pub fn rule(op_type: &str) -> Option<&'static OpRule> {
    OPS.iter().find(|r| r.op == op_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_without_duplicates() {
        let names: Vec<String> = OPS.iter().map(|r| r.op.to_ascii_lowercase()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            names, sorted,
            "keep OPS alphabetical (case-insensitive) and unique"
        );
    }

    #[test]
    fn every_op_the_exporter_emits_is_listed() {
        // src/ops/*.rs and backend.rs emit exactly these.
        for op in [
            "Add",
            "Cast",
            "Clip",
            "Concat",
            "Constant",
            "ConstantOfShape",
            "Conv",
            "Cos",
            "Div",
            "Exp",
            "Gather",
            "Gemm",
            "Identity",
            "InstanceNormalization",
            "Log",
            "MatMul",
            "Mul",
            "Reshape",
            "Resize",
            "Shape",
            "Sigmoid",
            "Sin",
            "Slice",
            "Softmax",
            "Sqrt",
            "Sub",
            "Transpose",
        ] {
            assert!(rule(op).is_some(), "{op}");
        }
        for op in ["Unique", "StringNormalizer", "SequenceConstruct", "Det"] {
            assert!(rule(op).is_none(), "{op} is not supported by TensorRT 10");
        }
    }
}
