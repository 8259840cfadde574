//! The [`Decoder`] as the trainer drives it: the [`CausalLm`] contract of ytrainer-core wired to the network
//! (`decoder.rs`), its recomputing forward pass (`recompute.rs`) and its export (`formats/save.rs`). Kept apart so
//! the network itself imports neither recomputation nor file formats.

use burn::prelude::*;
use ytrainer_core::model::{CausalLm, ModelInput, Recompute};

use crate::decoder::{AttnContext, Decoder};
use crate::lora::AdapterSpec;

impl CausalLm for Decoder {
    fn hidden_states(&self, input: &ModelInput) -> Tensor<3> {
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let mut x = crate::decoder::neftune(
            self.embed_tokens.forward(input.input_ids.clone()),
            self.neftune_alpha,
        );
        for layer in &self.layers {
            x = layer.forward(x, &ctx);
        }
        self.norm.forward(x)
    }

    fn hidden_states_at(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Tensor<2> {
        let ctx = AttnContext::new(input, &self.inv_freq, self.spec.sliding_window, true);
        let mut x = crate::decoder::neftune(
            self.embed_tokens.forward(input.input_ids.clone()),
            self.neftune_alpha,
        );
        let Some((last, body)) = self.layers.split_last() else {
            let [b, t, h] = x.dims();
            return self
                .norm
                .forward(x)
                .reshape([b * t, h])
                .select(0, rows.clone());
        };
        for layer in body {
            x = layer.forward(x, &ctx);
        }
        self.top_rows(last, x, &ctx, rows, host_rows)
    }

    fn hidden_states_at_recomputed(
        &self,
        input: &ModelInput,
        rows: &Tensor<1, Int>,
        host_rows: &[usize],
    ) -> Option<(Tensor<2>, Box<dyn Recompute + '_>)> {
        self.forward_recomputed(input, rows, host_rows)
    }

    fn lm_head(&self, hidden: Tensor<2>) -> Tensor<2> {
        hidden.matmul(self.head_weight())
    }

    fn vocab_size(&self) -> usize {
        self.spec.vocab_size
    }

    fn lm_head_weight(&self) -> Option<ytrainer_core::model::LmHeadWeight> {
        use ytrainer_core::lm_loss::HeadLayout;
        // With the adapters off, the base's head when it is trained beside LoRA (`modules_to_save`).
        let (param, layout) = match &self.lm_head {
            Some(head) => (head.param(), HeadLayout::HiddenMajor),
            None => match &self.embed_tokens.original {
                Some(o) if crate::lora::adapters_off() => (o, HeadLayout::VocabMajor),
                _ => (&self.embed_tokens.weight, HeadLayout::VocabMajor),
            },
        };
        let weight = param.val();
        Some(ytrainer_core::model::LmHeadWeight {
            id: param.id,
            trainable: weight.is_require_grad(),
            weight,
            layout,
        })
    }

    fn adapters_disabled<R>(&self, f: impl FnOnce(&Self) -> R) -> Option<R> {
        if let Some(reference) = &self.reference {
            return Some(f(reference));
        }
        matches!(self.adapter, AdapterSpec::Lora(_))
            .then(|| crate::lora::without_adapters(|| f(self)))
    }

    fn export(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
        crate::formats::save::export_trained(self, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSpec, HfConfig, init_random};

    /// The last layer computed at the target rows only gives the same hidden states and the same gradient for
    /// every parameter as the whole layer followed by a selection (Qwen2 and Qwen3, whose q/k norms it also
    /// covers; a packed batch with two segments).
    #[test]
    fn last_layer_at_target_rows_matches_the_full_layer() {
        let device = Device::flex().autodiff();
        for model_type in ["qwen2", "qwen3"] {
            let json = serde_json::json!({
                "model_type": model_type, "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": true,
            });
            let config = HfConfig::from_json_str(&json.to_string()).expect("config");
            let model = init_random(&config, 3, &AdapterSpec::Full, &device).expect("model");
            let (b, t) = (2, 20);
            let ids: Vec<i64> = (0..b * t).map(|i| (i * 7 % 61) as i64).collect();
            let pos: Vec<i64> = (0..b * t)
                .map(|i| (if i < 30 { i % t } else { i - 30 }) as i64)
                .collect();
            let seg: Vec<i64> = (0..b * t).map(|i| if i < 30 { 1 } else { 2 }).collect();
            let int =
                |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, t]), &device);
            let input = ModelInput {
                input_ids: int(ids),
                position_ids: int(pos),
                segment_ids: int(seg),
            };
            // Answer-like targets: the second half of each row, so the fast path applies.
            let host_rows: Vec<usize> = (0..b)
                .flat_map(|r| (11..t).map(move |i| r * t + i))
                .collect();
            let rows = Tensor::<1, Int>::from_data(
                TensorData::new(
                    host_rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                    [host_rows.len()],
                ),
                &device,
            );
            let up = Tensor::<2>::from_data(
                TensorData::new(
                    (0..host_rows.len() * 32)
                        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                        .collect::<Vec<_>>(),
                    [host_rows.len(), 32],
                ),
                &device,
            );
            let got = model.hidden_states_at(&input, &rows, &host_rows);
            let want = model
                .hidden_states(&input)
                .reshape([b * t, 32])
                .select(0, rows.clone());
            let diff = got
                .clone()
                .sub(want.clone())
                .abs()
                .max()
                .into_scalar::<f32>();
            assert!(diff < 1e-5, "{model_type}: hidden states differ by {diff}");
            let g1 = got.mul(up.clone()).sum().backward();
            let g2 = want.mul(up).sum().backward();
            let mut checked = 0;
            for (name, p) in [
                ("embed", model.embed_tokens.weight.val()),
                ("l0.q", model.layers[0].self_attn.q_proj.weight.val()),
                ("l1.q", model.layers[1].self_attn.q_proj.weight.val()),
                ("l1.k", model.layers[1].self_attn.k_proj.weight.val()),
                ("l1.o", model.layers[1].self_attn.o_proj.weight.val()),
                ("l1.down", model.layers[1].mlp.down_proj.weight.val()),
            ] {
                let (a, r) = (p.grad(&g1).expect("grad"), p.grad(&g2).expect("grad"));
                let d = Tensor::<2>::from_inner(a)
                    .sub(Tensor::from_inner(r))
                    .abs()
                    .max()
                    .into_scalar::<f32>();
                assert!(d < 1e-4, "{model_type}: {name} gradient differs by {d}");
                checked += 1;
            }
            assert_eq!(checked, 6);
        }
    }
}
