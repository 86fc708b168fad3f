//! The recipe's target: its folder, config.json, chat template, and the dtype and device it
//! runs on (what data preparation, training and the drafters' artifacts all read).

use crate::error::{Result, TrainerError};
use crate::recipe::{Precision, Recipe};
use forge_data::ChatTemplate;
use forge_models::{parse_device, DType, TargetConfig};
use std::path::Path;

/// The target folder of a recipe (validation guarantees it is set).
pub fn target_dir(recipe: &Recipe) -> Result<&Path> {
    recipe.target.path.as_deref().ok_or_else(|| {
        TrainerError::Config("target.path is not set: set it to the target's Hugging Face folder".into())
    })
}

/// The chat template a recipe asks for (`auto` reads the target's tokenizer_config.json).
pub fn chat_template(recipe: &Recipe) -> Result<ChatTemplate> {
    Ok(ChatTemplate::from_name(
        recipe.data.chat_template.as_str(),
        target_dir(recipe)?,
    )?)
}

/// The target's config.json.
pub fn target_config(recipe: &Recipe) -> Result<TargetConfig> {
    Ok(TargetConfig::from_file(&target_dir(recipe)?.join("config.json"))?)
}

/// The target dtype and device a recipe asks for (auto: bf16 on CUDA, fp32 on CPU).
pub fn target_placement(recipe: &Recipe) -> Result<(DType, tch::Device)> {
    // Under `forge launch --nproc N` the workers are CPU workers: `auto` means the CPU.
    let cpu_workers = std::env::var(crate::launch::LAUNCH_DEVICE_VAR).as_deref() == Ok("cpu");
    let mut device = if cpu_workers && recipe.target.device == "auto" {
        tch::Device::Cpu
    } else {
        parse_device(&recipe.target.device)?
    };
    // Under `forge launch --gpus N` each worker takes the GPU of its LOCAL_RANK.
    if device.is_cuda() && matches!(recipe.target.device.as_str(), "auto" | "cuda") {
        if let Some(local) = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            device = parse_device(&format!("cuda:{local}"))?;
        }
    }
    let dtype = match recipe.target.dtype {
        Precision::Auto => {
            if device.is_cuda() {
                DType::BF16
            } else {
                DType::F32
            }
        }
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    };
    Ok((dtype, device))
}
