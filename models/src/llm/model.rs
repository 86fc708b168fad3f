//! The target model: the Llama-family block stack with its KV cache and hidden-state capture.
//! One file over ~500 lines: loading, forward, cache and capture share one layer walk.

use super::config::TargetConfig;
use super::load::{load_var_store_with, weight_files};
use crate::dtype::DType;
use crate::error::{ModelError, Result};
use crate::layers::attention::build_mask;
use crate::layers::tp::shard;
use crate::layers::{AttnMask, DecoderLayer, Keys, LayerKv, ParamInit, RmsNorm, Rotary, TensorParallel};
use crate::safetensors_io::write_safetensors;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use tch::{nn, nn::Module, Device, Kind, Tensor};

/// What every layer of one forward shares: RoPE tables for the new positions and the mask.
#[derive(Debug)]
pub struct LayerInputs {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: AttnMask,
}

/// Called after each layer of [`TargetModel::run_layers`] with the layer's index and output;
/// returning `Some(t)` replaces the output (what the next layer and the final norm read).
/// Adapters inside the target (SpAF) are hooks; so is capturing layer outputs.
pub type LayerHook<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<Option<Tensor>>;

/// What a forward pass should return besides the final hidden state.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    /// Indices of layers whose *outputs* to return (0-based; output of layer i = input of i+1).
    pub layers: Vec<i64>,
    /// Compute logits: `None`, for every position, or for the last position only.
    pub logits: LogitsMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogitsMode {
    #[default]
    None,
    All,
    Last,
}

impl Capture {
    pub fn logits(mode: LogitsMode) -> Self {
        Self {
            layers: Vec::new(),
            logits: mode,
        }
    }
}

/// Result of a target forward pass.
#[derive(Debug)]
pub struct TargetOutput {
    /// `[B, T, V]` (or `[B, 1, V]` for `LogitsMode::Last`) when requested.
    pub logits: Option<Tensor>,
    /// Last hidden state before the final norm `[B, T, H]`.
    pub hidden: Tensor,
    /// Last hidden state after the final norm (what lm_head reads) `[B, T, H]`.
    pub hidden_normed: Tensor,
    /// Outputs of the layers listed in `Capture::layers`, in that order.
    pub layers: Vec<Tensor>,
}

/// KV cache for all layers of a target.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: i64) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        self.layers.first().map(|l| l.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops cached positions past `len` (rollback after rejected speculative tokens).
    pub fn truncate(&mut self, len: i64) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }
    /// Keeps, of the positions from `start` on, those at offsets `rows` (ascending), moved to
    /// `start..`: after a tree verification, the root and the accepted path.
    pub fn keep(&mut self, start: i64, rows: &[i64]) {
        self.layers.iter_mut().for_each(|l| l.keep(start, rows));
    }
}

/// RoPE and mask for `t` new tokens of `batch` rows after `past` cached positions, for a stack
/// of Llama layers with this `rotary` computing in `kind`: the target's
/// ([`TargetModel::layer_inputs`]) or a draft built from its layers.
#[allow(clippy::too_many_arguments)]
pub fn layer_inputs(
    rotary: &Rotary,
    kind: Kind,
    sliding_window: Option<i64>,
    device: Device,
    batch: i64,
    t: i64,
    past: i64,
    positions: Option<&Tensor>,
    key_valid: Option<&Tensor>,
) -> Result<LayerInputs> {
    if let Some(kv) = key_valid {
        if kv.size() != [batch, past + t] {
            return Err(ModelError::Invalid(format!(
                "key_valid must be [{batch}, {}] (batch, cached + new positions), got {:?}",
                past + t,
                kv.size()
            )));
        }
    }
    let positions = match positions {
        Some(p) => p.to_device(device),
        None => Tensor::arange_start(past, past + t, (Kind::Int64, device))
            .view([1, t])
            .expand([batch, t], false),
    };
    let window = sliding_window.filter(|&w| past + t > w);
    let mask = if key_valid.is_none() && window.is_none() {
        AttnMask::for_cache(batch, past, t, device)
    } else {
        let kv = key_valid.map(|k| k.to_device(device));
        AttnMask::Explicit(build_mask(batch, past, t, kv.as_ref(), window, device))
    };
    let (cos, sin) = rotary.cos_sin(&positions, kind);
    Ok(LayerInputs { cos, sin, mask })
}

/// A frozen Llama-family target model (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3).
pub struct TargetModel {
    pub config: TargetConfig,
    pub vs: nn::VarStore,
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rotary: Rotary,
    kind: Kind,
    /// The tensor-parallel group this rank's share of the target runs in (None: whole).
    tp: Option<Arc<TensorParallel>>,
}

impl TargetModel {
    /// Builds the module tree under a fresh VarStore (weights zero or randomly initialised).
    pub fn build(config: TargetConfig, dtype: DType, device: Device, init: ParamInit) -> Self {
        Self::build_shape(config.clone(), config, dtype, device, init, None)
    }

    /// This rank's share of the target split over the tensor-parallel group `tp`
    /// ([`crate::layers::tp`]): the layers hold `1/size` of the heads and MLP width, the
    /// embedding and lm_head `1/size` of the vocabulary. Errors name the config field that
    /// does not divide.
    pub fn build_parallel(
        config: TargetConfig,
        dtype: DType,
        device: Device,
        init: ParamInit,
        tp: Arc<TensorParallel>,
    ) -> std::result::Result<Self, String> {
        let local = config.tensor_parallel_shard(tp.size())?;
        Ok(Self::build_shape(config, local, dtype, device, init, Some(tp)))
    }

    /// The module tree of `local` (`config`'s shape, or one rank's share of it).
    fn build_shape(
        config: TargetConfig,
        local: TargetConfig,
        dtype: DType,
        device: Device,
        init: ParamInit,
        tp: Option<Arc<TensorParallel>>,
    ) -> Self {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(dtype.kind());
        let root = vs.root();
        let model = &root / "model";
        let embed_cfg = match init {
            ParamInit::Zeros => nn::EmbeddingConfig {
                ws_init: nn::Init::Const(0.),
                ..Default::default()
            },
            ParamInit::Default => nn::EmbeddingConfig {
                ws_init: nn::Init::Randn { mean: 0., stdev: 0.02 },
                ..Default::default()
            },
        };
        let embed_tokens = nn::embedding(&model / "embed_tokens", local.vocab_size, config.hidden_size, embed_cfg);
        let layers = (0..config.num_layers)
            .map(|i| {
                let mut l = DecoderLayer::new(&model / "layers" / i, local.layer_config(dtype.kind()), init);
                l.tp = tp.clone();
                l
            })
            .collect();
        let norm = RmsNorm::new(&model / "norm", config.hidden_size, config.rms_norm_eps, init);
        let lm_head = (!config.tie_word_embeddings).then(|| {
            crate::layers::linear(
                &root / "lm_head",
                config.hidden_size,
                local.vocab_size,
                false,
                init,
                dtype.kind(),
            )
            .ws
        });
        let rotary = Rotary::new(config.head_dim, config.rope_theta, &config.rope_scaling, device);
        vs.freeze();
        Self {
            config,
            vs,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            kind: dtype.kind(),
            tp,
        }
    }

    /// Loads a HF model folder (config.json + safetensors, single or sharded).
    pub fn load(dir: &Path, dtype: DType, device: Device) -> Result<Self> {
        Self::load_parallel(dir, dtype, device, None)
    }

    /// Loads this rank's share of a HF model folder for the tensor-parallel group `tp`
    /// (the whole model without one): each weight is read and cut to the rank's slice.
    pub fn load_parallel(dir: &Path, dtype: DType, device: Device, tp: Option<Arc<TensorParallel>>) -> Result<Self> {
        let config = TargetConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        let mut model = match tp {
            None => Self::build(config, dtype, device, ParamInit::Zeros),
            Some(tp) => {
                Self::build_parallel(config, dtype, device, ParamInit::Zeros, tp).map_err(|msg| ModelError::Config {
                    path: dir.join("config.json"),
                    msg,
                })?
            }
        };
        // Tied checkpoints sometimes still carry lm_head.weight; rotary buffers are derived.
        let ignore: &[&str] = if model.config.tie_word_embeddings {
            &["rotary_emb.inv_freq", "lm_head.weight"]
        } else {
            &["rotary_emb.inv_freq"]
        };
        let cut = model.tp.as_ref().map(|tp| (tp.rank(), tp.size()));
        let slice = |name: &str, t: Tensor| -> Result<Tensor> {
            match cut {
                Some((rank, size)) => shard(name, &t, rank, size),
                None => Ok(t),
            }
        };
        let unused = load_var_store_with(&mut model.vs, dir, &files, ignore, &slice)?;
        if !unused.is_empty() {
            return Err(ModelError::Config {
                path: dir.to_path_buf(),
                msg: format!(
                    "weights not used by a {} model: {:?} (is config.json right for these weights?)",
                    model.config.model_type,
                    unused.iter().take(10).collect::<Vec<_>>()
                ),
            });
        }
        Ok(model)
    }

    /// Writes the model as a HF folder (config.json + model.safetensors).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(crate::error::io_err(dir))?;
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&dir.join("model.safetensors"), &tensors, &meta)?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config.raw).map_err(|source| ModelError::Json {
            path: cfg_path.clone(),
            source,
        })?;
        std::fs::write(&cfg_path, text).map_err(crate::error::io_err(&cfg_path))?;
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn num_layers(&self) -> i64 {
        self.config.num_layers
    }
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_layers)
    }

    /// Token embeddings `[B, T, H]` (tensor-parallel: each rank embeds the ids of its
    /// vocabulary slice, zeros for the others, summed over the group).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        match &self.tp {
            None => self.embed_tokens.forward(input_ids),
            Some(tp) => {
                let n = self.embed_tokens.ws.size()[0];
                let local = input_ids - n * tp.rank() as i64;
                let mine = local.ge(0).logical_and(&local.lt(n));
                let e = self.embed_tokens.forward(&local.clamp(0, n - 1));
                tp.reduce(e * mine.unsqueeze(-1).to_kind(self.kind))
            }
        }
    }
    /// The tensor-parallel group this target is split over, if any.
    pub fn tensor_parallel(&self) -> Option<&Arc<TensorParallel>> {
        self.tp.as_ref()
    }
    /// Parameters of the decoder layers this rank holds, and of the whole target's layers
    /// (equal without tensor parallelism).
    pub fn layer_parameters(&self) -> (i64, i64) {
        let held: i64 = self
            .vs
            .variables()
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers."))
            .map(|(_, t)| t.numel() as i64)
            .sum();
        // the whole target's layers: all of its parameters but the embedding, the lm_head
        // and the final norm
        let c = &self.config;
        let embed = c.vocab_size * c.hidden_size;
        let head = if c.tie_word_embeddings { 0 } else { embed };
        let full = c.num_parameters() - embed - head - c.hidden_size;
        (held, full)
    }
    /// The embedding matrix `[V, H]`.
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed_tokens.ws
    }
    /// The lm_head matrix `[V, H]` (the embedding matrix when tied).
    pub fn lm_head_weight(&self) -> &Tensor {
        match &self.lm_head {
            Some(w) => w,
            None => &self.embed_tokens.ws,
        }
    }
    /// Logits for already-normed hidden states `[.., H]` -> `[.., V]` (tensor-parallel:
    /// each rank's vocabulary slice, gathered).
    pub fn logits(&self, hidden_normed: &Tensor) -> Tensor {
        let local = hidden_normed.matmul(&self.lm_head_weight().tr());
        match &self.tp {
            None => local,
            Some(tp) => tp.gather_last(&local),
        }
    }
    /// The final norm.
    pub fn final_norm(&self, hidden: &Tensor) -> Tensor {
        self.norm.forward(hidden)
    }
    pub fn rotary(&self) -> &Rotary {
        &self.rotary
    }

    /// The decoder layers (read-only: a drafter may run or copy them).
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// RoPE and mask for `t` new tokens of `batch` rows after `past` cached positions.
    ///
    /// - `positions` `[B, T]`: defaults to `past .. past+T` for every row.
    /// - `key_valid` `[B, past+T]`: 1 for real tokens, 0 for padding (defaults to all real).
    pub fn layer_inputs(
        &self,
        batch: i64,
        t: i64,
        past: i64,
        positions: Option<&Tensor>,
        key_valid: Option<&Tensor>,
    ) -> Result<LayerInputs> {
        layer_inputs(
            &self.rotary,
            self.kind,
            self.config.sliding_window,
            self.device(),
            batch,
            t,
            past,
            positions,
            key_valid,
        )
    }

    /// Runs layers `range` on `x` `[B, T, H]` (the embeddings, or the output of the layer
    /// before `range.start`), appending to `cache` when given, calling `hook` after each layer.
    /// Gradients flow through the frozen layers to `x` and to whatever a hook adds unless the
    /// caller runs it under `no_grad`.
    pub fn run_layers(
        &self,
        x: Tensor,
        range: Range<usize>,
        inputs: &LayerInputs,
        mut cache: Option<&mut KvCache>,
        mut hook: Option<LayerHook>,
    ) -> Result<Tensor> {
        if range.end > self.layers.len() || range.start > range.end {
            return Err(ModelError::Invalid(format!(
                "layer range {range:?} is outside the target's layers 0..{}",
                self.layers.len()
            )));
        }
        let mut x = x;
        for i in range {
            let keys = match cache.as_deref_mut() {
                Some(c) => Keys::Cache(&mut c.layers[i]),
                None => Keys::Own,
            };
            x = self.layers[i].forward(&x, &inputs.cos, &inputs.sin, &inputs.mask, keys);
            if let Some(tp) = &self.tp {
                tp.check()?;
            }
            if let Some(h) = hook.as_mut() {
                if let Some(replaced) = h(i, &x)? {
                    x = replaced;
                }
            }
        }
        Ok(x)
    }

    /// Runs the model on `input_ids` `[B, T]`: embed, every layer, final norm, logits as
    /// `capture` asks (the staged pieces above, in order).
    ///
    /// - `positions` `[B, T]`: defaults to `past .. past+T` for every row.
    /// - `key_valid` `[B, past+T]`: 1 for real tokens, 0 for padding (defaults to all real).
    /// - `cache`: appended to; its length is `past`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: Option<&Tensor>,
        key_valid: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        capture: &Capture,
    ) -> Result<TargetOutput> {
        let size = input_ids.size();
        if size.len() != 2 {
            return Err(ModelError::Invalid(format!(
                "input_ids must be [batch, seq], got {size:?}"
            )));
        }
        let (b, t) = (size[0], size[1]);
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        self.check_capture(capture)?;
        let inputs = self.layer_inputs(b, t, past, positions, key_valid)?;
        self.forward_with(input_ids, &inputs, cache, capture)
    }

    /// The forward over a draft tree's nodes after the cached positions (tree verification,
    /// [`crate::spec_tree`]): `ids` at `positions`, node i attending to every cached position
    /// (within the sliding window) and to the nodes row i of `tree_mask` `[n, n]` marks
    /// (itself and its ancestors). Appends the nodes to `cache`; a chain's tree mask gives
    /// exactly [`Self::forward`]'s mask.
    pub fn forward_tree(
        &self,
        ids: &[i64],
        positions: &[i64],
        tree_mask: &Tensor,
        cache: &mut KvCache,
        capture: &Capture,
    ) -> Result<TargetOutput> {
        let n = ids.len() as i64;
        if positions.len() != ids.len() || tree_mask.size() != [n, n] {
            return Err(ModelError::Invalid(format!(
                "tree forward: {n} nodes with {} positions and a {:?} mask",
                positions.len(),
                tree_mask.size()
            )));
        }
        self.check_capture(capture)?;
        let device = self.device();
        let past = cache.len();
        let pos = Tensor::from_slice(positions).to_device(device).view([1, n]);
        let mut mask = Tensor::cat(
            &[
                Tensor::ones([n, past], (Kind::Bool, device)),
                tree_mask.to_device(device).to_kind(Kind::Bool),
            ],
            1,
        );
        if let Some(w) = self.config.sliding_window {
            let kpos = Tensor::cat(&[Tensor::arange(past, (Kind::Int64, device)), pos.view([n])], 0).view([1, -1]);
            let near = (pos.view([n, 1]) - kpos).lt(w);
            let diag = Tensor::cat(
                &[
                    Tensor::zeros([n, past], (Kind::Bool, device)),
                    Tensor::eye(n, (Kind::Bool, device)),
                ],
                1,
            );
            mask = mask.logical_and(&near).logical_or(&diag);
        }
        let (cos, sin) = self.rotary.cos_sin(&pos, self.kind);
        let inputs = LayerInputs {
            cos,
            sin,
            mask: AttnMask::Explicit(mask.view([1, 1, n, past + n])),
        };
        let ids = Tensor::from_slice(ids).view([1, n]);
        self.forward_with(&ids, &inputs, Some(cache), capture)
    }

    fn check_capture(&self, capture: &Capture) -> Result<()> {
        for &l in &capture.layers {
            if l < 0 || l >= self.config.num_layers {
                return Err(ModelError::Invalid(format!(
                    "cannot capture layer {l}: the target has layers 0..{}",
                    self.config.num_layers - 1
                )));
            }
        }
        Ok(())
    }

    /// Embeddings, every layer with `inputs`, the final norm and what `capture` asks.
    fn forward_with(
        &self,
        input_ids: &Tensor,
        inputs: &LayerInputs,
        cache: Option<&mut KvCache>,
        capture: &Capture,
    ) -> Result<TargetOutput> {
        let t = input_ids.size()[1];
        let x = self.embed(&input_ids.to_device(self.device()));
        let mut captured: Vec<(i64, Tensor)> = Vec::new();
        let mut keep = |i: usize, out: &Tensor| -> Result<Option<Tensor>> {
            if capture.layers.contains(&(i as i64)) {
                captured.push((i as i64, out.shallow_clone()));
            }
            Ok(None)
        };
        let x = self.run_layers(x, 0..self.layers.len(), inputs, cache, Some(&mut keep))?;
        let layers = capture
            .layers
            .iter()
            .filter_map(|l| captured.iter().find(|(i, _)| i == l).map(|(_, t)| t.shallow_clone()))
            .collect();
        let hidden_normed = self.norm.forward(&x);
        let logits = match capture.logits {
            LogitsMode::None => None,
            LogitsMode::All => Some(self.logits(&hidden_normed)),
            LogitsMode::Last => Some(self.logits(&hidden_normed.narrow(1, t - 1, 1))),
        };
        if let Some(tp) = &self.tp {
            tp.check()?;
        }
        Ok(TargetOutput {
            logits,
            hidden: x,
            hidden_normed,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear;

    /// A tiny random Llama-shaped target (hidden 64, 3 layers, GQA 4/2, untied head).
    fn tiny(model_type: &str) -> TargetModel {
        let cfg = serde_json::json!({
            "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 96,
            "tie_word_embeddings": false, "max_position_embeddings": 256,
        });
        let cfg = TargetConfig::from_value(cfg).expect("config");
        let t = TargetModel::build(cfg, DType::F32, Device::Cpu, ParamInit::Default);
        // RMSNorm weights start at one: make them differ so the norms are exercised
        tch::no_grad(|| {
            for (name, mut v) in t.vs.variables() {
                if name.ends_with("norm.weight") {
                    v.copy_(&(v.rand_like() + 0.5));
                }
            }
        });
        t
    }

    fn ids() -> Tensor {
        Tensor::from_slice(&[3i64, 17, 5, 88, 41, 2, 9, 60, 33, 12]).view([2, 5])
    }

    /// Embed -> layer_inputs -> run_layers -> final norm -> logits, the staged way.
    fn staged(t: &TargetModel, hook: Option<LayerHook>) -> Tensor {
        let ids = ids();
        let inputs = t.layer_inputs(2, 5, 0, None, None).expect("inputs");
        let x = t.embed(&ids);
        let x = t
            .run_layers(x, 0..t.num_layers() as usize, &inputs, None, hook)
            .expect("layers");
        t.logits(&t.final_norm(&x))
    }

    #[test]
    fn staged_forward_equals_the_full_forward_bit_for_bit() {
        for model_type in ["llama", "qwen3"] {
            let t = tiny(model_type);
            let full = t
                .forward(&ids(), None, None, None, &Capture::logits(LogitsMode::All))
                .expect("forward");
            let logits = full.logits.expect("logits");
            assert!(staged(&t, None).equal(&logits), "{model_type}");
            // split into two ranges: the same
            let inputs = t.layer_inputs(2, 5, 0, None, None).expect("inputs");
            let x = t.run_layers(t.embed(&ids()), 0..1, &inputs, None, None).expect("0..1");
            let x = t.run_layers(x, 1..3, &inputs, None, None).expect("1..3");
            assert!(x.equal(&full.hidden), "{model_type}: ranges 0..1 + 1..3");
            // a hook that adds zero changes nothing, to the last bit
            let mut zero = |_: usize, x: &Tensor| -> Result<Option<Tensor>> { Ok(Some(x + x.zeros_like())) };
            assert!(staged(&t, Some(&mut zero)).equal(&logits), "{model_type}: zero hook");
            // out-of-range layers are refused
            assert!(t.run_layers(t.embed(&ids()), 2..4, &inputs, None, None).is_err());
        }
    }

    #[test]
    fn a_hook_with_a_trainable_module_gets_gradients_through_the_frozen_layers_only_on_itself() {
        let t = tiny("llama");
        let vs = nn::VarStore::new(Device::Cpu);
        let adapter = linear(vs.root() / "adapter", 64, 64, true, ParamInit::Default, Kind::Float);
        // an adapter after layer 0: its output passes through frozen layers 1 and 2
        let mut hook =
            |i: usize, x: &Tensor| -> Result<Option<Tensor>> { Ok((i == 0).then(|| x + adapter.forward(x))) };
        let logits = staged(&t, Some(&mut hook));
        let plain = staged(&t, None);
        assert!(!logits.equal(&plain), "the adapter changes the output");
        logits.square().mean(Kind::Float).backward();
        for (name, v) in vs.variables() {
            let g = v.grad();
            assert!(
                g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{name} has no gradient"
            );
        }
        for (name, v) in t.vs.variables() {
            assert!(!v.requires_grad(), "{name} is trainable");
            assert!(!v.grad().defined(), "{name} got a gradient");
        }
    }

    #[test]
    fn decoding_with_a_cache_through_run_layers_equals_the_full_forward() {
        let t = tiny("llama");
        let ids = ids().narrow(0, 0, 1);
        let full = t
            .forward(&ids, None, None, None, &Capture::default())
            .expect("forward")
            .hidden;
        let mut cache = t.new_cache();
        let mut outs = Vec::new();
        for (start, len) in [(0, 3), (3, 1), (4, 1)] {
            let inputs = t.layer_inputs(1, len, cache.len(), None, None).expect("inputs");
            let x = t.embed(&ids.narrow(1, start, len));
            outs.push(t.run_layers(x, 0..3, &inputs, Some(&mut cache), None).expect("layers"));
        }
        let got = Tensor::cat(&outs, 1);
        // fp32 rounding only: the cached path sums in another order (a wrong cache is off by O(1))
        let diff = (&got - &full).abs().max().double_value(&[]);
        let scale = full.abs().max().double_value(&[]).max(1.0);
        assert!(
            diff < 5e-6 * scale,
            "cached decoding differs by {diff} (largest value {scale})"
        );
    }
}
