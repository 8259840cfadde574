//! Gradient checkpointing: the second forward contract of `CausalLm` (`hidden_states_at_recomputed`, see
//! ytrainer-core's `model.rs`). The body runs without a graph, keeping each layer's input; the
//! backward pass ([`Recomputed`]) re-runs one layer at a time from its input as a leaf, so only one layer's
//! activations live at a time. Separate from `decoder.rs` because it only drives the network's layers from the
//! outside and owns what must match between the two passes (the per-layer dropout seeds).

use burn::prelude::*;
use ytrainer_core::model::{GradSink, ModelInput, Recompute};

use crate::decoder::{AttnContext, Decoder};

impl Decoder {
    /// One device seed per layer when a LoRA branch draws dropout masks, so that recomputing a layer draws the
    /// same masks as its first forward pass did. The seeds come from the device's stream (seeded per optimizer
    /// step by the trainer), so a run stays reproducible and resumable.
    pub fn dropout_seeds(&self, device: &Device) -> Option<Vec<u64>> {
        let dropout = self.layers.iter().any(|l| {
            l.linears()
                .iter()
                .any(|(_, lin)| lin.lora_dropout.is_some())
        });
        if !dropout {
            return None;
        }
        let draws = Tensor::<1>::random(
            [self.layers.len()],
            burn::tensor::Distribution::Uniform(0.0, 1.0),
            device,
        )
        .into_data()
        .convert::<f64>()
        .try_into_vec::<f64>()
        .unwrap_or_default();
        Some(
            (0..self.layers.len())
                .map(|i| {
                    draws
                        .get(i)
                        .map_or(i as u64, |u| (u * 2f64.powi(53)) as u64)
                })
                .collect(),
        )
    }

    /// The forward half of `CausalLm::hidden_states_at_recomputed`: `None` unless recomputation is on and the
    /// model has at least two layers.
    pub(crate) fn forward_recomputed(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<(Tensor<2>, Box<dyn Recompute + '_>)> {
        if !self.recompute || self.layers.len() < 2 {
            return None;
        }
        let device = input.input_ids.device();
        let seeds = self.dropout_seeds(&device);
        let reseed = |i: usize| {
            if let Some(s) = &seeds {
                device.seed(s[i]);
            }
        };
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let (last, body) = self.layers.split_last()?;
        // Below the top layer: no graph at all (frozen copies of the layers on an untracked input), keeping only
        // each layer's input.
        let mut x = crate::decoder::neftune(
            self.embed_tokens
                .clone()
                .no_grad()
                .forward(input.input_ids.clone()),
            self.neftune_alpha,
        );
        let mut inputs = Vec::with_capacity(body.len());
        for (i, layer) in body.iter().enumerate() {
            inputs.push(x.clone());
            reseed(i);
            x = layer.clone().no_grad().forward(x, &ctx).detach();
        }
        // The top layer and the final norm keep their graph, from the top layer's input as a leaf.
        let top = x.require_grad();
        reseed(body.len());
        let y = self.top_rows(last, top.clone(), &ctx, rows, host_rows);
        Some((
            y,
            Box::new(Recomputed {
                model: self,
                ctx,
                input_ids: input.input_ids.clone(),
                inputs,
                top,
                seeds,
            }),
        ))
    }
}

/// What [`Decoder`]'s recomputing forward pass keeps for its backward pass: every layer's input below the top
/// layer, and the top layer's input (the leaf its graph starts from).
struct Recomputed<'a> {
    model: &'a Decoder,
    ctx: AttnContext,
    input_ids: Tensor<2, Int>,
    inputs: Vec<Tensor<3>>,
    top: Tensor<3>,
    seeds: Option<Vec<u64>>,
}

impl Recompute for Recomputed<'_> {
    fn backward(self: Box<Self>, rows: Tensor<2>, grad: Tensor<2>, sink: &mut dyn GradSink) {
        let Recomputed {
            model,
            ctx,
            input_ids,
            inputs,
            top,
            seeds,
        } = *self;
        // d(sum(y * g))/dy = g: each piece's graph is entered with the gradient of its output.
        let mut grads = rows.mul(grad).sum().backward();
        let mut g = top.grad_remove(&mut grads);
        sink.graph(&mut grads);
        drop(grads);
        for (i, x) in inputs.into_iter().enumerate().rev() {
            let Some(gy) = g.take() else { return };
            if let Some(s) = &seeds {
                x.device().seed(s[i]);
            }
            let x = x.require_grad();
            let y = model.layers[i].forward(x.clone(), &ctx);
            let mut grads = y.mul(Tensor::from_inner(gy)).sum().backward();
            g = x.grad_remove(&mut grads);
            sink.graph(&mut grads);
        }
        // The embedding last (trainable only in full fine-tuning): the rows of its gradient the batch's tokens
        // select.
        let weight = &model.embed_tokens.weight;
        if let Some(gx) = g
            && weight.is_require_grad()
        {
            let [b, t, h] = gx.dims();
            let shape = [weight.val().dims()[0], h];
            // The untracked gradient as it came: a tracked tensor would push the accumulator off its host path.
            let rows = gx.reshape([b * t, h]);
            sink.rows(weight.id, input_ids.reshape([b * t]), rows, shape);
        }
    }
}
