use crate::error::{io_err, ModelError, Result};
use crate::safetensors_io::SafetensorsFile;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;

/// The safetensors files of a HF model folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                msg: "no \"weight_map\" object".into(),
            })?;
        let files: BTreeSet<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let hint = if dir.join("pytorch_model.bin").exists() || dir.join("pytorch_model.bin.index.json").exists() {
        " (found pytorch_model.bin: convert it to safetensors first)"
    } else {
        ""
    };
    Err(ModelError::Config {
        path: dir.to_path_buf(),
        msg: format!("no model.safetensors or model.safetensors.index.json in this folder{hint}"),
    })
}

/// Fills every variable of `vs` from the safetensors files, converting dtype and moving to
/// the store's device. Tensors on disk that the model does not use are listed in the
/// returned vector (ignored); variables with no tensor on disk are an error.
/// Each tensor passes through `cut` (its name and the tensor on disk) before it is compared
/// with the variable: a tensor-parallel rank's slice, or the tensor itself.
pub fn load_var_store_with(
    vs: &mut VarStore,
    dir: &Path,
    files: &[PathBuf],
    ignore: &[&str],
    cut: &dyn Fn(&str, tch::Tensor) -> Result<tch::Tensor>,
) -> Result<Vec<String>> {
    let vars: HashMap<String, tch::Tensor> = vs.variables();
    let mut remaining: BTreeSet<String> = vars.keys().cloned().collect();
    let mut unused = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for file in files {
            let st = SafetensorsFile::open(file)?;
            for name in st.names()? {
                match vars.get(&name) {
                    Some(var) => {
                        let t = cut(&name, st.tensor(&name)?)?;
                        if t.size() != var.size() {
                            return Err(ModelError::Shape {
                                path: file.clone(),
                                name,
                                expected: var.size(),
                                got: t.size(),
                            });
                        }
                        let mut var = var.shallow_clone();
                        var.f_copy_(&t.to_kind(var.kind()).to_device(var.device()))?;
                        remaining.remove(&name);
                    }
                    None if ignore.iter().any(|s| name.ends_with(s)) => {}
                    None => unused.push(name),
                }
            }
        }
        Ok(())
    })?;
    if !remaining.is_empty() {
        return Err(ModelError::MissingWeights {
            dir: dir.to_path_buf(),
            names: remaining.into_iter().take(20).collect(),
            files: files.to_vec(),
        });
    }
    Ok(unused)
}

/// Reads single tensors of a HF model folder by name without building the model (e.g. the
/// lm_head and embedding a drafter needs in offline training or export). Names not found are
/// `None`. Uses the shard index when there is one, so only the shards holding them are read.
pub fn read_named_tensors(dir: &Path, names: &[&str]) -> Result<Vec<Option<tch::Tensor>>> {
    let index = dir.join("model.safetensors.index.json");
    let mut wanted_files: Vec<PathBuf> = Vec::new();
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        for n in names {
            if let Some(f) = v.get("weight_map").and_then(|m| m.get(*n)).and_then(|f| f.as_str()) {
                let p = dir.join(f);
                if !wanted_files.contains(&p) {
                    wanted_files.push(p);
                }
            }
        }
    } else {
        wanted_files = weight_files(dir)?;
    }
    let mut out: Vec<Option<tch::Tensor>> = names.iter().map(|_| None).collect();
    for f in wanted_files {
        let file = SafetensorsFile::open(&f)?;
        let present = file.names()?;
        for (i, n) in names.iter().enumerate() {
            if out[i].is_none() && present.iter().any(|p| p == n) {
                out[i] = Some(file.tensor(n)?);
            }
        }
    }
    Ok(out)
}
