//! Text generation with a KV cache (`ytrainer_models::generate`): prompts as text, chat messages or exact
//! token ids; the ids generation stops at; one-off generations and a multi-turn conversation that keeps its
//! cache between turns. Text is streamed through a callback as it is produced, so a front end decides where it
//! goes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use ytrainer_data::Message;
use ytrainer_models::generate::{Generator, Sampler, SamplingOptions, generate_with};

use crate::error::{Context, Result};
use crate::source::{Loaded, inference_device, load_for_inference};
use crate::{bail, invalid};

/// How tokens are chosen; shared by one-off generation and chat.
#[derive(Debug, Clone)]
pub struct SamplingSettings {
    /// 0 = greedy.
    pub temperature: f64,
    /// Keep the K most likely tokens (0 = all).
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    pub top_p: f64,
    /// Penalty on tokens already in the context (1.0 = off; transformers' definition).
    pub repetition_penalty: f64,
    /// Maximum number of new tokens.
    pub max_new_tokens: usize,
    /// Sampling seed.
    pub seed: u64,
}

impl SamplingSettings {
    /// The sampler's options, after checking the ranges (checked before the model loads, so a typo costs
    /// nothing).
    pub fn options(&self) -> Result<SamplingOptions> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature must be >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "--repetition-penalty must be > 0, got {}",
                self.repetition_penalty
            );
        }
        Ok(SamplingOptions {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        })
    }
}

/// Sampling values given on the command line; `None` takes the model's `generation_config.json`, then the
/// built-in default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingFlags {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub seed: u64,
}

/// The sampling fields of a model directory's `generation_config.json` (what transformers' `generate` starts
/// from). Absent file or field: `None`.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// `generation_config.json` of `model` (a directory; a `.gguf` file has none). A file that does not parse is
    /// an error naming it.
    pub fn of_model(model: &Path) -> Result<GenerationConfig> {
        let path = model.join("generation_config.json");
        if !model.is_dir() || !path.is_file() {
            return Ok(GenerationConfig::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            invalid!(
                "{}: {e}; fix the file or delete it (sampling flags do not need it)",
                path.display()
            )
        })
    }
}

impl SamplingFlags {
    /// The settings as transformers resolves them: a flag wins; else the model's `generation_config.json`
    /// (`do_sample = false` or absent means greedy, as in transformers; with `do_sample = true` temperature
    /// defaults to 1.0 and top-k to 50, transformers' defaults); else greedy, top-p 1, no penalty, 256 new
    /// tokens. Returns the settings and, for each value taken from the file, its name.
    pub fn resolve(&self, file: &GenerationConfig) -> (SamplingSettings, Vec<&'static str>) {
        let sample = file.do_sample == Some(true);
        let mut from_file = Vec::new();
        let mut pick = |flag: Option<f64>, value: Option<f64>, name: &'static str, default: f64| {
            flag.unwrap_or_else(|| match value {
                Some(v) => {
                    from_file.push(name);
                    v
                }
                None => default,
            })
        };
        let temperature = match (self.temperature, sample) {
            (Some(t), _) => t,
            (None, true) => pick(None, file.temperature, "temperature", 1.0),
            (None, false) => 0.0,
        };
        let top_p = pick(self.top_p, file.top_p, "top_p", 1.0);
        let repetition_penalty = pick(
            self.repetition_penalty,
            file.repetition_penalty,
            "repetition_penalty",
            1.0,
        );
        let top_k = self.top_k.unwrap_or_else(|| match file.top_k {
            Some(k) => {
                from_file.push("top_k");
                k
            }
            None if sample => 50,
            None => 0,
        });
        let max_new_tokens = self
            .max_new_tokens
            .unwrap_or_else(|| match file.max_new_tokens {
                Some(n) => {
                    from_file.push("max_new_tokens");
                    n
                }
                None => 256,
            });
        if sample && self.temperature.is_none() {
            from_file.push("do_sample");
        }
        (
            SamplingSettings {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                max_new_tokens,
                seed: self.seed,
            },
            from_file,
        )
    }
}

impl SamplingSettings {
    /// One line for people: `greedy` or `temperature 0.7, top-k 50, top-p 0.9`, with the penalty and length.
    pub fn describe(&self) -> String {
        let how = if self.temperature <= 0.0 || self.top_k == 1 {
            "greedy".to_string()
        } else {
            format!(
                "temperature {}, top-k {}, top-p {}",
                self.temperature,
                if self.top_k == 0 {
                    "off".to_string()
                } else {
                    self.top_k.to_string()
                },
                self.top_p
            )
        };
        format!(
            "{how}, repetition penalty {}, at most {} new tokens",
            self.repetition_penalty, self.max_new_tokens
        )
    }
}

/// Everything `ytrainer generate` needs.
#[derive(Debug, Clone)]
pub struct GenerateSettings {
    /// Hugging Face model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    pub adapter: Option<PathBuf>,
    /// Prompt texts.
    pub prompts: Vec<String>,
    /// File of more prompts: one per line (.txt) or JSON lines with a "prompt" field (.jsonl, .json).
    pub prompts_file: Option<PathBuf>,
    /// One prompt as exact token ids (comes first when given).
    pub prompt_ids: Vec<u32>,
    /// Wrap each text prompt as a user message in the model's chat template (with the generation prompt).
    pub chat: bool,
    /// System message when `chat` is on.
    pub system: Option<String>,
    /// Template variables when `chat` is on.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// How tokens are chosen.
    pub sampling: SamplingSettings,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
}

/// Everything `ytrainer chat` needs.
#[derive(Debug, Clone)]
pub struct ChatSettings {
    /// Hugging Face model directory or `.gguf` file.
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    pub adapter: Option<PathBuf>,
    /// System message, kept across resets.
    pub system: Option<String>,
    /// Template variables.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// How tokens are chosen.
    pub sampling: SamplingSettings,
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
    pub device: String,
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The new ids, the stop token included when one ended it.
    pub ids: Vec<u32>,
    /// The new text without special tokens.
    pub text: String,
    /// Seconds from the start to the first new token (the prefill).
    pub prefill_seconds: f64,
    /// Seconds after the first new token.
    pub decode_seconds: f64,
}

impl Generated {
    /// Decoding speed; the first token is left out because its time is the prefill's.
    pub fn tokens_per_second(&self) -> f64 {
        if self.ids.len() > 1 {
            (self.ids.len() - 1) as f64 / self.decode_seconds.max(1e-9)
        } else {
            0.0
        }
    }
}

/// A prompt ready for generation.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// As given (the decoded ids for an id prompt).
    pub text: String,
    /// Its token ids (after the chat template when `chat` is on).
    pub ids: Vec<u32>,
}

/// The JSON line `ytrainer generate --json` prints for prompt `index`.
pub fn generation_json(index: usize, prompt: &Prompt, out: &Generated) -> serde_json::Value {
    json!({"index": index, "prompt": prompt.text, "prompt_ids": prompt.ids, "output_ids": out.ids,
           "text": out.text, "new_tokens": out.ids.len(),
           "prefill_seconds": out.prefill_seconds, "tokens_per_second": out.tokens_per_second()})
}

/// A model loaded for generation with the ids it stops at.
pub struct GenModel {
    loaded: Loaded,
    stop: Vec<u32>,
    sampling: SamplingSettings,
    vars: serde_json::Map<String, serde_json::Value>,
}

impl GenModel {
    fn load(
        model: &Path,
        adapter: Option<&Path>,
        device: &ytrainer_core::burn::prelude::Device,
        sampling: &SamplingSettings,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self> {
        let loaded = load_for_inference(model, adapter, device)?;
        let stop = stop_ids(&loaded);
        Ok(GenModel {
            loaded,
            stop,
            sampling: sampling.clone(),
            vars: vars.clone(),
        })
    }

    /// Generates after `prompt` with a fresh cache, streaming the text to `on_text` when given.
    pub fn generate(
        &self,
        prompt: &[u32],
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Generated> {
        let mut g = Generator::new(&self.loaded.model);
        self.stream(&mut g, prompt, on_text)
    }

    /// Generates after `prompt`, streaming decoded text to `on_text` when given.
    fn stream(
        &self,
        g: &mut Generator<'_>,
        prompt: &[u32],
        mut on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Generated> {
        let (l, stop) = (&self.loaded, &self.stop);
        let mut sampler = Sampler::new(self.sampling.options()?);
        let start = Instant::now();
        let mut first: Option<Instant> = None;
        let mut new_ids: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let ids = generate_with(
            g,
            prompt,
            self.sampling.max_new_tokens,
            stop,
            &mut sampler,
            |id| {
                first.get_or_insert_with(Instant::now);
                new_ids.push(id);
                if let Some(f) = on_text.as_deref_mut()
                    && !stop.contains(&id)
                {
                    let text = l.tok.decode(&new_ids, false).unwrap_or_default();
                    // Hand over only complete characters (a byte-level token may end inside one).
                    if text.len() > printed && !text.ends_with('\u{fffd}') {
                        f(&text[printed..]);
                        printed = text.len();
                    }
                }
            },
        );
        let prefill_seconds = first.map(|f| (f - start).as_secs_f64()).unwrap_or(0.0);
        let decode_seconds = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
        let text = l.tok.decode(&ids, true)?;
        Ok(Generated {
            ids,
            text,
            prefill_seconds,
            decode_seconds,
        })
    }

    fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let t = self.loaded.template.as_ref().ok_or_else(|| {
            invalid!("the model has no chat template; drop --chat or add chat_template.jinja")
        })?;
        let text = t.render(messages, true, &self.vars)?;
        Ok(self.loaded.tok.encode(&text)?)
    }
}

/// Ids generation stops after: the config's EOS ids, the tokenizer's EOS and the usual end-of-turn tokens.
fn stop_ids(l: &Loaded) -> Vec<u32> {
    let mut ids = l.config.eos_token_ids();
    ids.extend(l.tok.eos_id());
    for t in [
        "<|im_end|>",
        "<|eot_id|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
    ] {
        if let Some(id) = l.tok.token_to_id(t)
            && (l
                .template
                .as_ref()
                .is_some_and(|tp| tp.source().contains(t))
                || ids.contains(&id))
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Prompts from a file: one per non-empty line, or the "prompt" field of each JSON line.
fn read_prompts_file(p: &Path, prompts: &mut Vec<String>) -> Result<()> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let is_jsonl = p.extension().is_some_and(|e| e == "jsonl" || e == "json");
        if is_jsonl {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON object", p.display(), i + 1))?;
            let s = v["prompt"].as_str().with_context(|| {
                format!("{}:{}: no string field \"prompt\"", p.display(), i + 1)
            })?;
            prompts.push(s.to_string());
        } else {
            prompts.push(line.to_string());
        }
    }
    Ok(())
}

/// A model with the prompts of one `ytrainer generate` call, tokenized.
pub struct Generation {
    model: GenModel,
    prompts: Vec<Prompt>,
}

impl Generation {
    /// Checks the settings, reads the prompts, loads the model and tokenizes the prompts. Everything that
    /// needs no model is checked before it loads.
    pub fn load(s: &GenerateSettings) -> Result<Self> {
        let device = inference_device(&s.device)?;
        s.sampling.options()?;
        let mut texts = s.prompts.clone();
        if let Some(p) = &s.prompts_file {
            read_prompts_file(p, &mut texts)?;
        }
        if texts.is_empty() && s.prompt_ids.is_empty() {
            bail!(
                "nothing to generate from: give --prompt TEXT, --prompts-file F or --prompt-ids 1,2,3"
            );
        }
        let model = GenModel::load(
            &s.model,
            s.adapter.as_deref(),
            &device,
            &s.sampling,
            &s.vars,
        )?;
        let l = &model.loaded;
        let mut prompts = Vec::new();
        if !s.prompt_ids.is_empty() {
            let vocab = l.model.spec.vocab_size;
            if let Some(bad) = s.prompt_ids.iter().find(|&&id| id as usize >= vocab) {
                bail!("--prompt-ids: token id {bad} is outside the vocabulary (size {vocab})");
            }
            prompts.push(Prompt {
                text: l.tok.decode(&s.prompt_ids, false)?,
                ids: s.prompt_ids.clone(),
            });
        }
        for p in texts {
            let ids = if s.chat {
                let mut m = Vec::new();
                if let Some(sys) = &s.system {
                    m.push(Message::new("system", sys));
                }
                m.push(Message::new("user", &p));
                model.chat_prompt(&m)?
            } else {
                l.tok.encode(&p)?
            };
            if ids.is_empty() {
                bail!("prompt {p:?} tokenizes to nothing");
            }
            prompts.push(Prompt { text: p, ids });
        }
        Ok(Generation { model, prompts })
    }

    /// The prompts, in the order they are generated from.
    pub fn prompts(&self) -> &[Prompt] {
        &self.prompts
    }

    /// Generates after prompt `index` with a fresh cache, streaming the text to `on_text` when given.
    pub fn generate(
        &self,
        index: usize,
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<Generated> {
        let p = self.prompts.get(index).with_context(|| {
            format!(
                "prompt {index} does not exist ({} prompts)",
                self.prompts.len()
            )
        })?;
        self.model.generate(&p.ids, on_text)
    }
}

/// A model loaded for `ytrainer chat`.
pub struct ChatModel {
    model: GenModel,
    system: Option<String>,
}

impl ChatModel {
    /// Checks the sampling settings, loads the model and insists on a chat template.
    pub fn load(s: &ChatSettings) -> Result<Self> {
        let device = inference_device(&s.device)?;
        s.sampling.options()?;
        let model = GenModel::load(
            &s.model,
            s.adapter.as_deref(),
            &device,
            &s.sampling,
            &s.vars,
        )?;
        if model.loaded.template.is_none() {
            bail!(
                "{}: the model has no chat template; use `ytrainer generate` for raw prompts",
                s.model.display()
            );
        }
        Ok(ChatModel {
            model,
            system: s.system.clone(),
        })
    }

    /// A new conversation (only the system message, when there is one).
    pub fn conversation(&self) -> Conversation<'_> {
        let mut messages = Vec::new();
        if let Some(s) = &self.system {
            messages.push(Message::new("system", s));
        }
        Conversation {
            model: &self.model,
            generator: Generator::new(&self.model.loaded.model),
            messages,
        }
    }
}

/// A multi-turn conversation. One cache serves all turns: each turn recomputes only what follows the prefix it
/// shares with the last one.
pub struct Conversation<'a> {
    model: &'a GenModel,
    generator: Generator<'a>,
    messages: Vec<Message>,
}

impl Conversation<'_> {
    /// Adds a user turn and generates the reply, streaming its text to `on_text`; the reply (trimmed) joins the
    /// history.
    pub fn turn(&mut self, user: &str, on_text: &mut dyn FnMut(&str)) -> Result<Generated> {
        self.messages.push(Message::new("user", user));
        let prompt = self.model.chat_prompt(&self.messages)?;
        let out = self
            .model
            .stream(&mut self.generator, &prompt, Some(on_text))?;
        self.messages
            .push(Message::new("assistant", out.text.trim()));
        Ok(out)
    }

    /// Forgets every turn but the system message (the cache is kept; the next prompt reuses what still matches).
    pub fn reset(&mut self) {
        self.messages.retain(|m| m.role == "system");
    }
}
