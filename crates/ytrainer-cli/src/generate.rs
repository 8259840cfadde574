//! `ytrainer generate` and `ytrainer chat`: flags in, [`ytrainer_recipes::generate`] (KV-cache sampling), the
//! text streamed to stdout as it is produced (or one JSON line per prompt); `chat` reads the user's turns from
//! stdin.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ytrainer_recipes::generate::{
    ChatModel, ChatSettings, GenerateSettings, Generation, SamplingSettings, generation_json,
};

use crate::interop::parse_vars;

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
    fn settings(&self) -> SamplingSettings {
        SamplingSettings {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        }
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

/// Writes streamed text at once: a reader watches it appear.
fn echo(w: &mut impl Write) -> impl FnMut(&str) + '_ {
    move |s| {
        let _ = write!(w, "{s}");
        let _ = w.flush();
    }
}

/// `ytrainer generate`
pub fn generate(a: GenerateArgs) -> Result<()> {
    let generation = Generation::load(&GenerateSettings {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        prompts: a.prompt.clone(),
        prompts_file: a.prompts_file.clone(),
        prompt_ids: a.prompt_ids.clone(),
        chat: a.chat,
        system: a.system.clone(),
        vars: parse_vars(&a.vars)?,
        sampling: a.sampling.settings(),
        device: a.device.clone(),
    })?;
    let prompts = generation.prompts();
    let stdout = std::io::stdout();
    for (i, prompt) in prompts.iter().enumerate() {
        if a.json {
            let out = generation.generate(i, None)?;
            println!("{}", generation_json(i, prompt, &out));
        } else {
            let mut lock = stdout.lock();
            if prompts.len() > 1 {
                writeln!(lock, "--- prompt {i} ---")?;
            }
            let out = generation.generate(i, Some(&mut echo(&mut lock)))?;
            writeln!(lock)?;
            drop(lock);
            eprintln!(
                "[{} new tokens, {:.1} tokens/s]",
                out.ids.len(),
                out.tokens_per_second()
            );
        }
    }
    Ok(())
}

/// `ytrainer chat`: reads user turns from stdin (an empty line or EOF ends; `/reset` clears the history).
pub fn chat(a: ChatArgs) -> Result<()> {
    let model = ChatModel::load(&ChatSettings {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        system: a.system.clone(),
        vars: parse_vars(&a.vars)?,
        sampling: a.sampling.settings(),
        device: a.device.clone(),
    })?;
    eprintln!(
        "chat with {} (empty line or Ctrl-D to quit, /reset to start over)",
        a.model.display()
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut conversation = model.conversation();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line?;
        if line.trim().is_empty() {
            break;
        }
        if line.trim() == "/reset" {
            conversation.reset();
            continue;
        }
        let mut out = std::io::stdout().lock();
        conversation.turn(&line, &mut echo(&mut out))?;
        writeln!(out)?;
    }
    Ok(())
}
