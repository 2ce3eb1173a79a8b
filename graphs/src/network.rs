//! The network inside a [`crate::Denoiser`]: our class-conditional UNet or a diffusers
//! `UNet2DModel`, behind one interface (raw output at a preconditioned input and a noise
//! conditioning), so preconditioning, samplers, losses and the export never branch on it.

use crate::backend::{Backend, Param};
use crate::cond::NetCond;
use crate::diffusers::{
    ClassEmbed, UNet2DConditionConfig, UNet2DConditionModel, UNet2DConfig, UNet2DModel,
};
use crate::unet::{UNet, UNetConfig};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a checkpoint records about its network (`"unet"` or `"diffusers_unet2d"` in
/// `config.json`'s `model`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkConfig {
    Unet(UNetConfig),
    /// diffusers' own `config.json`, every key as diffusers writes it.
    #[serde(serialize_with = "ser_diffusers", deserialize_with = "de_diffusers")]
    DiffusersUnet2d(UNet2DConfig),
    /// diffusers' `UNet2DConditionModel` `config.json` (text-conditioned: SD / SDXL latents).
    #[serde(serialize_with = "ser_condition", deserialize_with = "de_condition")]
    DiffusersUnet2dCondition(UNet2DConditionConfig),
}

fn ser_condition<S: Serializer>(c: &UNet2DConditionConfig, s: S) -> Result<S::Ok, S::Error> {
    c.to_json().serialize(s)
}

fn de_condition<'de, D: Deserializer<'de>>(d: D) -> Result<UNet2DConditionConfig, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    UNet2DConditionConfig::from_json(&v).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
}

fn ser_diffusers<S: Serializer>(c: &UNet2DConfig, s: S) -> Result<S::Ok, S::Error> {
    c.to_json().serialize(s)
}

fn de_diffusers<'de, D: Deserializer<'de>>(d: D) -> Result<UNet2DConfig, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    UNet2DConfig::from_json(&v).map_err(|e| serde::de::Error::custom(format!("{e:#}")))
}

impl NetworkConfig {
    /// Image channels.
    pub fn channels(&self) -> usize {
        match self {
            Self::Unet(u) => u.channels,
            Self::DiffusersUnet2d(c) => c.in_channels,
            Self::DiffusersUnet2dCondition(c) => c.in_channels,
        }
    }
    /// Square image side (diffusers: `sample_size`, required, checked by [`Self::validate`]).
    pub fn resolution(&self) -> usize {
        match self {
            Self::Unet(u) => u.resolution,
            Self::DiffusersUnet2d(c) => c.sample_size.unwrap_or(0),
            Self::DiffusersUnet2dCondition(c) => c.sample_size.unwrap_or(0),
        }
    }
    /// Classes the labels range over (an unconditional diffusers model: 1, the label ignored).
    pub fn num_classes(&self) -> usize {
        match self {
            Self::Unet(u) => u.num_classes,
            Self::DiffusersUnet2d(c) => match c.class_embed {
                ClassEmbed::Table(n) => n,
                // Refused as denoisers by `validate`: no class count in the network.
                ClassEmbed::None | ClassEmbed::Timestep | ClassEmbed::Identity => 1,
            },
            // Conditioned on text, not classes.
            Self::DiffusersUnet2dCondition(_) => 1,
        }
    }
    /// The label id of "no class" (classifier-free guidance); diffusers models have none.
    pub fn null_class(&self) -> Option<usize> {
        match self {
            Self::Unet(u) => Some(u.null_class()),
            Self::DiffusersUnet2d(_) | Self::DiffusersUnet2dCondition(_) => None,
        }
    }
    /// Whether the network is conditioned on text (prompt embeddings) instead of labels.
    pub fn is_text_conditional(&self) -> bool {
        matches!(self, Self::DiffusersUnet2dCondition(_))
    }
    /// Whether the network reads the labels at all.
    pub fn is_class_conditional(&self) -> bool {
        match self {
            Self::Unet(_) => true,
            Self::DiffusersUnet2d(c) => c.class_embed != ClassEmbed::None,
            Self::DiffusersUnet2dCondition(_) => false,
        }
    }
    /// Channels and side of the bottleneck features (a GAN head's input), and the GroupNorm
    /// group count of the network.
    pub fn bottleneck_shape(&self) -> (usize, usize, usize) {
        match self {
            Self::Unet(u) => {
                let (c, s) = u.bottleneck_shape();
                (c, s, u.groups)
            }
            Self::DiffusersUnet2d(c) => {
                let ch = &c.block_out_channels;
                (
                    ch[ch.len() - 1],
                    self.resolution() >> (ch.len() - 1),
                    c.norm_num_groups,
                )
            }
            Self::DiffusersUnet2dCondition(c) => {
                let ch = &c.block_out_channels;
                (
                    ch[ch.len() - 1],
                    self.resolution() >> (ch.len() - 1),
                    c.norm_num_groups,
                )
            }
        }
    }
    pub fn validate(&self) -> anyhow::Result<()> {
        match self {
            Self::Unet(u) => u.validate(),
            Self::DiffusersUnet2d(c) => {
                c.validate()?;
                anyhow::ensure!(
                    c.sample_size.is_some(),
                    "config.json has no sample_size (a denoiser needs a fixed H = W)"
                );
                anyhow::ensure!(
                    c.in_channels == c.out_channels,
                    "in_channels {} != out_channels {}: not a pixel-space denoiser",
                    c.in_channels,
                    c.out_channels
                );
                anyhow::ensure!(
                    c.class_embed != ClassEmbed::Identity,
                    "class_embed_type \"identity\" takes embeddings, not class labels: not \
                     supported as a teacher"
                );
                anyhow::ensure!(
                    c.class_embed != ClassEmbed::Timestep,
                    "class_embed_type \"timestep\" takes any integer label, so the model has no \
                     class count to sample or evaluate over: not supported as a teacher (use a \
                     num_class_embeds table or an unconditional model)"
                );
                Ok(())
            }
            Self::DiffusersUnet2dCondition(c) => {
                c.validate()?;
                anyhow::ensure!(
                    c.sample_size.is_some(),
                    "config.json has no sample_size (a denoiser needs the latent side)"
                );
                anyhow::ensure!(
                    c.in_channels == c.out_channels,
                    "in_channels {} != out_channels {}: not a latent denoiser",
                    c.in_channels,
                    c.out_channels
                );
                Ok(())
            }
        }
    }
}

/// A text-conditioned diffusers network (`UNet2DConditionModel`) with its parameters by
/// diffusers' keys.
#[derive(Clone, Debug)]
pub struct ConditionNet {
    pub model: UNet2DConditionModel,
    pub params: Vec<Param>,
}

/// A diffusers network with its parameters by diffusers' keys (the model keeps its tensors in
/// its modules; these are the same tensors, for saving and copying).
#[derive(Clone, Debug)]
pub struct DiffusersNet {
    pub model: UNet2DModel,
    pub params: Vec<Param>,
}

#[derive(Clone, Debug)]
pub enum Network {
    Unet(UNet),
    Diffusers(DiffusersNet),
    /// diffusers' `UNet2DConditionModel`: conditioned on [`crate::cond::TextCond`].
    Condition(ConditionNet),
}

impl Network {
    pub fn new(vb: VarBuilder, cfg: &NetworkConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        Ok(match cfg {
            NetworkConfig::Unet(u) => Self::Unet(UNet::new(vb, u)?),
            NetworkConfig::DiffusersUnet2d(c) => {
                let model = UNet2DModel::new(vb.clone(), c)?;
                let mut params = Vec::new();
                for (name, shape) in crate::diffusers::load::expected_params(c)? {
                    let t = vb.get(shape.as_slice(), &name)?;
                    params.push(Param { name, t });
                }
                Self::Diffusers(DiffusersNet { model, params })
            }
            NetworkConfig::DiffusersUnet2dCondition(c) => {
                let model = UNet2DConditionModel::new(vb.clone(), c)?;
                let mut params = Vec::new();
                for (name, shape) in
                    crate::diffusers::unet2d_condition::expected_params_condition(c)?
                {
                    let t = vb.get(shape.as_slice(), &name)?;
                    params.push(Param { name, t });
                }
                Self::Condition(ConditionNet { model, params })
            }
        })
    }

    pub fn config(&self) -> NetworkConfig {
        match self {
            Self::Unet(u) => NetworkConfig::Unet(u.cfg.clone()),
            Self::Diffusers(d) => NetworkConfig::DiffusersUnet2d(d.model.cfg.clone()),
            Self::Condition(d) => NetworkConfig::DiffusersUnet2dCondition(d.model.cfg.clone()),
        }
    }

    fn side(&self) -> usize {
        match self {
            Self::Unet(u) => u.cfg.resolution,
            Self::Diffusers(d) => d.model.cfg.sample_size.unwrap_or(0),
            Self::Condition(d) => d.model.cfg.sample_size.unwrap_or(0),
        }
    }

    /// The raw output at the preconditioned input `x_in` `[N, C, H, W]`, noise conditioning
    /// `c_noise` `[N]` (diffusers: its timestep) and integer labels `[N]` (ignored by an
    /// unconditional diffusers model).
    pub fn forward<B: Backend>(
        &self,
        b: &B,
        x_in: &B::T,
        c_noise: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        self.forward_with(b, x_in, c_noise, NetCond::Labels(labels))
    }

    /// [`Self::forward`] under either condition: labels for the class-conditional networks,
    /// prompt embeddings for a text-conditioned one (each refuses the other, by name).
    pub fn forward_with<B: Backend>(
        &self,
        b: &B,
        x_in: &B::T,
        c_noise: &B::T,
        cond: NetCond<'_, B::T>,
    ) -> anyhow::Result<B::T> {
        match (self, cond) {
            (Self::Unet(u), NetCond::Labels(labels)) => u.forward(b, x_in, c_noise, labels),
            (Self::Diffusers(d), NetCond::Labels(labels)) => {
                let l = d.model.is_class_conditional().then_some(labels);
                d.model.forward(b, x_in, self.side(), c_noise, l)
            }
            (Self::Condition(d), NetCond::Text(t)) => d.model.forward(
                b,
                x_in,
                self.side(),
                c_noise,
                &t.prompt_embeds,
                t.added.as_ref(),
            ),
            (_, c) => Err(Self::wrong_condition(c)),
        }
    }

    /// The refusal of a condition the network does not take (labels vs prompt embeddings).
    fn wrong_condition<T>(c: NetCond<'_, T>) -> anyhow::Error {
        match c {
            NetCond::Labels(_) => anyhow::anyhow!(
                "a UNet2DConditionModel is conditioned on prompt embeddings \
                 (encoder_hidden_states), not class labels: give prompts"
            ),
            NetCond::Text(_) => anyhow::anyhow!(
                "this network is class-conditional (labels); prompt embeddings need a \
                 UNet2DConditionModel"
            ),
        }
    }

    /// The bottleneck features at the preconditioned input (what DMD2's GAN head reads).
    pub fn bottleneck<B: Backend>(
        &self,
        b: &B,
        x_in: &B::T,
        c_noise: &B::T,
        labels: &B::T,
    ) -> anyhow::Result<B::T> {
        self.bottleneck_with(b, x_in, c_noise, NetCond::Labels(labels))
    }

    /// [`Self::bottleneck`] under either condition (labels, or prompt embeddings for a
    /// UNet2DConditionModel: its mid block's output).
    pub fn bottleneck_with<B: Backend>(
        &self,
        b: &B,
        x_in: &B::T,
        c_noise: &B::T,
        cond: NetCond<'_, B::T>,
    ) -> anyhow::Result<B::T> {
        match (self, cond) {
            (Self::Unet(u), NetCond::Labels(labels)) => u.bottleneck(b, x_in, c_noise, labels),
            (Self::Diffusers(d), NetCond::Labels(labels)) => {
                let l = d.model.is_class_conditional().then_some(labels);
                d.model.bottleneck(b, x_in, self.side(), c_noise, l)
            }
            (Self::Condition(d), NetCond::Text(t)) => d.model.bottleneck_hw(
                b,
                x_in,
                (self.side(), self.side()),
                c_noise,
                &t.prompt_embeds,
                t.added.as_ref(),
            ),
            (_, c) => Err(Self::wrong_condition(c)),
        }
    }
}
