//! Checkpoints: `<dir>/step_<N>/` with the drafter weights, optimizer state, trainer state and
//! a manifest written last. The folder is assembled under a temporary name and renamed, so a
//! kill at any moment leaves the previous checkpoints intact; `--resume auto` takes the newest
//! folder whose manifest is present and whose files have the sizes it records.

use crate::error::{Result, TrainerError};
use forge_models::drafters::DrafterSpec;
use forge_models::safetensors_io::{write_safetensors, SafetensorsFile};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const CHECKPOINT_FORMAT: &str = "forge-checkpoint-v1";
pub const WEIGHTS: &str = "model.safetensors";
pub const OPTIMIZER: &str = "optimizer.safetensors";
pub const STATE: &str = "trainer_state.json";
pub const MANIFEST: &str = "manifest.json";

/// File of rank r's optimizer shard (ZeRO stages 1-2).
pub fn optimizer_shard_file(rank: usize) -> String {
    format!("optimizer.rank{rank}.safetensors")
}

/// Where training stands (enough to continue exactly).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// Epoch of the next micro-batch and its index in that epoch's plan.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    pub tokens_seen: u64,
    pub samples_seen: u64,
    pub seed: u64,
    pub world_size: usize,
    /// Learning rate of the last step (informational).
    pub lr: f64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub step: u64,
    pub drafter: DrafterSpec,
    /// The target folder the drafter was trained against.
    pub target: String,
    /// The target's config.json (exports copy fields from it).
    pub target_config: serde_json::Value,
    /// File name -> size in bytes.
    pub files: BTreeMap<String, u64>,
    pub forge_version: String,
    /// 0: the optimizer state is one file (optimizer.safetensors); N: one shard per rank,
    /// optimizer.rank<r>.safetensors for r < N (ZeRO stages 1-2).
    #[serde(default)]
    pub optimizer_shards: usize,
    /// dist.zero_stage of the run that wrote it.
    #[serde(default)]
    pub zero_stage: u32,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn step_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step}"))
}

/// Everything a checkpoint holds.
pub struct CheckpointData<'a> {
    pub weights: Vec<(String, Tensor)>,
    /// The whole optimizer state (empty when every rank wrote a shard with [`write_shard`]).
    pub optimizer: Vec<(String, Tensor)>,
    /// Shard files written by the ranks (0 = none: `optimizer` is the whole state).
    pub optimizer_shards: usize,
    pub zero_stage: u32,
    pub state: &'a TrainerState,
    pub drafter: &'a DrafterSpec,
    pub target: &'a Path,
    pub target_config: &'a serde_json::Value,
}

/// The temporary folder a checkpoint of `step` is assembled in; `tag` makes it unique to the
/// run (the process id of rank 0).
pub fn tmp_dir(dir: &Path, step: u64, tag: u32) -> PathBuf {
    dir.join(format!(".step_{step}.tmp.{tag}"))
}

/// Creates a fresh, empty temporary folder for a checkpoint of `step` (rank 0, before the
/// ranks write their shards).
pub fn begin(dir: &Path, step: u64, tag: u32) -> Result<PathBuf> {
    let tmp = tmp_dir(dir, step, tag);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Writes one rank's optimizer shard into the temporary folder made by [`begin`].
pub fn write_shard(tmp: &Path, rank: usize, step: u64, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    meta.insert("step".to_string(), step.to_string());
    meta.insert("rank".to_string(), rank.to_string());
    write_safetensors(&tmp.join(optimizer_shard_file(rank)), tensors, &meta)?;
    Ok(())
}

/// Writes `<dir>/step_<N>` atomically and returns its path (single process).
pub fn save(dir: &Path, c: &CheckpointData<'_>) -> Result<PathBuf> {
    let tmp = begin(dir, c.state.step, std::process::id())?;
    finish(dir, &tmp, c)
}

/// Writes the weights, state (and the whole optimizer state when not sharded) into `tmp`,
/// then the manifest listing every file with its size (shards included), and renames the
/// folder to `<dir>/step_<N>`.
pub fn finish(dir: &Path, tmp: &Path, c: &CheckpointData<'_>) -> Result<PathBuf> {
    finish_as(tmp, c, step_dir(dir, c.state.step))
}

/// [`finish`] into the folder `final_dir` (replacing one that exists).
pub fn finish_as(tmp: &Path, c: &CheckpointData<'_>, final_dir: PathBuf) -> Result<PathBuf> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    meta.insert("step".to_string(), c.state.step.to_string());
    write_safetensors(&tmp.join(WEIGHTS), &c.weights, &meta)?;
    let mut names: Vec<String> = vec![WEIGHTS.into(), STATE.into()];
    if c.optimizer_shards == 0 {
        write_safetensors(&tmp.join(OPTIMIZER), &c.optimizer, &meta)?;
        names.push(OPTIMIZER.into());
    } else {
        names.extend((0..c.optimizer_shards).map(optimizer_shard_file));
    }
    let state = serde_json::to_string_pretty(c.state).map_err(|e| TrainerError::Config(e.to_string()))?;
    std::fs::write(tmp.join(STATE), state).map_err(io(tmp))?;
    let mut files = BTreeMap::new();
    for f in names {
        let p = tmp.join(&f);
        files.insert(f, std::fs::metadata(&p).map_err(io(&p))?.len());
    }
    let manifest = Manifest {
        format: CHECKPOINT_FORMAT.into(),
        step: c.state.step,
        drafter: c.drafter.clone(),
        target: c.target.display().to_string(),
        target_config: c.target_config.clone(),
        files,
        forge_version: env!("CARGO_PKG_VERSION").into(),
        optimizer_shards: c.optimizer_shards,
        zero_stage: c.zero_stage,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| TrainerError::Config(e.to_string()))?;
    std::fs::write(tmp.join(MANIFEST), text).map_err(io(tmp))?;
    if final_dir.exists() {
        // a checkpoint of the same step (e.g. re-run after resume): replace it
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(tmp, &final_dir).map_err(io(&final_dir))?;
    Ok(final_dir)
}

/// Reads and verifies a checkpoint folder's manifest (files present with the recorded sizes).
pub fn read_manifest(ckpt: &Path) -> Result<Manifest> {
    let p = ckpt.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TrainerError::Config(format!(
                "{}: not a complete forge checkpoint (no {MANIFEST}); checkpoints are the step_<N> folders under checkpoint.dir",
                ckpt.display()
            ))
        } else {
            TrainerError::Io { path: p.clone(), source }
        }
    })?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| TrainerError::Config(format!("{}: {e}", p.display())))?;
    if m.format != CHECKPOINT_FORMAT {
        return Err(TrainerError::Config(format!(
            "{}: format {} is not {CHECKPOINT_FORMAT}",
            p.display(),
            m.format
        )));
    }
    for (f, size) in &m.files {
        let fp = ckpt.join(f);
        let got = std::fs::metadata(&fp).map(|md| md.len()).ok();
        if got != Some(*size) {
            return Err(TrainerError::Config(format!(
                "{}: {f} is missing or truncated ({} bytes, manifest says {size})",
                ckpt.display(),
                got.map_or("no".into(), |g| g.to_string())
            )));
        }
    }
    Ok(m)
}

/// Complete checkpoints under `dir`, oldest first.
pub fn list_complete(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name.strip_prefix("step_").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if read_manifest(&e.path()).is_ok() {
            out.push((step, e.path()));
        }
    }
    out.sort();
    out
}

/// The newest complete checkpoint under `dir`.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    list_complete(dir).pop().map(|(_, p)| p)
}

/// Removes all but the newest `keep` complete checkpoints, and stale temporaries.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list_complete(dir);
    if all.len() > keep {
        for (_, p) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(p).map_err(io(p))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mine = format!(".tmp.{}", std::process::id());
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".step_") && name.contains(".tmp.") && !name.ends_with(&mine) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// A loaded checkpoint.
pub struct Loaded {
    pub manifest: Manifest,
    pub state: TrainerState,
    pub weights: Vec<(String, Tensor)>,
    /// The whole state, or every rank's pieces for a sharded checkpoint.
    pub optimizer: Vec<(String, Tensor)>,
}

pub fn load(ckpt: &Path) -> Result<Loaded> {
    let manifest = read_manifest(ckpt)?;
    let sp = ckpt.join(STATE);
    let text = std::fs::read_to_string(&sp).map_err(io(&sp))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| TrainerError::Config(format!("{}: {e}", sp.display())))?;
    let weights = SafetensorsFile::open(&ckpt.join(WEIGHTS))?.tensors()?;
    // sharded state: every rank's pieces (see parallel::zero::assemble_full_state)
    let optimizer = if manifest.optimizer_shards == 0 {
        SafetensorsFile::open(&ckpt.join(OPTIMIZER))?.tensors()?
    } else {
        let mut all = Vec::new();
        for r in 0..manifest.optimizer_shards {
            all.extend(SafetensorsFile::open(&ckpt.join(optimizer_shard_file(r)))?.tensors()?);
        }
        all
    };
    Ok(Loaded {
        manifest,
        state,
        weights,
        optimizer,
    })
}

/// Copies named tensors into a VarStore's variables; every variable must be present with its
/// shape, and no extra tensor may be left over.
pub fn load_into_var_store(vs: &tch::nn::VarStore, tensors: &[(String, Tensor)], what: &Path) -> Result<()> {
    let vars = vs.variables();
    let mut missing: Vec<&String> = vars.keys().collect();
    let mut problems = Vec::new();
    tch::no_grad(|| {
        for (name, t) in tensors {
            match vars.get(name) {
                Some(v) if v.size() == t.size() => {
                    let mut v = v.shallow_clone();
                    v.copy_(&t.to_kind(v.kind()).to_device(v.device()));
                    missing.retain(|m| *m != name);
                }
                Some(v) => problems.push(format!("{name}: shape {:?}, the drafter has {:?}", t.size(), v.size())),
                None => problems.push(format!("{name}: not a weight of this drafter")),
            }
        }
    });
    for m in missing {
        problems.push(format!("{m}: missing"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainerError::Config(format!(
            "{}: weights do not fit the drafter: {}",
            what.display(),
            problems.join("; ")
        )))
    }
}
