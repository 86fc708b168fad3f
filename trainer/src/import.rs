//! Drafts in engine formats, loaded as forge drafters: SGLang / vLLM EAGLE-3
//! (`LlamaForCausalLMEagle3`, as SpecForge and the EAGLE authors publish them, and vLLM's
//! speculators layout, `Eagle3Speculator`), SGLang / vLLM
//! EAGLE-1 (`LlamaForCausalLMEagle`, `EagleLlamaForCausalLM`), vLLM Medusa (`MedusaModel`)
//! and FasterDecoding / TensorRT-LLM Medusa (`medusa_lm_head.safetensors`).
//!
//! The names are not a second table: the drafter is built from a spec read off the folder's
//! config.json, its own `export` for that format gives the engine names of its variables (as
//! views of them), and the folder's tensors are copied in by those names. Every tensor must
//! be there with its shape and none may be left over; the copy is then exported again and
//! compared with the folder's tensors, so what is loaded is exactly what the engine serves.

use crate::error::{Result, TrainerError};
use crate::export::LoadedDrafter;
use forge_models::drafters::eagle::DraftLayerSpec;
use forge_models::drafters::eagle1::Eagle1Spec;
use forge_models::drafters::eagle3::{engines_serve_aux_layers, Eagle3Spec};
use forge_models::drafters::medusa::MedusaSpec;
use forge_models::drafters::{DrafterSpec, ExportFormat};
use forge_models::safetensors_io::SafetensorsFile;
use forge_models::TargetConfig;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// An engine-format draft folder, recognised from its files and config.json.
struct Found {
    spec: DrafterSpec,
    format: ExportFormat,
    weights: PathBuf,
    what: &'static str,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainerError::Config(format!("{}: invalid JSON: {e}", path.display())))
}

fn int(cfg: &Value, key: &str, file: &Path) -> Result<i64> {
    cfg.get(key).and_then(Value::as_i64).ok_or_else(|| {
        TrainerError::Config(format!(
            "{}: no integer \"{key}\" (an engine draft's config.json holds it)",
            file.display()
        ))
    })
}

/// The draft layer an engine builds from the draft's own Llama config.json.
fn layer(cfg: &Value, file: &Path) -> Result<DraftLayerSpec> {
    let c =
        TargetConfig::from_value(cfg.clone()).map_err(|e| TrainerError::Config(format!("{}: {e}", file.display())))?;
    let l = DraftLayerSpec {
        hidden_size: c.hidden_size,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        intermediate_size: c.intermediate_size,
        rms_norm_eps: c.rms_norm_eps,
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling,
    };
    l.validate()?;
    Ok(l)
}

/// EAGLE-3's auxiliary layers (target layer outputs, 0-based) from an engine config: SGLang's
/// `eagle_config.eagle_aux_hidden_state_layer_ids` are output ids, vLLM's top-level key
/// capture points (output + 1); without either, the engines' default layers of the target.
fn aux_layers(cfg: &Value, target: &TargetConfig) -> Vec<i64> {
    let ids = |v: Option<&Value>| -> Option<Vec<i64>> { v?.as_array()?.iter().map(Value::as_i64).collect() };
    if let Some(a) = ids(cfg
        .get("eagle_config")
        .and_then(|e| e.get("eagle_aux_hidden_state_layer_ids")))
    {
        return a;
    }
    if let Some(a) = ids(cfg.get("eagle_aux_hidden_state_layer_ids")) {
        return a.iter().map(|l| l - 1).collect();
    }
    target.default_aux_layers()
}

/// Recognises an engine-format draft in `dir` (None: not one of them).
fn recognise(dir: &Path, target: &TargetConfig) -> Result<Option<Found>> {
    let cfg_path = dir.join("config.json");
    let medusa_file = dir.join("medusa_lm_head.safetensors");
    let model_file = dir.join("model.safetensors");
    if !cfg_path.is_file() {
        return Ok(None);
    }
    let cfg = read_json(&cfg_path)?;
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let (hidden, vocab) = (target.hidden_size, target.vocab_size);
    let found = if medusa_file.is_file() && cfg.get("medusa_num_heads").is_some() {
        Found {
            spec: DrafterSpec::Medusa(MedusaSpec {
                num_heads: int(&cfg, "medusa_num_heads", &cfg_path)?,
                num_layers: int(&cfg, "medusa_num_layers", &cfg_path)?,
                original_lm_head: false,
                loss_decay: 0.8,
                top_k: 3,
                hidden_size: hidden,
                vocab_size: vocab,
            }),
            format: ExportFormat::Medusa,
            weights: medusa_file,
            what: "FasterDecoding / TensorRT-LLM Medusa",
        }
    } else if arch == "MedusaModel" {
        Found {
            spec: DrafterSpec::Medusa(MedusaSpec {
                num_heads: int(&cfg, "num_heads", &cfg_path)?,
                num_layers: int(&cfg, "num_hidden_layers", &cfg_path)?,
                original_lm_head: cfg.get("original_lm_head").and_then(Value::as_bool).unwrap_or(false),
                loss_decay: 0.8,
                top_k: 3,
                hidden_size: hidden,
                vocab_size: vocab,
            }),
            format: ExportFormat::Vllm,
            weights: model_file,
            what: "vLLM Medusa",
        }
    } else if arch == "LlamaForCausalLMEagle3" || arch == "Eagle3Speculator" {
        // the speculators layout keeps the draft layer's Llama fields apart
        let speculators = arch == "Eagle3Speculator";
        let l = match cfg.get("transformer_layer_config").filter(|_| speculators) {
            Some(t) => layer(t, &cfg_path)?,
            None => layer(&cfg, &cfg_path)?,
        };
        let draft_vocab = cfg.get("draft_vocab_size").and_then(Value::as_i64).unwrap_or(vocab);
        let target_hidden = cfg
            .get("target_hidden_size")
            .and_then(Value::as_i64)
            .unwrap_or(l.hidden_size);
        // forge's midlayer adds the un-normed hidden state to the residual: SGLang's and
        // vLLM's EAGLE-3 by default, the speculators parser only with an explicit false
        let nbr = cfg
            .get("norm_before_residual")
            .and_then(Value::as_bool)
            .unwrap_or(speculators);
        if nbr {
            return Err(TrainerError::Config(format!(
                "{}: norm_before_residual is {} for this EAGLE-3 draft (the residual is the normed hidden state); forge's EAGLE-3 adds the un-normed one and cannot load it",
                cfg_path.display(),
                if cfg.get("norm_before_residual").is_some() { "true" } else { "unset (true in the speculators layout)" }
            )));
        }
        let aux = aux_layers(&cfg, target);
        if !engines_serve_aux_layers(&aux) || aux.iter().any(|&a| a < 0 || a >= target.num_layers) {
            return Err(TrainerError::Config(format!(
                "{}: auxiliary layers {aux:?} (as target layer outputs) are not 3 distinct ascending layers of this {}-layer target",
                cfg_path.display(),
                target.num_layers
            )));
        }
        Found {
            spec: DrafterSpec::Eagle3(Eagle3Spec {
                ttt_length: 1,
                step_decay: 1.0,
                aux_layers: aux,
                draft_vocab_size: draft_vocab,
                target_hidden_size: target_hidden,
                vocab_size: vocab,
                layer: l,
            }),
            format: if speculators {
                ExportFormat::Speculators
            } else {
                ExportFormat::Sglang
            },
            weights: model_file,
            what: "EAGLE-3 (SGLang / vLLM)",
        }
    } else if arch == "LlamaForCausalLMEagle" || arch == "EagleLlamaForCausalLM" {
        let names = SafetensorsFile::open(&model_file)?.names()?;
        let bias = names.iter().any(|n| n == "fc.bias");
        Found {
            spec: DrafterSpec::Eagle1(Eagle1Spec {
                feature_weight: 1.0,
                token_weight: 0.1,
                feature_noise: 0.0,
                fc_bias: bias,
                vocab_size: vocab,
                layer: layer(&cfg, &cfg_path)?,
            }),
            format: if bias { ExportFormat::Sglang } else { ExportFormat::Vllm },
            weights: model_file,
            what: "EAGLE-1 (SGLang / vLLM)",
        }
    } else {
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
    let extra: Vec<&String> = file
        .keys()
        .filter(|k| !used.contains(k) && !ignored.contains(&k.as_str()))
        .collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(TrainerError::Config(format!(
            "{}: not a {} draft for this target: missing {missing:?}, unexpected {extra:?}",
            found.weights.display(),
            found.what
        )));
    }
    // an EAGLE-3 vocabulary mapping must be one (ascending draft ids, t2d marking them)
    if let (DrafterSpec::Eagle3(_), Some(d), Some(t)) = (&found.spec, file.get("d2t"), file.get("t2d")) {
        let d2t = Vec::<i64>::try_from(&d.to_kind(Kind::Int64)).map_err(|e| TrainerError::Config(e.to_string()))?;
        let t2d: Vec<bool> = Vec::<i64>::try_from(&t.to_kind(Kind::Int64))
            .map_err(|e| TrainerError::Config(e.to_string()))?
            .into_iter()
            .map(|x| x != 0)
            .collect();
        forge_models::drafters::eagle3::install_vocab_mapping(drafter.var_store(), &d2t, &t2d, None)
            .map_err(|e| TrainerError::Config(format!("{}: {e}", found.weights.display())))?;
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
