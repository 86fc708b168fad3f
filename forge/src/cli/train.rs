//! `forge train` and `forge export`.

use super::progress::Steps;
use crate::load_recipe;
use anyhow::{Context, Result};
use forge_models::DType;
use forge_trainer::target_check;
use forge_trainer::train::{StepProgress, TrainObserver};
use indicatif::ProgressBar;
use std::path::PathBuf;
use std::sync::Arc;

/// What `forge train` shows of a run on stderr: notes and warnings, and a progress bar when
/// `show_progress` (lines are printed above it).
struct Terminal {
    show_progress: bool,
    pb: Option<ProgressBar>,
    /// The data loading's bars (cleared when training starts).
    data: Arc<Steps>,
}

impl Terminal {
    fn print(&self, line: &str) {
        match &self.pb {
            Some(pb) => pb.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl TrainObserver for Terminal {
    fn note(&mut self, line: &str) {
        self.print(line);
    }

    fn warn(&mut self, line: &str) {
        self.print(&format!("warning: {line}"));
    }

    fn started(&mut self, start_step: u64, total_steps: u64) {
        self.data.finish();
        let pb = super::progress::bar(total_steps, super::progress::STEP_TEMPLATE, self.show_progress);
        pb.set_message("training");
        pb.set_position(start_step);
        self.pb = Some(pb);
    }

    fn step(&mut self, p: &StepProgress) {
        if let Some(pb) = &self.pb {
            pb.set_position(p.step);
            pb.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                p.loss, p.lr, p.tokens_per_second
            ));
        }
    }

    fn finished(&mut self) {
        if let Some(pb) = self.pb.take() {
            pb.finish_and_clear();
        }
    }
}

pub fn run_train(path: PathBuf, set: Vec<String>, resume: Option<String>) -> Result<()> {
    let recipe = load_recipe(&path, &set)?;
    // the target folder itself is read (with its own errors) when training sets up
    let notes = target_check::check_against_target(&recipe, false)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    let show_progress = super::progress::for_recipe(&recipe);
    let data = Arc::new(Steps::new(show_progress));
    let shown = data.clone();
    // Under `forge launch` (or torchrun-style variables) this rendezvouses with the other ranks;
    // with target.tensor_parallel the world splits into target groups and data-parallel groups.
    let (_, device) = forge_trainer::data::target_placement(&recipe)?;
    let world = forge_trainer::parallel::from_env(recipe.dist.backend, device, recipe.dist.timeout_s)
        .context("joining the distributed run (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)")?;
    let mut groups = forge_trainer::parallel::tensor::split(world, recipe.target.tensor_parallel)
        .with_context(|| format!("{}: target.tensor_parallel", path.display()))?;
    let opts = forge_trainer::train::TrainOptions {
        resume,
        data_progress: Some(Arc::new(move |what: &str, done: u64, total: u64| {
            shown.update(what, done, total)
        })),
        tensor_parallel: groups.tp.clone(),
    };
    let mut terminal = Terminal {
        show_progress,
        pb: None,
        data,
    };
    let s = forge_trainer::train::train(&recipe, &opts, groups.dp.as_mut(), &mut terminal)
        .with_context(|| format!("training {}", path.display()))?;
    if !s.reports {
        // rank 0 reports for everyone
        return Ok(());
    }
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
    let world = match groups.placement.tp {
        1 => format!("world {}", s.world),
        tp => format!("data-parallel world {}, target split over {tp} ranks", s.world),
    };
    println!(
        "optimizer state: {} bytes per rank ({world}, dist.zero_stage {}), {:.3}s per step",
        s.optimizer_state_bytes,
        recipe.dist.zero_stage,
        s.step_seconds / ran.max(1) as f64
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
    let dtype =
        DType::parse(&dtype).with_context(|| format!("--dtype '{dtype}' is not one of {}", DType::NAMES.join(", ")))?;
    let r = forge_trainer::engines::export(&ckpt, &format, &out, dtype)
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
    if let Some(s) = r.serving {
        println!("serve: {}", s.replace("DIR", &out.display().to_string()));
    }
    Ok(())
}
