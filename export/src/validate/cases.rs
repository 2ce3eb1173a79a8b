//! Seeded validation cases: ONNX inputs and the candle reference output.

use super::Target;
use crate::runtime::TensorData;
use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use graphs::{CandleBackend, Denoiser, TrainingLevel};
use ndarray::ArrayD;
use rand::{rngs::StdRng, Rng};
use rand_distr::StandardNormal;

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// One seeded case: ONNX inputs by name, the candle reference output (flattened) and, when an f64
/// twin of the denoiser was given, the reference's f32 round-off: `max |f32 - f64|` of the same
/// graph on the same inputs.
pub(super) struct Case {
    pub inputs: Vec<(String, TensorData)>,
    pub reference: Vec<f32>,
    pub roundoff: Option<f64>,
}

/// One seeded case: ONNX inputs, the candle reference output and (with `den64`) its round-off.
pub(super) fn make_case(
    den: &Denoiser,
    den64: Option<&Denoiser>,
    target: Target,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Case> {
    match target {
        Target::TextToImage {
            t2i,
            sampler,
            steps,
            cfg_scale,
        } => return text_case(t2i, TextGen::Teacher(sampler, steps, cfg_scale), batch, rng),
        Target::TextStudent { t2i, sigmas } => {
            return text_case(t2i, TextGen::Student(sigmas), batch, rng)
        }
        Target::TextUnet(t2i) => return text_unet_case(t2i, batch, rng),
        Target::TextEncoder(p) => return text_encoder_case(p, batch, rng),
        Target::Generator(_) | Target::Denoiser => {}
    }
    let (c, r) = den.image_shape();
    let num_classes = den.num_classes();
    let shape = [batch, c, r, r];
    let n = batch * c * r * r;
    let dev = Device::Cpu;
    let cb = CandleBackend::new(&dev);
    let cb64 = CandleBackend::f64_reference(&dev);
    let f64_of = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.gen_range(0..num_classes as u32))
        .collect();
    let labels_t = Tensor::from_vec(labels.clone(), batch, &dev)?;
    let labels_in = TensorData::I32(ArrayD::from_shape_vec(
        vec![batch],
        labels.iter().map(|&l| l as i32).collect(),
    )?);
    let img = |v: &Vec<f32>| -> Result<(Tensor, TensorData)> {
        Ok((
            Tensor::from_vec(v.clone(), &shape, &dev)?,
            TensorData::F32(ArrayD::from_shape_vec(shape.to_vec(), v.clone())?),
        ))
    };
    let (inputs, out, out64) = match target {
        Target::Generator(spec) => {
            let (z, z_in) = img(&normal(rng, n))?;
            let mut inputs = vec![
                ("noise".to_string(), z_in),
                ("class_labels".to_string(), labels_in),
            ];
            let mut fresh = Vec::new();
            for i in 1..=spec.num_fresh_noise() {
                let (t, t_in) = img(&normal(rng, n))?;
                fresh.push(t);
                inputs.push((format!("noise_{i}"), t_in));
            }
            let y = graphs::generate(&cb, den, spec, &z, &labels_t, &fresh)?;
            let y64 = match den64 {
                Some(d) => {
                    let fresh64 = fresh.iter().map(f64_of).collect::<Result<Vec<_>, _>>()?;
                    Some(graphs::generate(
                        &cb64,
                        d,
                        spec,
                        &f64_of(&z)?,
                        &labels_t,
                        &fresh64,
                    )?)
                }
                None => None,
            };
            (inputs, y, y64)
        }
        Target::Denoiser => {
            let io = den.param.denoiser_io();
            let level = den.param.draw_check_level(rng, batch);
            let sigma = den.param.level_sigmas(&level)?;
            let eps = normal(rng, n);
            let x0 = normal(rng, n);
            let per = n / batch;
            let x: Vec<f32> = (0..n)
                .map(|i| 0.5 * x0[i] + sigma[i / per] * eps[i])
                .collect();
            let (xt, x_in) = img(&x)?;
            let level_t = level.to_tensor(&dev)?;
            let y = den.io_forward(&cb, &xt, &level_t, &labels_t)?;
            let level64 = if level_t.dtype() == candle_core::DType::F32 {
                f64_of(&level_t)?
            } else {
                level_t.clone()
            };
            let y64 = match den64 {
                Some(d) => Some(d.io_forward(&cb64, &f64_of(&xt)?, &level64, &labels_t)?),
                None => None,
            };
            let level_in = match level {
                TrainingLevel::Sigma(s) => TensorData::F32(ArrayD::from_shape_vec(vec![batch], s)?),
                TrainingLevel::Timestep(t) => TensorData::I32(ArrayD::from_shape_vec(
                    vec![batch],
                    t.iter().map(|&v| v as i32).collect(),
                )?),
                // The bare flow denoiser takes sigma-space levels (`draw_check_level` draws sigmas).
                TrainingLevel::FlowTime(_) => {
                    anyhow::bail!("the exported denoiser takes sigmas, not flow times")
                }
            };
            let inputs = vec![
                ("x".to_string(), x_in),
                (io.level.to_string(), level_in),
                ("class_labels".to_string(), labels_in),
            ];
            (inputs, y, y64)
        }
        Target::TextToImage { .. }
        | Target::TextStudent { .. }
        | Target::TextUnet(_)
        | Target::TextEncoder(_) => {
            anyhow::bail!("text targets are made by text_case / text_encoder_case")
        }
    };
    let reference: Vec<f32> = out
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    ensure!(
        reference.len() == n,
        "reference output has {} values, expected {n}",
        reference.len()
    );
    let roundoff = match out64 {
        Some(y) => {
            let y: Vec<f64> = y
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            ensure!(
                y.len() == n,
                "f64 reference has {} values, expected {n}",
                y.len()
            );
            Some(
                reference
                    .iter()
                    .zip(&y)
                    .map(|(&a, &b)| (a as f64 - b).abs())
                    .fold(0.0, super::metrics::nan_max),
            )
        }
        None => None,
    };
    Ok(Case {
        inputs,
        reference,
        roundoff,
    })
}

/// Token ids `[batch, max_length]` drawn from the seed: a begin token, 1..max_length-1 random
/// ids, the end-of-text token, then the padding (what a tokenized prompt looks like; the pad token
/// is the end-of-text one for SD's tokenizer, `!` for SDXL's second).
fn draw_ids(
    p: &graphs::transformers::PromptEncoder,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Vec<u32>> {
    let l = p.tokenizer.max_length;
    let vocab = p.model.cfg.vocab_size as u32;
    // The empty prompt's ids: the begin token, then the padding.
    let empty = p.tokenizer.encode("")?;
    let (bos, eos, pad) = (empty[0], empty[1], empty[l - 1]);
    let mut ids = Vec::with_capacity(batch * l);
    for _ in 0..batch {
        let k = rng.gen_range(1..l);
        ids.push(bos);
        for j in 1..l {
            ids.push(match j.cmp(&k) {
                std::cmp::Ordering::Less => rng.gen_range(0..vocab),
                std::cmp::Ordering::Equal => eos,
                std::cmp::Ordering::Greater => pad,
            });
        }
    }
    Ok(ids)
}

fn ids_input(ids: &[u32], batch: usize, l: usize) -> Result<TensorData> {
    Ok(TensorData::I32(ArrayD::from_shape_vec(
        vec![batch, l],
        ids.iter().map(|&v| v as i32).collect(),
    )?))
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// Seeded token ids for each of the pipeline's tokenizers (`[batch * seq_len]` each; SDXL: the
/// second drawn after the first).
fn pipeline_ids(
    t2i: &graphs::diffusers::TextToImage,
    batch: usize,
    rng: &mut StdRng,
) -> Result<(Vec<u32>, Option<Vec<u32>>)> {
    let ids = draw_ids(&t2i.prompts, batch, rng)?;
    let ids_2 = match &t2i.sdxl {
        Some(s) => Some(draw_ids(&s.prompts_2, batch, rng)?),
        None => None,
    };
    Ok((ids, ids_2))
}

/// The pipeline's `(prompt_embeds, pooled)` for drawn ids.
fn embed(
    t2i: &graphs::diffusers::TextToImage,
    ids: &[u32],
    ids_2: Option<&Vec<u32>>,
    batch: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let dev = Device::Cpu;
    let cb = CandleBackend::new(&dev);
    let l = t2i.seq_len();
    let ids_t = Tensor::from_vec(ids.to_vec(), (batch, l), &dev)?;
    let ids_2 = match ids_2 {
        Some(v) => Some(Tensor::from_vec(v.clone(), (batch, l), &dev)?),
        None => None,
    };
    t2i.embed_ids(&cb, &ids_t, ids_2.as_ref())
}

fn f32_input(t: &Tensor) -> Result<TensorData> {
    Ok(TensorData::F32(ArrayD::from_shape_vec(
        t.dims().to_vec(),
        flat(t)?,
    )?))
}

/// How a text-to-image generator samples: a teacher's sampler (kind, steps, CFG scale against the
/// empty prompt) or a student's steps at its sigmas.
#[derive(Clone, Copy)]
enum TextGen<'a> {
    Teacher(graphs::SamplerKind, usize, f64),
    Student(&'a [f64]),
}

/// The SDXL added conditions for pooled embeddings, `None` for SD.
fn added_cond(
    t2i: &graphs::diffusers::TextToImage,
    pooled: Option<Tensor>,
    batch: usize,
) -> Result<Option<graphs::cond::AddedCond<Tensor>>> {
    let cb = CandleBackend::new(&Device::Cpu);
    Ok(match (pooled, t2i.time_ids(&cb, batch)?) {
        (Some(text_embeds), Some(time_ids)) => Some(graphs::cond::AddedCond {
            text_embeds,
            time_ids,
        }),
        _ => None,
    })
}

/// A text-to-image generator case: seeded noise and the prompt embeddings of seeded token ids
/// (SDXL: with their pooled embeddings and the pipeline's time ids).
fn text_case(
    t2i: &graphs::diffusers::TextToImage,
    gen: TextGen,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Case> {
    let dev = Device::Cpu;
    let cb = CandleBackend::new(&dev);
    let (ids, ids_2) = pipeline_ids(t2i, batch, rng)?;
    let (pe, pooled) = embed(t2i, &ids, ids_2.as_ref(), batch)?;
    let (c, r) = t2i.latent_shape();
    let shape = [batch, c, r, r];
    let z = normal(rng, batch * c * r * r);
    let zt = Tensor::from_vec(z.clone(), &shape, &dev)?;
    let added = added_cond(t2i, pooled, batch)?;
    let text = graphs::TextCond {
        prompt_embeds: pe.clone(),
        added: added.clone(),
    };
    let lat = match gen {
        TextGen::Teacher(kind, steps, scale) => {
            let cond = graphs::Cond::Text {
                cond: text,
                uncond: Some(t2i.uncond(&cb, batch)?),
            };
            t2i.latents(&cb, &zt, &cond, kind, steps, scale)?
        }
        TextGen::Student(sigmas) => graphs::sampler::student_x0(
            &cb,
            &t2i.den,
            &zt,
            graphs::cond::NetCond::Text(&text),
            sigmas,
        )?,
    };
    let y = t2i.decode(&cb, &lat)?;
    let mut inputs = vec![
        (
            "noise".to_string(),
            TensorData::F32(ArrayD::from_shape_vec(shape.to_vec(), z)?),
        ),
        ("prompt_embeds".to_string(), f32_input(&pe)?),
    ];
    if let Some(a) = &added {
        inputs.push((
            "pooled_prompt_embeds".to_string(),
            f32_input(&a.text_embeds)?,
        ));
        inputs.push(("time_ids".to_string(), f32_input(&a.time_ids)?));
    }
    Ok(Case {
        inputs,
        reference: flat(&y)?,
        roundoff: None,
    })
}

/// A bare UNet case: a seeded latent `sample`, a `timestep` in the training range 0..1000 of
/// diffusers' VP schedulers, and the prompt embeddings (SDXL: pooled embeddings as `text_embeds`
/// and the pipeline's `time_ids`) of seeded token ids, so the attention sees real text states.
fn text_unet_case(
    t2i: &graphs::diffusers::TextToImage,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Case> {
    let dev = Device::Cpu;
    let cb = CandleBackend::new(&dev);
    let graphs::Network::Condition(net) = &t2i.den.net else {
        anyhow::bail!(
            "{}: the UNet is not a UNet2DConditionModel",
            t2i.dir.display()
        );
    };
    let (ids, ids_2) = pipeline_ids(t2i, batch, rng)?;
    let (pe, pooled) = embed(t2i, &ids, ids_2.as_ref(), batch)?;
    let (c, r) = t2i.latent_shape();
    let shape = [batch, c, r, r];
    let z = normal(rng, batch * c * r * r);
    let ts: Vec<f32> = (0..batch).map(|_| rng.gen_range(0.0f32..1000.0)).collect();
    let zt = Tensor::from_vec(z.clone(), &shape, &dev)?;
    let tt = Tensor::from_vec(ts.clone(), batch, &dev)?;
    let added = added_cond(t2i, pooled, batch)?;
    let y = net
        .model
        .forward_hw(&cb, &zt, (r, r), &tt, &pe, added.as_ref())?;
    let mut inputs = vec![
        (
            "sample".to_string(),
            TensorData::F32(ArrayD::from_shape_vec(shape.to_vec(), z)?),
        ),
        (
            "timestep".to_string(),
            TensorData::F32(ArrayD::from_shape_vec(vec![batch], ts)?),
        ),
        ("encoder_hidden_states".to_string(), f32_input(&pe)?),
    ];
    if let Some(a) = &added {
        inputs.push(("text_embeds".to_string(), f32_input(&a.text_embeds)?));
        inputs.push(("time_ids".to_string(), f32_input(&a.time_ids)?));
    }
    Ok(Case {
        inputs,
        reference: flat(&y)?,
        roundoff: None,
    })
}

/// A prompt encoder case: seeded token ids -> `last_hidden_state` (SDXL: `prompt_embeds` then
/// `pooled_prompt_embeds`, flattened one after the other as the outputs are compared).
fn text_encoder_case(
    t2i: &graphs::diffusers::TextToImage,
    batch: usize,
    rng: &mut StdRng,
) -> Result<Case> {
    let l = t2i.seq_len();
    let (ids, ids_2) = pipeline_ids(t2i, batch, rng)?;
    let mut inputs = vec![("input_ids".to_string(), ids_input(&ids, batch, l)?)];
    if let Some(v) = &ids_2 {
        inputs.push(("input_ids_2".to_string(), ids_input(v, batch, l)?));
    }
    let (h, pooled) = embed(t2i, &ids, ids_2.as_ref(), batch)?;
    let mut reference = flat(&h)?;
    if let Some(p) = pooled {
        reference.extend(flat(&p)?);
    }
    Ok(Case {
        inputs,
        reference,
        roundoff: None,
    })
}
