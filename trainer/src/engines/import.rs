//! Drafts in engine formats, loaded as forge drafters. Which folders are which kind's is the
//! kind's own `recognise` (docs/export.md lists the layouts read today).
//!
//! The names are not a second table: the drafter is built from a spec read off the folder's
//! config.json, its own `export` for that format gives the engine names of its variables (as
//! views of them), and the folder's tensors are copied in by those names. Every tensor must
//! be there with its shape and none may be left over; the copy is then exported again and
//! compared with the folder's tensors, so what is loaded is exactly what the engine serves.

use super::LoadedDrafter;
use crate::error::{Result, TrainerError};
use forge_models::drafters::{DrafterSpec, EngineDraft};
use forge_models::safetensors_io::SafetensorsFile;
use forge_models::TargetConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainerError::Config(format!("{}: invalid JSON: {e}", path.display())))
}

/// Recognises an engine-format draft in `dir` (None: not one of them): the first kind whose
/// [`forge_models::drafters::DrafterKind::recognise`] knows the folder.
fn recognise(dir: &Path, target: &TargetConfig) -> Result<Option<EngineDraft<DrafterSpec>>> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let cfg = read_json(&cfg_path)?;
    let Some(found) = DrafterSpec::recognise(dir, &cfg, target)? else {
        return Ok(None);
    };
    if !found.weights.is_file() {
        return Err(TrainerError::Config(format!(
            "{}: a {} draft needs {} (safetensors; pickled .bin/.pt files are not read)",
            dir.display(),
            found.what,
            found.weights.display()
        )));
    }
    Ok(Some(found))
}

/// Loads the engine-format draft in `dir` against the target folder `target_dir` (its
/// embedding and lm_head, and its config for what the draft's config leaves out). None when
/// `dir` is not an engine-format draft.
pub fn load_engine_draft(
    dir: &Path,
    target_dir: &Path,
    device: Device,
    compute: Kind,
) -> Result<Option<LoadedDrafter>> {
    let target_cfg_path = target_dir.join("config.json");
    let target_raw = read_json(&target_cfg_path)?;
    let target = TargetConfig::from_value(target_raw.clone())
        .map_err(|e| TrainerError::Config(format!("{}: {e}", target_cfg_path.display())))?;
    let Some(found) = recognise(dir, &target)? else {
        return Ok(None);
    };
    let needs = found.spec.target_needs(true);
    let access = crate::drafter::target_access(target_dir, &target, &needs, None)?;
    let drafter = found.spec.build(&access, device, compute)?;
    let file: BTreeMap<String, Tensor> = SafetensorsFile::open(&found.weights)?.tensors()?.into_iter().collect();
    // the engine names of the drafter's variables, as views of them
    let views = drafter.export(found.format, &target_raw)?;
    // views of the drafter's own variables take the folder's values; any other tensor of the
    // layout (the target's shared lm_head, a fixed zero bias) must already equal them
    let own: Vec<i64> = drafter
        .var_store()
        .variables()
        .values()
        .map(|v| v.data_ptr() as i64)
        .collect();
    let mut missing = Vec::new();
    let mut used = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (_, tensors) in &views.tensor_files {
            for (name, view) in tensors {
                match file.get(name) {
                    Some(t) if t.size() == view.size() && !own.contains(&(view.data_ptr() as i64)) => {
                        if !view.to_device(Device::Cpu).to_kind(t.kind()).equal(t) {
                            return Err(TrainerError::Config(format!(
                                "{}: {name} is not trained by a {} drafter in this layout (it is the target's, or fixed), and the folder's differs from it",
                                found.weights.display(),
                                found.spec.kind()
                            )));
                        }
                        used.push(name.clone());
                    }
                    Some(t) if t.size() == view.size() => {
                        view.shallow_clone()
                            .copy_(&t.to_kind(view.kind()).to_device(view.device()));
                        used.push(name.clone());
                    }
                    Some(t) => {
                        return Err(TrainerError::Config(format!(
                            "{}: {name} has shape {:?}, a {} draft of this config and target has {:?}",
                            found.weights.display(),
                            t.size(),
                            found.what,
                            view.size()
                        )))
                    }
                    None => missing.push(name.clone()),
                }
            }
        }
        Ok(())
    })?;
    // a draft's copy of the embedding: forge drafts read the target's, so it must be that
    let ignored = ["embed_tokens.weight", "model.embed_tokens.weight"];
    if let Some(emb) = ignored.iter().find_map(|n| file.get(*n)) {
        let target_emb = access.tensor(forge_models::drafters::EMBED);
        let same = target_emb.is_some_and(|t| t.to_device(Device::Cpu).to_kind(emb.kind()).equal(emb));
        if !same {
            return Err(TrainerError::Config(format!(
                "{}: the draft carries its own embedding, which is not the target's ({}); forge drafts read the target's embedding",
                found.weights.display(),
                target_dir.display()
            )));
        }
    }
    // what the layout holds beyond the export table (EAGLE-3's vocabulary mapping)
    let taken = if missing.is_empty() {
        drafter
            .imported(&file)
            .map_err(|e| TrainerError::Config(format!("{}: {e}", found.weights.display())))?
    } else {
        Vec::new()
    };
    let extra: Vec<&String> = file
        .keys()
        .filter(|k| !used.contains(k) && !taken.contains(k) && !ignored.contains(&k.as_str()))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(TrainerError::Config(format!(
            "{}: not a {} draft for this target: missing {missing:?}, unexpected {extra:?}",
            found.weights.display(),
            found.what
        )));
    }
    // exported again, the loaded drafter is exactly the folder's tensors
    let again = drafter.export(found.format, &target_raw)?;
    for (_, tensors) in &again.tensor_files {
        for (name, t) in tensors {
            let f = &file[name];
            let same = t.to_device(Device::Cpu).to_kind(f.kind()).equal(f)
                || (f.is_floating_point()
                    && t.to_kind(Kind::Double).to_device(Device::Cpu).allclose(
                        &f.to_kind(Kind::Double),
                        0.0,
                        0.0,
                        false,
                    ));
            if !same {
                return Err(TrainerError::Config(format!(
                    "{}: {name} does not survive loading into a {} drafter",
                    found.weights.display(),
                    found.spec.kind()
                )));
            }
        }
    }
    Ok(Some(LoadedDrafter {
        drafter,
        spec: found.spec,
        target: target_dir.to_path_buf(),
        target_config: target_raw,
        source: dir.to_path_buf(),
    }))
}
