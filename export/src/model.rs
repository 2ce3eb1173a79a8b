//! Whole models: the unrolled generator and the bare denoiser, with their metadata.

use crate::builder::{Dim, ElemType, OnnxBackend, IR_VERSION, OPSET};
use crate::metadata::OnnxMetadata;
use crate::proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto};
use anyhow::{ensure, Context, Result};
use graphs::{Denoiser, GeneratorSpec};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

use graphs::Precision;

/// How to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub precision: Precision,
    /// Training method recorded in the metadata: "teacher", "dmd2", "tdm", ...
    pub method: String,
    /// SHA-256 of the checkpoint file; when `None` the metadata records the SHA-256 over the
    /// exported initializers' bytes, in order ([`weights_sha256`]).
    pub weights_sha256: Option<String>,
    /// Extra `metadata_props` entries (appended after the standard ones).
    pub extra_metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Fp32,
            method: "teacher".into(),
            weights_sha256: None,
            extra_metadata: Vec::new(),
        }
    }
}

/// SHA-256 (hex) over the raw bytes of the model's initializers, in graph order.
/// A standalone exported network (a diffusers UNet, the VAE decoder, the text encoder, a
/// text-to-image generator) made into a model: metadata `producer`, `kind`, then `meta`, then
/// `weights_sha256` (of these weights unless `opts` names the checkpoint's) and `opts`' extra
/// entries; checked by the TensorRT lint (`what` names it in the error).
pub(crate) fn finish_model(
    b: OnnxBackend,
    kind: &str,
    outputs: &[(&str, String)],
    mut meta: Vec<(String, String)>,
    opts: &ExportOptions,
    what: &str,
) -> Result<ModelProto> {
    let mut head = vec![
        (
            "producer".to_string(),
            format!("distill {}", env!("CARGO_PKG_VERSION")),
        ),
        ("kind".into(), kind.into()),
    ];
    head.append(&mut meta);
    let mut m = b.into_model(kind, outputs, head)?;
    let sha = opts
        .weights_sha256
        .clone()
        .unwrap_or_else(|| weights_sha256(&m));
    m.metadata_props.push(StringStringEntryProto {
        key: "weights_sha256".into(),
        value: sha,
    });
    for (key, value) in &opts.extra_metadata {
        m.metadata_props.push(StringStringEntryProto {
            key: key.clone(),
            value: value.clone(),
        });
    }
    crate::tensorrt::lint_check(&m, what)?;
    Ok(m)
}

pub fn weights_sha256(model: &ModelProto) -> String {
    let mut h = Sha256::new();
    if let Some(g) = &model.graph {
        for t in &g.initializer {
            h.update(&t.raw_data);
        }
    }
    hex(&h.finalize())
}

/// SHA-256 (lowercase hex) of `bytes`: the one hash helper of the workspace (files, weights,
/// ONNX).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl OnnxBackend {
    /// Finishes the graph: `outputs` are `(graph output name, value)`, each attached through an
    /// Identity node; value_info for every intermediate with a tracked shape.
    pub fn into_model(
        self,
        graph_name: &str,
        outputs: &[(&str, String)],
        metadata: Vec<(String, String)>,
    ) -> Result<ModelProto> {
        let b = self;
        let mut out_infos = Vec::new();
        let mut out_nodes = Vec::new();
        for (name, v) in outputs {
            let info = b.info(v)?;
            ensure!(
                !b.g.borrow().values.contains_key(*name),
                "output name {name} is already a value"
            );
            out_nodes.push(NodeProto {
                input: vec![v.clone()],
                output: vec![name.to_string()],
                name: format!("{name}_output"),
                op_type: "Identity".into(),
                ..Default::default()
            });
            out_infos.push(info.to_proto(name));
        }
        let g = b.take();
        let inits: HashSet<&str> = g.initializers.iter().map(|t| t.name.as_str()).collect();
        let inputs: Vec<_> = g.inputs.iter().map(|n| g.values[n].to_proto(n)).collect();
        let mut value_info = Vec::new();
        for node in &g.nodes {
            for o in &node.output {
                let info = &g.values[o];
                if node.op_type != "Constant"
                    && !inits.contains(o.as_str())
                    && !info.dims.contains(&Dim::Unknown)
                {
                    value_info.push(info.to_proto(o));
                }
            }
        }
        let mut nodes = g.nodes;
        nodes.extend(out_nodes);
        let graph = GraphProto {
            node: nodes,
            name: graph_name.to_string(),
            initializer: g.initializers,
            input: inputs,
            output: out_infos,
            value_info,
            ..Default::default()
        };
        let mut model = ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "distill".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(graph),
            ..Default::default()
        };
        model.metadata_props = metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect();
        Ok(model)
    }
}

fn image_dims(den: &Denoiser) -> [Dim; 4] {
    let (c, r) = den.image_shape();
    [Dim::Batch, Dim::Fixed(c), Dim::Fixed(r), Dim::Fixed(r)]
}

/// Sets the model's metadata from its record, with the weights hash of `opts` (or of the
/// initializers) and `opts`' extra entries.
fn write_metadata(
    model: &mut ModelProto,
    mut rec: OnnxMetadata,
    opts: &ExportOptions,
) -> Result<()> {
    rec.weights_sha256 = opts
        .weights_sha256
        .clone()
        .unwrap_or_else(|| weights_sha256(model));
    rec.weights_sha256_of = if opts.weights_sha256.is_some() {
        "checkpoint file"
    } else {
        "initializer bytes in graph order"
    }
    .into();
    rec.extra = opts.extra_metadata.clone();
    model.metadata_props = rec
        .to_props()?
        .into_iter()
        .map(|(key, value)| StringStringEntryProto { key, value })
        .collect();
    Ok(())
}

/// The deployable generator: `noise` `[batch, C, H, W]` f32 unit Gaussian, `class_labels`
/// `[batch]` int32 (`num_classes` = the null class), plus `noise_1`..`noise_k` `[batch, C, H, W]`
/// when `spec.num_fresh_noise() == k > 0` -> `images` `[batch, C, H, W]` f32 in [-1, 1].
///
/// The graph is [`graphs::generate`] run on an [`OnnxBackend`]: the whole sampler (every step,
/// every guided network evaluation, its sigma constants) unrolled into one graph.
pub fn export_generator(
    den: &Denoiser,
    spec: &GeneratorSpec,
    opts: &ExportOptions,
) -> Result<ModelProto> {
    let b = OnnxBackend::new(opts.precision)?;
    let img = image_dims(den);
    let z = b.input("noise", ElemType::F32, &img)?;
    let labels = b.input("class_labels", ElemType::I32, &[Dim::Batch])?;
    let fresh = (1..=spec.num_fresh_noise())
        .map(|i| b.input(&format!("noise_{i}"), ElemType::F32, &img))
        .collect::<Result<Vec<_>>>()?;
    let out =
        graphs::generate(&b, den, spec, &z, &labels, &fresh).context("lowering the generator")?;
    let mut model = b.into_model("distill_generator", &[("images", out)], vec![])?;
    let rec = OnnxMetadata::new(den, Some(spec), &opts.method, opts.precision);
    write_metadata(&mut model, rec, opts)?;
    // Every export is TensorRT-ready or fails here, before anything is written.
    crate::tensorrt::lint_check(&model, "the exported generator")?;
    Ok(model)
}

/// The bare denoiser, one network evaluation.
///
/// `x` `[batch, C, H, W]`, the level input `[batch]` and `class_labels` `[batch]` int32 -> the
/// output, as [`graphs::DenoiserIo`] names them: EDM and flow `sigma` (f32; flow in sigma-space,
/// `s = sigma / (1 + sigma)`) -> `denoised` (the x0 estimate), VP `timestep` (int32, 0..T) ->
/// `eps` ([`Denoiser::io_forward`]).
pub fn export_denoiser(den: &Denoiser, opts: &ExportOptions) -> Result<ModelProto> {
    let b = OnnxBackend::new(opts.precision)?;
    let io = den.param.denoiser_io();
    let x = b.input("x", ElemType::F32, &image_dims(den))?;
    let level = b.input(io.level, ElemType::of(io.level_kind), &[Dim::Batch])?;
    let labels = b.input("class_labels", ElemType::I32, &[Dim::Batch])?;
    let out = den.io_forward(&b, &x, &level, &labels)?;
    let mut model = b.into_model("distill_denoiser", &[(io.output, out)], vec![])?;
    let rec = OnnxMetadata::new(den, None, &opts.method, opts.precision);
    write_metadata(&mut model, rec, opts)?;
    crate::tensorrt::lint_check(&model, "the exported denoiser")?;
    Ok(model)
}
