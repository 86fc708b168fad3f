//! Loading a drafter from what forge wrote (a checkpoint, a checkpoint.dir, a forge export)
//! or from an engine-format folder (through [`super::import`]).

use super::import;
use super::{ForgeExport, LoadedDrafter, FORGE_EXPORT};
use crate::checkpoint::{self, Manifest};
use crate::drafter::target_access;
use crate::error::{Result, TrainerError};
use forge_models::drafters::{DrafterSpec, TargetAccess, TargetNeeds};
use forge_models::safetensors_io::SafetensorsFile;
use forge_models::TargetConfig;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// What a drafter whose weights are loaded right after building needs of its target (what it
/// shares with it), read from the target folder.
fn shared_with_target(spec: &DrafterSpec, target: &Path, cfg: &serde_json::Value) -> Result<TargetAccess<'static>> {
    let needs = spec.target_needs(false);
    if needs == TargetNeeds::Nothing {
        return Ok(TargetAccess::Nothing);
    }
    let cfg = TargetConfig::from_value(cfg.clone()).map_err(TrainerError::Config)?;
    target_access(target, &cfg, &needs, None).map_err(|e| {
        TrainerError::Config(format!(
            "this {} drafter shares tensors with its target, which could not be read from {}: {e}",
            spec.kind(),
            target.display()
        ))
    })
}

/// Loads a drafter (computing in fp32) from a checkpoint folder, a checkpoint.dir or a forge
/// export.
pub fn load_drafter(path: &Path, device: Device) -> Result<LoadedDrafter> {
    load_drafter_with_target(path, device, Kind::Float, None)
}

/// [`load_drafter`] computing in `compute`, reading the tensors the drafter shares with its
/// target (embedding, lm_head) from `target` instead of the target folder the checkpoint
/// records.
pub fn load_drafter_with_target(
    path: &Path,
    device: Device,
    compute: Kind,
    target: Option<&Path>,
) -> Result<LoadedDrafter> {
    let forge_desc = path.join(FORGE_EXPORT);
    if forge_desc.is_file() {
        let text = std::fs::read_to_string(&forge_desc).map_err(|source| TrainerError::Io {
            path: forge_desc.clone(),
            source,
        })?;
        let d: ForgeExport =
            serde_json::from_str(&text).map_err(|e| TrainerError::Config(format!("{}: {e}", forge_desc.display())))?;
        let target = target
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&d.target));
        let access = shared_with_target(&d.drafter, &target, &d.target_config)?;
        let drafter = d.drafter.build(&access, device, compute)?;
        let weights = SafetensorsFile::open(&path.join("model.safetensors"))?.tensors()?;
        checkpoint::load_into_var_store(drafter.var_store(), &weights, path)?;
        return Ok(LoadedDrafter {
            drafter,
            spec: d.drafter,
            target,
            target_config: d.target_config,
            source: path.to_path_buf(),
        });
    }
    // a draft in an engine's format (needs the target: --target, or the folder the config names)
    if !path.join(checkpoint::MANIFEST).is_file() && path.join("config.json").is_file() {
        let named = std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("base_model_name_or_path")
                    .and_then(|b| b.as_str())
                    .map(PathBuf::from)
            })
            .filter(|p| p.join("config.json").is_file());
        let Some(target_dir) = target.map(Path::to_path_buf).or(named) else {
            return Err(TrainerError::Config(format!(
                "{}: an engine-format draft (config.json, no forge manifest): name the target it drafts for with --target",
                path.display()
            )));
        };
        if let Some(l) = import::load_engine_draft(path, &target_dir, device, compute)? {
            return Ok(l);
        }
    }
    let ckpt = if path.join(checkpoint::MANIFEST).is_file() {
        path.to_path_buf()
    } else {
        checkpoint::latest(path).ok_or_else(|| {
            TrainerError::Config(format!(
                "{}: no forge checkpoint here (expected a step_<N> folder, a checkpoint.dir holding them, or a forge export)",
                path.display()
            ))
        })?
    };
    let loaded = checkpoint::load(&ckpt)?;
    let Manifest {
        drafter: spec,
        target: recorded,
        target_config,
        ..
    } = loaded.manifest;
    let target = target.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(recorded));
    let access = shared_with_target(&spec, &target, &target_config)?;
    let drafter = spec.build(&access, device, compute)?;
    checkpoint::load_into_var_store(drafter.var_store(), &loaded.weights, &ckpt)?;
    Ok(LoadedDrafter {
        drafter,
        spec,
        target,
        target_config,
        source: ckpt,
    })
}
