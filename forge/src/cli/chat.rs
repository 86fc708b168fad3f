//! The flags of the commands that run a target on chat prompts.

/// How a target is run on chat prompts: the flags `forge regenerate`, `forge build-knowledge`
/// and `forge eval` share.
#[derive(clap::Args, Debug, Clone)]
pub struct ChatArgs {
    /// System message for conversations that have none (default: the template's own, if any).
    #[arg(long)]
    pub system: Option<String>,
    /// Chat template: auto (from the target's tokenizer_config.json), chatml, llama3, llama3.1, qwen3.
    #[arg(long, default_value = "auto")]
    pub chat_template: String,
    /// Weight format of the target: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Progress bar on stderr: auto (when stderr is a terminal), always, never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always", "never"])]
    pub progress: String,
}
