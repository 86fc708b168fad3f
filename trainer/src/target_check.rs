//! Checks of a recipe against its target's config.json (when the target is present).

use crate::recipe::{DrafterSection, Recipe};
use anyhow::{bail, Result};
use forge_models::TargetConfig;

/// Returns notes (warnings) and fails on values the target makes impossible.
pub fn check_against_target(recipe: &Recipe) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let Some(path) = &recipe.target.path else {
        return Ok(notes);
    };
    let cfg_path = path.join("config.json");
    if !cfg_path.is_file() {
        notes.push(format!(
            "target.path {} has no config.json here (yet); target-dependent checks skipped",
            path.display()
        ));
        return Ok(notes);
    }
    let cfg = TargetConfig::from_file(&cfg_path)?;
    let l = cfg.num_layers;
    let mut problems = Vec::new();
    match &recipe.drafter {
        DrafterSection::Eagle3(e) => {
            if let Some(layers) = &e.aux_layers {
                for &x in layers {
                    if x >= l {
                        problems.push(format!("drafter.aux_layers: layer {x} does not exist (target has layers 0..{})", l - 1));
                    }
                }
            }
            if e.draft_vocab_size > cfg.vocab_size {
                notes.push(format!(
                    "drafter.draft_vocab_size {} is capped at the target vocabulary {}",
                    e.draft_vocab_size, cfg.vocab_size
                ));
            }
        }
        DrafterSection::Spaf(s) => {
            if let Some(k) = s.cutoff_layer {
                if k >= l {
                    problems.push(format!(
                        "drafter.cutoff_layer {k} must be below the target's {l} layers"
                    ));
                }
            }
        }
        DrafterSection::Knowledge(k) => {
            if let Some(layers) = &k.layers {
                for &x in layers {
                    if x >= l {
                        problems.push(format!(
                            "drafter.layers: layer {x} does not exist (target has layers 0..{})",
                            l - 1
                        ));
                    }
                }
            }
            if k.num_sampled_layers > l {
                problems.push(format!(
                    "drafter.num_sampled_layers {} exceeds the target's {l} layers",
                    k.num_sampled_layers
                ));
            }
        }
        _ => {}
    }
    for f in &recipe.data.train {
        if !f.exists() {
            notes.push(format!(
                "data.train file {} does not exist (yet)",
                f.display()
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "recipe does not fit the target {}:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    Ok(notes)
}
