//! The knowledge drafter's cache (docs/methods/knowledge.md): the file format
//! ([`KnowledgeCache`], its [`CacheManifest`]) and how it is built ([`build_cache`]).
//!
//! The target reads question/answer conversations; the outputs of its layers at the answer
//! tokens are stored per layer, projected onto their top `cache_dim` principal directions when
//! that is below the hidden size ([`project_pca`]), with a manifest (target fingerprint, data
//! hash, counts) in the file's metadata and beside it as JSON. `forge build-knowledge` reads and
//! tokenises the conversations and calls [`build_cache`]; training checks a cache against its
//! recipe through the manifest (drafters/knowledge.rs).

use crate::error::{ModelError, Result};
use crate::llm::{Capture, TargetModel};
use crate::safetensors_io::{write_safetensors, SafetensorsFile};
use forge_data::dataset::Sample;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The knowledge cache file: `layers.{l}` `[N, cache_dim]` fp32 per stored target layer l,
/// and this manifest as JSON in the safetensors metadata (key [`MANIFEST_KEY`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheManifest {
    pub format: String,
    /// The target folder the cache was built with (for people; the fingerprint decides).
    pub target: String,
    /// Fingerprint of the target's files (`forge build-knowledge` and training compare it).
    pub target_fingerprint: String,
    /// The question/answer file and the hash of its bytes.
    pub data: String,
    pub data_hash: String,
    /// Conversations read, and answer tokens stored per layer (N).
    pub entries: i64,
    pub tokens: i64,
    pub hidden_size: i64,
    /// Width of the stored states: the hidden size, or less by PCA (`projection`).
    pub cache_dim: i64,
    /// `none` or `pca` (centred states onto their top cache_dim principal directions, per layer).
    pub projection: String,
    /// Target layers stored (their outputs).
    pub layers: Vec<i64>,
}

pub const CACHE_FORMAT: &str = "forge-knowledge-cache-v1";
pub const MANIFEST_KEY: &str = "forge_knowledge_manifest";

/// A knowledge cache in memory.
pub struct KnowledgeCache {
    pub manifest: CacheManifest,
    /// Target layer -> `[N, cache_dim]` fp32.
    pub layers: BTreeMap<i64, Tensor>,
}

impl KnowledgeCache {
    /// Writes the cache (atomically: a temporary file renamed).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .layers
            .iter()
            .map(|(l, t)| (format!("layers.{l}"), t.to_kind(Kind::Float).contiguous()))
            .collect();
        let json = serde_json::to_string(&self.manifest)
            .map_err(|e| ModelError::Invalid(format!("knowledge manifest: {e}")))?;
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (MANIFEST_KEY.to_string(), json),
        ]);
        write_safetensors(path, &tensors, &meta)
    }

    fn manifest_of(file: &SafetensorsFile) -> Result<CacheManifest> {
        let path = file.path();
        let meta = file.metadata()?;
        let json = meta.get(MANIFEST_KEY).ok_or_else(|| {
            ModelError::Invalid(format!(
                "{}: not a knowledge cache (no {MANIFEST_KEY} in its metadata): build one with forge build-knowledge",
                path.display()
            ))
        })?;
        let m: CacheManifest = serde_json::from_str(json)
            .map_err(|e| ModelError::Invalid(format!("{}: unreadable knowledge manifest: {e}", path.display())))?;
        if m.format != CACHE_FORMAT {
            return Err(ModelError::Invalid(format!(
                "{}: knowledge cache format {} (this forge reads {CACHE_FORMAT}): rebuild it with forge build-knowledge",
                path.display(),
                m.format
            )));
        }
        Ok(m)
    }

    /// The manifest alone.
    pub fn read_manifest(path: &Path) -> Result<CacheManifest> {
        Self::manifest_of(&SafetensorsFile::open(path)?)
    }

    /// The whole cache, shapes checked against the manifest.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_layers(path, None)
    }

    /// The cache with the states of `only` these layers (all when `None`; a layer the cache
    /// lacks is left out), shapes checked against the manifest.
    pub fn read_layers(path: &Path, only: Option<&[i64]>) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let manifest = Self::manifest_of(&file)?;
        let mut layers = BTreeMap::new();
        for &l in manifest.layers.iter().filter(|l| only.is_none_or(|o| o.contains(l))) {
            let t = file.tensor(&format!("layers.{l}"))?.to_kind(Kind::Float);
            if t.size() != [manifest.tokens, manifest.cache_dim] {
                return Err(ModelError::Invalid(format!(
                    "{}: layers.{l} is {:?}, the manifest says [{}, {}]",
                    path.display(),
                    t.size(),
                    manifest.tokens,
                    manifest.cache_dim
                )));
            }
            layers.insert(l, t);
        }
        Ok(Self { manifest, layers })
    }
}

/// States `[N, H]` onto their top `dim` principal directions after centring (`[N, dim]` fp32);
/// unchanged (fp32) when `dim >= H`.
pub fn project_pca(states: &Tensor, dim: i64) -> Tensor {
    let x = states.to_kind(Kind::Double);
    let h = x.size()[1];
    if dim >= h {
        return states.to_kind(Kind::Float);
    }
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    let cov = centred.tr().matmul(&centred);
    // eigh: ascending eigenvalues; the last `dim` columns are the top directions
    let (_, vecs) = cov.linalg_eigh("L");
    let top = vecs.narrow(1, h - dim, dim).flip([1]);
    centred.matmul(&top).to_kind(Kind::Float)
}

impl KnowledgeCache {
    /// Where [`KnowledgeCache::write_manifest_json`] puts the manifest of a cache at `path`
    /// (`<cache>.manifest.json`).
    pub fn manifest_json_path(path: &Path) -> PathBuf {
        path.with_extension("manifest.json")
    }

    /// Writes the manifest beside the cache as pretty JSON; returns its path.
    pub fn write_manifest_json(&self, path: &Path) -> Result<PathBuf> {
        let side = Self::manifest_json_path(path);
        let json = serde_json::to_string_pretty(&self.manifest)
            .map_err(|e| ModelError::Invalid(format!("knowledge manifest: {e}")))?;
        std::fs::write(&side, json + "\n")
            .map_err(|e| ModelError::Invalid(format!("{}: cannot write the manifest: {e}", side.display())))?;
        Ok(side)
    }
}

/// What a cache is built from (recorded in its manifest).
#[derive(Debug, Clone)]
pub struct CacheSource {
    /// The target folder, and [`forge_data::hash::target_fingerprint`] of it.
    pub target: String,
    pub target_fingerprint: String,
    /// The question/answer file, and [`forge_data::hash::data_hash`] of its bytes.
    pub data: String,
    pub data_hash: String,
}

/// How a cache is built.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Target layers stored (their outputs), ascending, each once.
    pub layers: Vec<i64>,
    /// Width of the stored states (PCA below the hidden size).
    pub cache_dim: i64,
    /// Answer tokens kept per entry (the first ones).
    pub max_answer_tokens: usize,
}

impl CacheOptions {
    /// Every layer of the target, at full width.
    pub fn full(model: &TargetModel, max_answer_tokens: usize) -> Self {
        Self {
            layers: (0..model.config.num_layers).collect(),
            cache_dim: model.config.hidden_size,
            max_answer_tokens,
        }
    }

    /// Checks the options against the target (messages name the field and the fix).
    pub fn check(&self, model: &TargetModel) -> Result<()> {
        let cfg = &model.config;
        let bad = |m: String| Err(ModelError::Invalid(m));
        if let Some(l) = self.layers.iter().find(|&&l| l < 0 || l >= cfg.num_layers) {
            return bad(format!(
                "layers: layer {l} does not exist (the target has layers 0..{})",
                cfg.num_layers - 1
            ));
        }
        if self.layers.is_empty() || self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return bad(format!("layers {:?}: list each layer once, ascending", self.layers));
        }
        if self.cache_dim < 1 || self.cache_dim > cfg.hidden_size {
            return bad(format!(
                "cache_dim {} must be in 1..={} (the target's hidden size; equal to it for no projection)",
                self.cache_dim, cfg.hidden_size
            ));
        }
        if self.max_answer_tokens == 0 {
            return bad("max_answer_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// Builds a knowledge cache: the target reads each sample (its input ids up to the last answer
/// token kept) and the outputs of `opts.layers` at the first `opts.max_answer_tokens` answer
/// tokens (loss mask 1) are stored, PCA-projected to `opts.cache_dim` when that is below the
/// hidden size. `progress(1)` is called after each sample.
pub fn build_cache(
    model: &TargetModel,
    samples: &[Sample],
    opts: &CacheOptions,
    source: CacheSource,
    progress: &mut dyn FnMut(u64),
) -> Result<KnowledgeCache> {
    opts.check(model)?;
    let cfg = &model.config;
    let device = model.device();
    let capture = Capture {
        layers: opts.layers.clone(),
        ..Default::default()
    };
    let mut per_layer: BTreeMap<i64, Vec<Tensor>> = BTreeMap::new();
    let mut tokens = 0i64;
    for s in samples {
        let answer: Vec<i64> = s
            .loss_mask
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0)
            .map(|(i, _)| i as i64)
            .take(opts.max_answer_tokens)
            .collect();
        if answer.is_empty() {
            return Err(ModelError::Invalid(format!(
                "knowledge cache: entry {} has no answer token (loss mask all 0): pass conversations with an assistant turn",
                s.id
            )));
        }
        // the target reads up to the last answer token kept (causal: later ones change nothing)
        let end = answer.last().map_or(0, |&l| l as usize + 1);
        let ids: Vec<i64> = s.input_ids[..end].iter().map(|&i| i as i64).collect();
        let input = Tensor::from_slice(&ids).view([1, -1]).to_device(device);
        let out = tch::no_grad(|| model.forward(&input, None, None, None, &capture))?;
        let idx = Tensor::from_slice(&answer).to_device(device);
        for (l, h) in opts.layers.iter().zip(&out.layers) {
            let rows = h
                .squeeze_dim(0)
                .index_select(0, &idx)
                .to_kind(Kind::Float)
                .to_device(tch::Device::Cpu);
            per_layer.entry(*l).or_default().push(rows);
        }
        tokens += answer.len() as i64;
        progress(1);
    }
    let dim = opts.cache_dim;
    let layers: BTreeMap<i64, Tensor> = per_layer
        .into_iter()
        .map(|(l, parts)| (l, project_pca(&Tensor::cat(&parts, 0), dim)))
        .collect();
    let manifest = CacheManifest {
        format: CACHE_FORMAT.into(),
        target: source.target,
        target_fingerprint: source.target_fingerprint,
        data: source.data,
        data_hash: source.data_hash,
        entries: samples.len() as i64,
        tokens,
        hidden_size: cfg.hidden_size,
        cache_dim: dim,
        projection: if dim < cfg.hidden_size {
            "pca".into()
        } else {
            "none".into()
        },
        layers: opts.layers.clone(),
    };
    Ok(KnowledgeCache { manifest, layers })
}
