//! `forge export`: a checkpoint (or a forge export) to the layout an inference engine loads.
//! Names, shapes and config fields per format live in each drafter's `export` (one explicit
//! table per format) and are checked against the engine's expectations before writing.

use super::{load_drafter, ForgeExport, FORGE_EXPORT};
use crate::error::{Result, TrainerError};
use forge_models::drafters::ExportFormat;
use forge_models::safetensors_io::write_safetensors;
use forge_models::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub files: Vec<(PathBuf, u64)>,
    pub tensors: usize,
    pub source: PathBuf,
    /// Which engine versions serve it and how (`Drafter::serving`).
    pub serving: Option<&'static str>,
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
            fmt.holds(),
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
        serving: l.drafter.serving(fmt),
        source: l.source,
    })
}
