//! `ytrainer generate` and `ytrainer chat`: flags in, [`ytrainer_recipes::generate`] (KV-cache sampling), the
//! text streamed to stdout as it is produced (or one JSON line per prompt); `chat` reads the user's turns from
//! stdin.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use ytrainer_recipes::generate::{
    ChatModel, ChatSettings, GenerateSettings, Generation, GenerationConfig, SamplingFlags,
    SamplingSettings, generation_json,
};

use crate::interop::parse_vars;

/// Sampling flags shared by `generate` and `chat`. A flag left out takes the model's `generation_config.json`
/// (as transformers does: `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
/// `max_new_tokens`), else the default in brackets.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy [generation_config.json, else greedy].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Keep the K most likely tokens, 0 = all [generation_config.json; 50 when it samples; else 0].
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold, 1.0 = off [generation_config.json, else 1.0].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Penalty on tokens already in the context, 1.0 = off; transformers' definition; 1.1-1.3 stops a small
    /// model looping [generation_config.json, else 1.0].
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Maximum number of new tokens [generation_config.json, else 256].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The settings for `model`: these flags over its `generation_config.json`; says on stderr what was used
    /// and what came from the file.
    fn settings(&self, model: &Path) -> Result<SamplingSettings> {
        let flags = SamplingFlags {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        };
        let (settings, from_file) = flags.resolve(&GenerationConfig::of_model(model)?);
        let source = if from_file.is_empty() {
            String::new()
        } else {
            format!(
                " ({} from {})",
                from_file.join(", "),
                model.join("generation_config.json").display()
            )
        };
        eprintln!("sampling: {}{source}", settings.describe());
        Ok(settings)
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
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
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
    /// `cpu`, `cuda[:N]` or `wgpu[:N]`.
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
        sampling: a.sampling.settings(&a.model)?,
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
        sampling: a.sampling.settings(&a.model)?,
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
