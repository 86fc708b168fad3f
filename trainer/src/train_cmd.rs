//! `forge train` and `forge export`.

use crate::load_recipe;
use anyhow::{Context, Result};
use forge_models::DType;
use forge_trainer::target_check;
use std::path::PathBuf;

pub fn run_train(path: PathBuf, set: Vec<String>, resume: Option<String>) -> Result<()> {
    let recipe = load_recipe(&path, &set)?;
    let notes = target_check::check_against_target(&recipe)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let show_progress = recipe
        .log
        .progress
        .unwrap_or_else(|| std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let opts = forge_trainer::train::TrainOptions {
        resume,
        show_progress,
    };
    let s = forge_trainer::train::train(&recipe, &opts, &mut forge_trainer::train::SingleProcess)
        .with_context(|| format!("training {}", path.display()))?;
    let ran = s.steps - s.start_step;
    if ran == 0 {
        println!(
            "{}: already trained to step {} (checkpoint.dir holds the finished run; raise train.max_steps to continue)",
            path.display(),
            s.steps
        );
        return Ok(());
    }
    println!(
        "trained {} steps ({}..{}) in {:.1}s: last loss {:.4}, {:.0} tokens/s, peak memory {:.0} MB",
        ran,
        s.start_step,
        s.steps,
        s.seconds,
        s.last_loss,
        s.tokens as f64 / s.seconds.max(1e-9),
        s.peak_rss_mb
    );
    for (step, e) in &s.eval {
        let parts: Vec<String> = e.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        println!("eval at step {step}: {}", parts.join(", "));
    }
    if let Some(c) = &s.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
    Ok(())
}

pub fn run_export(ckpt: PathBuf, format: String, out: PathBuf, dtype: String) -> Result<()> {
    let dtype = DType::parse(&dtype)
        .with_context(|| format!("--dtype '{dtype}' is not one of {}", DType::NAMES.join(", ")))?;
    let r = forge_trainer::export::export(&ckpt, &format, &out, dtype)
        .with_context(|| format!("exporting {}", ckpt.display()))?;
    println!(
        "exported {} ({} tensors, {}) from {}:",
        out.display(),
        r.tensors,
        dtype.name(),
        r.source.display()
    );
    for (p, n) in &r.files {
        println!("  {} ({:.1} MB)", p.display(), *n as f64 / 1e6);
    }
    Ok(())
}

