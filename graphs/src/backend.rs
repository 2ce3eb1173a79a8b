//! The one interface every network in `graphs` is written against.
//!
//! A module's `forward` is generic over [`Backend`]: [`crate::CandleBackend`] executes it (with
//! autograd, for training), and the ONNX exporter in `export/` implements the same trait to emit
//! nodes. So there is exactly one definition of each architecture, lowered twice.

use candle_core::Tensor;

/// A named parameter: the safetensors key and the tensor that holds its value.
///
/// During training `t` is the tensor of a `candle_nn::Var`, so gradients reach it; the
/// exporter reads its value and writes it as an initializer under `name`.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub t: Tensor,
}

impl Param {
    pub fn dims(&self) -> &[usize] {
        self.t.dims()
    }
}

/// Element type of a tensor made by [`Backend::full_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    F32,
    /// Class labels (u32 in candle, int32 in ONNX).
    Label,
}

/// Tensor operations the networks, schedules and samplers use. Shapes follow ONNX/numpy
/// conventions (NCHW, numpy broadcasting for binary ops).
pub trait Backend {
    type T: Clone;

    /// 2-D convolution, weight `[out, in, k, k]`, optional bias `[out]`, square stride/padding.
    fn conv2d(
        &self,
        x: &Self::T,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
    ) -> anyhow::Result<Self::T>;
    /// `conv2d(x) + shift` where `shift` broadcasts from `[N, Cout, 1, 1]` (a per-image,
    /// per-channel offset such as a projected embedding): one fused kernel where the backend has
    /// one. `shift` builds that tensor; the default runs it after the conv, so a lowering emits
    /// exactly what the unfused code did.
    fn conv2d_shifted(
        &self,
        x: &Self::T,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
        shift: impl FnOnce(&Self) -> anyhow::Result<Self::T>,
    ) -> anyhow::Result<Self::T>
    where
        Self: Sized,
    {
        let y = self.conv2d(x, w, b, stride, pad)?;
        self.add(&y, &shift(self)?)
    }
    /// `residual + conv2d(x)`: one fused kernel where the backend has one. `residual` builds the
    /// tensor to add; the default runs it after the conv (the unfused order, as above).
    fn conv2d_residual(
        &self,
        x: &Self::T,
        w: &Param,
        b: Option<&Param>,
        stride: usize,
        pad: usize,
        residual: impl FnOnce(&Self) -> anyhow::Result<Self::T>,
    ) -> anyhow::Result<Self::T>
    where
        Self: Sized,
    {
        let y = self.conv2d(x, w, b, stride, pad)?;
        self.add(&residual(self)?, &y)
    }
    /// `x @ w^T + b` on the last axis; `w` is `[out, in]`.
    fn linear(&self, x: &Self::T, w: &Param, b: Option<&Param>) -> anyhow::Result<Self::T>;
    /// GroupNorm over `[N, C, H, W]` with per-channel affine `gamma`, `beta`.
    fn group_norm(
        &self,
        x: &Self::T,
        groups: usize,
        eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> anyhow::Result<Self::T>;
    /// GroupNorm then SiLU (one fused kernel where the backend has one).
    fn group_norm_silu(
        &self,
        x: &Self::T,
        groups: usize,
        eps: f64,
        gamma: &Param,
        beta: &Param,
    ) -> anyhow::Result<Self::T> {
        self.silu(&self.group_norm(x, groups, eps, gamma, beta)?)
    }
    /// LayerNorm over the last axis (biased variance), optional affine `gamma`, `beta` of the
    /// last axis' size (PyTorch's `nn.LayerNorm`; `elementwise_affine=False` passes `None`).
    fn layer_norm(
        &self,
        x: &Self::T,
        eps: f64,
        gamma: Option<&Param>,
        beta: Option<&Param>,
    ) -> anyhow::Result<Self::T>;
    /// `x * sigmoid(x)`.
    fn silu(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    /// `1 / (1 + exp(-x))`.
    fn sigmoid(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))` (PyTorch's `F.gelu` default).
    fn gelu(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn add(&self, a: &Self::T, b: &Self::T) -> anyhow::Result<Self::T>;
    fn sub(&self, a: &Self::T, b: &Self::T) -> anyhow::Result<Self::T>;
    fn mul(&self, a: &Self::T, b: &Self::T) -> anyhow::Result<Self::T>;
    fn div(&self, a: &Self::T, b: &Self::T) -> anyhow::Result<Self::T>;
    /// `x * mul + add` with scalar constants.
    fn affine(&self, x: &Self::T, mul: f64, add: f64) -> anyhow::Result<Self::T>;
    fn exp(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn log(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn sqrt(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn sin(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn cos(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn clamp(&self, x: &Self::T, lo: f64, hi: f64) -> anyhow::Result<Self::T>;
    /// Batched matrix product `[.., M, K] x [.., K, N]`.
    fn matmul(&self, a: &Self::T, b: &Self::T) -> anyhow::Result<Self::T>;
    /// Softmax over the last axis.
    fn softmax_last(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    /// Scaled dot-product attention on `[N, C, L]` queries, keys and values:
    /// `v @ softmax(scale * q^T @ k)^T` (softmax over the keys), `[N, C, L]`. One fused kernel
    /// where the backend has one; the default is the composition of the ops above.
    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        scale: f64,
    ) -> anyhow::Result<Self::T> {
        let qt = self.permute(q, &[0, 2, 1])?; // [N, L, C]
        let scores = self.affine(&self.matmul(&qt, k)?, scale, 0.0)?; // [N, L(q), L(k)]
        let attn = self.softmax_last(&scores)?;
        self.matmul(v, &self.permute(&attn, &[0, 2, 1])?) // [N, C, L(q)]
    }
    /// ONNX Reshape semantics: `0` copies the input's dim, `-1` is inferred.
    fn reshape(&self, x: &Self::T, shape: &[i64]) -> anyhow::Result<Self::T>;
    fn permute(&self, x: &Self::T, perm: &[usize]) -> anyhow::Result<Self::T>;
    /// `len` entries of `axis` starting at `start` (a static slice; e.g. GEGLU's two halves).
    fn narrow(&self, x: &Self::T, axis: usize, start: usize, len: usize)
        -> anyhow::Result<Self::T>;
    /// Nearest-neighbour upsampling by 2 in H and W.
    fn upsample_nearest2x(&self, x: &Self::T) -> anyhow::Result<Self::T>;
    fn concat(&self, xs: &[&Self::T], axis: usize) -> anyhow::Result<Self::T>;
    /// Rows of `table` (`[rows, dim]`) picked by integer `ids` (`[N]`, or any shape `S`) ->
    /// `[N, dim]` (`[S.., dim]`).
    fn embedding(&self, ids: &Self::T, table: &Param) -> anyhow::Result<Self::T>;
    /// A parameter's value as a tensor, e.g. a learned position-embedding table added whole (an
    /// f32 initializer in ONNX, no node).
    fn param_value(&self, p: &Param) -> anyhow::Result<Self::T>;
    /// Entries of a constant f32 table picked by integer `ids` (`[N]`) -> `[N]`.
    fn gather_const(&self, table: &[f32], ids: &Self::T) -> anyhow::Result<Self::T>;
    /// Integer tensor to f32.
    fn to_f32(&self, ids: &Self::T) -> anyhow::Result<Self::T>;
    /// A constant f32 tensor.
    fn constant(&self, values: &[f32], shape: &[usize]) -> anyhow::Result<Self::T>;
    /// A `[N]` tensor filled with `value`, where `N` is the leading (batch) dim of `like`.
    fn full_batch(&self, like: &Self::T, value: f64, kind: Kind) -> anyhow::Result<Self::T>;
    /// Dropout with drop probability `p`; identity when not training (and in every export).
    fn dropout(&self, x: &Self::T, p: f64) -> anyhow::Result<Self::T>;
}
