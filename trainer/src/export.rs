//! `forge export`: a checkpoint (or a forge export) to the layout an inference engine loads.
//! Names, shapes and config fields per format live in each drafter's `export` (one explicit
//! table per format) and are checked against the engine's expectations before writing.

use crate::checkpoint::{self, Manifest};
use crate::drafter::target_access;
use crate::error::{Result, TrainerError};
use forge_models::drafters::{Drafter, DrafterSpec, ExportFormat, TargetAccess, TargetNeeds};
use forge_models::safetensors_io::{write_safetensors, SafetensorsFile};
use forge_models::{DType, TargetConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The description stored beside a forge-format export.
pub const FORGE_EXPORT: &str = "forge_drafter.json";

/// A drafter loaded from a checkpoint folder, a checkpoint.dir (newest checkpoint) or a forge
/// export, with where it came from.
pub struct LoadedDrafter {
    pub drafter: Box<dyn Drafter>,
    pub spec: DrafterSpec,
    pub target: PathBuf,
    pub target_config: serde_json::Value,
    pub source: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ForgeExport {
    format: String,
    drafter: DrafterSpec,
    target: String,
    target_config: serde_json::Value,
    forge_version: String,
}

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
        if let Some(l) = crate::import::load_engine_draft(path, &target_dir, device, compute)? {
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

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub files: Vec<(PathBuf, u64)>,
    pub tensors: usize,
    pub source: PathBuf,
}

fn cast(t: &Tensor, dtype: DType) -> Tensor {
    if t.is_floating_point() {
        t.to_kind(dtype.kind())
    } else {
        t.shallow_clone()
    }
}

/// Exports a checkpoint to `out` in `format` with float tensors in `dtype`.
pub fn export(path: &Path, format: &str, out: &Path, dtype: DType) -> Result<ExportReport> {
    let fmt = ExportFormat::parse(format).ok_or_else(|| {
        TrainerError::Config(format!(
            "--format {format} is not one of {}",
            ExportFormat::NAMES.join(", ")
        ))
    })?;
    let l = load_drafter(path, Device::Cpu)?;
    if fmt != ExportFormat::Forge && l.drafter.export_formats().is_empty() {
        return Err(TrainerError::Config(format!(
            "a {} drafter cannot be exported as {}: {}; use --format forge",
            l.spec.kind(),
            fmt.name(),
            l.drafter.engines_note().unwrap_or("it has no engine format")
        )));
    }
    if fmt != ExportFormat::Forge && !l.drafter.export_formats().contains(&fmt) {
        let ok: Vec<&str> = l.drafter.export_formats().iter().map(|f| f.name()).collect();
        return Err(TrainerError::Config(format!(
            "a {} drafter cannot be exported as {}: that format holds {} drafters; use one of forge, {}",
            l.spec.kind(),
            fmt.name(),
            match fmt {
                ExportFormat::Medusa => "Medusa",
                ExportFormat::Sglang => "EAGLE",
                _ => "other",
            },
            ok.join(", ")
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| TrainerError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), fmt.name().to_string());
    meta.insert("algorithm".to_string(), l.spec.kind().to_string());
    meta.insert("forge_version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("source".to_string(), l.source.display().to_string());
    let (tensor_files, json_files) = if fmt == ExportFormat::Forge {
        let mut w: Vec<(String, Tensor)> = l.drafter.var_store().variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        let desc = ForgeExport {
            format: "forge-drafter-v1".into(),
            drafter: l.spec.clone(),
            target: l.target.display().to_string(),
            target_config: l.target_config.clone(),
            forge_version: env!("CARGO_PKG_VERSION").into(),
        };
        let v = serde_json::to_value(&desc).map_err(|e| TrainerError::Config(e.to_string()))?;
        (
            vec![("model.safetensors".to_string(), w)],
            vec![(FORGE_EXPORT.to_string(), v)],
        )
    } else {
        // engines read the target's name from the HF `_name_or_path`, often empty in a
        // local folder's config.json: the target path the draft was trained against then
        let mut target_config = l.target_config.clone();
        let named = target_config
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .is_some_and(|s| !s.is_empty());
        if !named {
            if let Some(obj) = target_config.as_object_mut() {
                obj.insert("_name_or_path".into(), l.target.display().to_string().into());
            }
        }
        let b = l.drafter.export(fmt, &target_config)?;
        (b.tensor_files, b.json_files)
    };
    let mut files = Vec::new();
    let mut count = 0;
    for (name, tensors) in tensor_files {
        let cast: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), cast(t, dtype))).collect();
        count += cast.len();
        let p = out.join(&name);
        write_safetensors(&p, &cast, &meta)?;
        files.push(p);
    }
    for (name, mut value) in json_files {
        if name == "config.json" {
            if let Some(o) = value.as_object_mut() {
                o.insert(
                    "torch_dtype".into(),
                    serde_json::Value::String(
                        match dtype {
                            DType::F32 => "float32",
                            DType::BF16 => "bfloat16",
                            DType::F16 => "float16",
                        }
                        .into(),
                    ),
                );
            }
        }
        let p = out.join(&name);
        let text = serde_json::to_string_pretty(&value).map_err(|e| TrainerError::Config(e.to_string()))?;
        std::fs::write(&p, text + "\n").map_err(|source| TrainerError::Io {
            path: p.clone(),
            source,
        })?;
        files.push(p);
    }
    let files = files
        .into_iter()
        .map(|p| {
            let n = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (p, n)
        })
        .collect();
    Ok(ExportReport {
        files,
        tensors: count,
        source: l.source,
    })
}
