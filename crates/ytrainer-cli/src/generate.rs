//! `ytrainer generate` and `ytrainer chat`: sampling with a KV cache (`ytrainer_models::generate`), streaming
//! the text as it is produced.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::json;
use ytrainer_data::Message;
use ytrainer_models::generate::{Generator, Sampler, SamplingOptions, generate_with};

use crate::interop::parse_vars;
use ytrainer_recipes::source::{Loaded, inference_device, load_for_inference};

/// Sampling flags shared by `generate` and `chat`.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalty on tokens already in the context (1.0 = off; transformers' definition).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    fn options(&self) -> Result<SamplingOptions> {
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

/// `ytrainer generate`
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt text, repeatable.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// File of prompts: one per line (.txt) or JSON lines with a "prompt" field.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Prompt as comma-separated token ids (exact-token checks).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Vec<u32>,
    /// Wrap each prompt as a user message in the model's chat template (with the generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Template variable for --chat, repeatable.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object per prompt (ids, text, timing) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `ytrainer chat`
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Hugging Face model directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Template variable, repeatable.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
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

/// Generates after `prompt`, streaming decoded text to `sink` when given. Returns (new ids, seconds after the
/// prefill, seconds of the prefill).
fn stream(
    l: &Loaded,
    g: &mut Generator<'_>,
    prompt: &[u32],
    s: &SamplingArgs,
    stop: &[u32],
    mut sink: Option<&mut dyn Write>,
) -> Result<(Vec<u32>, f64, f64)> {
    let mut sampler = Sampler::new(s.options()?);
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let mut new_ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let ids = generate_with(g, prompt, s.max_new_tokens, stop, &mut sampler, |id| {
        first.get_or_insert_with(Instant::now);
        new_ids.push(id);
        if let Some(w) = sink.as_deref_mut()
            && !stop.contains(&id)
        {
            let text = l.tok.decode(&new_ids, false).unwrap_or_default();
            // Print only complete characters (a byte-level token may end inside one).
            if text.len() > printed && !text.ends_with('\u{fffd}') {
                let _ = write!(w, "{}", &text[printed..]);
                let _ = w.flush();
                printed = text.len();
            }
        }
    });
    let prefill = first.map(|f| (f - start).as_secs_f64()).unwrap_or(0.0);
    let decode = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok((ids, decode, prefill))
}

fn chat_prompt(
    l: &Loaded,
    messages: &[Message],
    vars: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<u32>> {
    let t = l.template.as_ref().ok_or_else(|| {
        anyhow!("the model has no chat template; drop --chat or add chat_template.jinja")
    })?;
    let text = t.render(messages, true, vars)?;
    Ok(l.tok.encode(&text)?)
}

/// `ytrainer generate`
pub fn generate(a: GenerateArgs) -> Result<()> {
    let device = inference_device(&a.device)?;
    a.sampling.options()?;
    let mut prompts: Vec<String> = a.prompt.clone();
    if let Some(p) = &a.prompts_file {
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
                let s = v["prompt"].as_str().ok_or_else(|| {
                    anyhow!("{}:{}: no string field \"prompt\"", p.display(), i + 1)
                })?;
                prompts.push(s.to_string());
            } else {
                prompts.push(line.to_string());
            }
        }
    }
    if prompts.is_empty() && a.prompt_ids.is_empty() {
        bail!(
            "nothing to generate from: give --prompt TEXT, --prompts-file F or --prompt-ids 1,2,3"
        );
    }
    let l = load_for_inference(&a.model, a.adapter.as_deref(), &device)?;
    let vars = parse_vars(&a.vars)?;
    let stop = stop_ids(&l);
    let mut inputs: Vec<(String, Vec<u32>)> = Vec::new();
    if !a.prompt_ids.is_empty() {
        let vocab = l.model.spec.vocab_size;
        if let Some(bad) = a.prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--prompt-ids: token id {bad} is outside the vocabulary (size {vocab})");
        }
        inputs.push((l.tok.decode(&a.prompt_ids, false)?, a.prompt_ids.clone()));
    }
    for p in prompts {
        let ids = if a.chat {
            let mut m = Vec::new();
            if let Some(s) = &a.system {
                m.push(Message::new("system", s));
            }
            m.push(Message::new("user", &p));
            chat_prompt(&l, &m, &vars)?
        } else {
            l.tok.encode(&p)?
        };
        if ids.is_empty() {
            bail!("prompt {p:?} tokenizes to nothing");
        }
        inputs.push((p, ids));
    }
    let stdout = std::io::stdout();
    for (i, (text, ids)) in inputs.iter().enumerate() {
        if a.json {
            let mut g = Generator::new(&l.model);
            let (out, decode_s, prefill_s) = stream(&l, &mut g, ids, &a.sampling, &stop, None)?;
            let tps = if out.len() > 1 {
                (out.len() - 1) as f64 / decode_s.max(1e-9)
            } else {
                0.0
            };
            println!(
                "{}",
                json!({"index": i, "prompt": text, "prompt_ids": ids, "output_ids": out,
                       "text": l.tok.decode(&out, true)?, "new_tokens": out.len(),
                       "prefill_seconds": prefill_s, "tokens_per_second": tps})
            );
        } else {
            let mut lock = stdout.lock();
            if inputs.len() > 1 {
                writeln!(lock, "--- prompt {i} ---")?;
            }
            let mut g = Generator::new(&l.model);
            let (out, decode_s, _) = stream(&l, &mut g, ids, &a.sampling, &stop, Some(&mut lock))?;
            writeln!(lock)?;
            drop(lock);
            let tps = if out.len() > 1 {
                (out.len() - 1) as f64 / decode_s.max(1e-9)
            } else {
                0.0
            };
            eprintln!("[{} new tokens, {tps:.1} tokens/s]", out.len());
        }
    }
    Ok(())
}

/// `ytrainer chat`: reads user turns from stdin (an empty line or EOF ends; `/reset` clears the history).
pub fn chat(a: ChatArgs) -> Result<()> {
    let device = inference_device(&a.device)?;
    a.sampling.options()?;
    let l = load_for_inference(&a.model, a.adapter.as_deref(), &device)?;
    if l.template.is_none() {
        bail!(
            "{}: the model has no chat template; use `ytrainer generate` for raw prompts",
            a.model.display()
        );
    }
    let vars = parse_vars(&a.vars)?;
    let stop = stop_ids(&l);
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    eprintln!(
        "chat with {} (empty line or Ctrl-D to quit, /reset to start over)",
        a.model.display()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    // One cache for the session: each turn recomputes only what follows the prefix it shares with the last one.
    let mut g = Generator::new(&l.model);
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            break;
        }
        if line.trim() == "/reset" {
            messages.retain(|m: &Message| m.role == "system");
            continue;
        }
        messages.push(Message::new("user", &line));
        let prompt = chat_prompt(&l, &messages, &vars)?;
        let mut out = std::io::stdout().lock();
        let (ids, _, _) = stream(&l, &mut g, &prompt, &a.sampling, &stop, Some(&mut out))?;
        writeln!(out)?;
        let reply = l.tok.decode(&ids, true)?;
        messages.push(Message::new("assistant", reply.trim()));
    }
    Ok(())
}
