//! Evaluation of a model (with an optional adapter) on data files: per data set mean token loss, perplexity,
//! token accuracy and (instruction data) the loss on the supervised tokens only. The numbers come from
//! `ytrainer_core::sft::evaluate`, the function the training loop's periodic eval calls, so a sweep's
//! before / after figures and a run's eval lines are the same measurement. Raw text is cut into fixed-length
//! windows.

use std::path::{Path, PathBuf};

use ytrainer_core::sft;
use ytrainer_data::{
    BatchOptions, ChatTemplate, DataOptions, Mode, RecordKind, TokenizerWrapper, TrainOn,
    load_records, prepare,
};
use ytrainer_models::{Decoder, is_gguf, load_peft_adapter};
use ytrainer_sweep::DatasetEval;

use crate::error::{Context, Result};
use crate::{bail, invalid};

/// Settings shared by `ytrainer eval` and the sweep's before/after evaluation.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    /// Window (tokens) raw text is cut into; also the longest instruction sample (longer ones are truncated).
    pub window: usize,
    /// At most this many windows / samples per data set (0 = all).
    pub max_samples: usize,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
}

/// A loaded model with its tokenizer and chat template, ready to score data sets.
pub struct Evaluator {
    model: Decoder,
    tok: TokenizerWrapper,
    template: Option<ChatTemplate>,
    pad_id: u32,
    device: ytrainer_core::burn::prelude::Device,
    settings: EvalSettings,
}

impl Evaluator {
    /// Loads `model_dir` (a Hugging Face directory or a llama.cpp `.gguf` file, dequantised to f32), with a PEFT
    /// adapter on top when given. The tokenizer and chat template come from the adapter directory when it has
    /// them, else from the model (a GGUF's own metadata).
    pub fn load(model_dir: &Path, adapter: Option<&Path>, settings: EvalSettings) -> Result<Self> {
        let gguf = model_dir.is_file() && is_gguf(model_dir);
        if !gguf && !model_dir.join("config.json").exists() {
            bail!(
                "{}: neither a .gguf file nor a Hugging Face model directory (no config.json); pass the directory \
                 that holds config.json, model.safetensors and tokenizer.json, or a .gguf file",
                model_dir.display()
            );
        }
        let device =
            ytrainer_core::device::select(&settings.device, 0).map_err(|e| invalid!("{e}"))?;
        let (mut model, _) =
            crate::source::inference_model(model_dir, &device, crate::source::inference_base())?;
        if let Some(a) = adapter {
            model = load_peft_adapter(model, a)
                .with_context(|| format!("loading the adapter {}", a.display()))?;
        }
        let own_tokenizer = adapter.filter(|a| a.join("tokenizer.json").exists());
        let (tok, template) = match own_tokenizer {
            Some(dir) => {
                let mut tok = TokenizerWrapper::from_file(&dir.join("tokenizer.json"))?;
                let template = ChatTemplate::from_model_dir(dir).ok().or_else(|| {
                    crate::source::load_tokenizer(model_dir)
                        .ok()
                        .and_then(|t| t.1)
                });
                if let Some(eos) = template.as_ref().and_then(|t| t.eos_token()) {
                    let eos = eos.to_string();
                    tok.set_eos_token(&eos)?;
                }
                (tok, template)
            }
            None => crate::source::load_tokenizer(model_dir)?,
        };
        let pad_id = crate::source::pad_id(&tok);
        Ok(Evaluator {
            model,
            tok,
            template,
            pad_id,
            device,
            settings,
        })
    }

    fn batch(&self) -> BatchOptions {
        BatchOptions {
            seed: 0,
            shuffle: false,
            micro_batch_tokens: 4096.max(self.settings.window),
            max_micro_batch_size: 16,
            tokens_per_step: usize::MAX / 4,
            mode: Mode::OnePass,
            micro_batches_per_step: 0,
            pad_id: self.pad_id,
        }
    }

    fn measure(
        &self,
        records: &[ytrainer_data::Record],
        opts: &DataOptions,
    ) -> Result<(sft::EvalMetrics, usize)> {
        let mut examples = prepare(records, &self.tok, self.template.as_ref(), opts)?.examples;
        if self.settings.max_samples > 0 {
            examples.truncate(self.settings.max_samples);
        }
        let m = sft::evaluate(
            &self.model,
            &examples,
            &self.batch(),
            [0.2, 4.0, 15.0],
            &self.device,
            0,
        )
        .ok_or_else(|| invalid!("nothing to evaluate"))?;
        Ok((m, examples.len()))
    }

    /// Scores one data file.
    pub fn evaluate_file(&self, path: &Path) -> Result<DatasetEval> {
        let loaded = load_records(path)?;
        let chat = loaded
            .records
            .iter()
            .any(|r| matches!(r.kind, RecordKind::Chat { .. }));
        let base = DataOptions {
            max_seq_len: self.settings.window,
            ..DataOptions::default()
        };
        let data = path.display().to_string();
        if !chat {
            // Raw text: every paragraph tokenized with EOS, concatenated, cut into windows of `window` tokens.
            if self.tok.eos_id().is_none() {
                bail!(
                    "{}: the tokenizer has no EOS token (no chat template names one), needed to join text \
                     documents",
                    path.display()
                );
            }
            let opts = DataOptions {
                cpt: true,
                train_on: TrainOn::Everything,
                ..base
            };
            let (m, n) = self
                .measure(&loaded.records, &opts)
                .with_context(|| data.clone())?;
            return Ok(DatasetEval {
                data,
                kind: "text".into(),
                loss: m.eval_loss,
                perplexity: m.eval_perplexity,
                token_accuracy: m.eval_token_accuracy,
                tokens: m.eval_tokens,
                supervised_loss: None,
                supervised_token_accuracy: None,
                supervised_tokens: None,
                samples: n,
            });
        }
        let all = DataOptions {
            train_on: TrainOn::Everything,
            ..base.clone()
        };
        let sup = DataOptions {
            train_on: TrainOn::AllAssistant,
            ..base
        };
        let (a, n) = self
            .measure(&loaded.records, &all)
            .with_context(|| data.clone())?;
        let (s, _) = self
            .measure(&loaded.records, &sup)
            .with_context(|| data.clone())?;
        Ok(DatasetEval {
            data,
            kind: "instruction".into(),
            loss: a.eval_loss,
            perplexity: a.eval_perplexity,
            token_accuracy: a.eval_token_accuracy,
            tokens: a.eval_tokens,
            supervised_loss: Some(s.eval_loss),
            supervised_token_accuracy: Some(s.eval_token_accuracy),
            supervised_tokens: Some(s.eval_tokens),
            samples: n,
        })
    }

    /// Scores several files.
    pub fn evaluate_files(&self, files: &[PathBuf]) -> Result<Vec<DatasetEval>> {
        files.iter().map(|f| self.evaluate_file(f)).collect()
    }
}
