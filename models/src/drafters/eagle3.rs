//! EAGLE-3 (Li et al. 2025) with training-time test. Method: docs/methods/eagle3.md.
//!
//! - `fc`: Linear(3 * H_t -> h, no bias) over the 3 concatenated auxiliary target layers.
//! - `midlayer`: one decoder layer whose attention reads
//!   `cat(input_layernorm(embed(token)), hidden_norm(h))` (width 2h); residual on h; then
//!   post_attention_layernorm + SwiGLU MLP.
//! - `norm` -> `lm_head` `[draft_vocab, h]`. `d2t` (int64, target id = i + d2t[i]) and `t2d`
//!   (bool over the target vocabulary) are buffers. The embedding is the target's, frozen,
//!   held outside the VarStore (never trained, checkpointed or exported).
//!
//! Training-time test (ttt_length steps): step 0 reads h = fc(aux) at position t and the token
//! t+1; step i reads its own previous output hidden state and the token t+i+1, RoPE position
//! t+i. Attention in step i: causal over the step-0 keys plus, for each step 1..=i, that
//! step's key at the same position (a per-step K/V list). Step i at position t is matched to
//! the target's distribution at position t+i+1 (the prediction of token t+i+2), restricted and
//! renormalised to the draft vocabulary; positions are trained where that token is a trained
//! token (loss_mask) and the target's arg-max is in the draft vocabulary. Loss =
//! sum_i step_decay^i * mean soft-CE_i; acc/step{i} = draft arg-max == target arg-max.
//!
//! Weight names = SGLang / vLLM `LlamaForCausalLMEagle3`: `fc.weight`,
//! `midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`,
//! `midlayer.{hidden_norm,input_layernorm,post_attention_layernorm}.weight`, `norm.weight`,
//! `lm_head.weight`, `d2t`, `t2d` (left out of engine folders when the mapping is the
//! identity, a full-vocabulary draft's). The speculators layout names `midlayer.*`
//! `layers.0.*`, as its published checkpoints do (the one rename, in `export`).
//!
//! One file over ~500 lines: one drafter kind is one file (the registry's rule).

use super::eagle::{frozen, rows, shift_left, soft_ce, DraftLayerSpec};
use super::{
    architecture, export_same_names, Drafter, DrafterKind, DrafterSpec, EngineDraft, ExportBundle, ExportFormat,
    FeatureNeeds, Features, LossOutput, Metric, PrepareData, ResolveTarget, StepContext, TargetAccess, TargetNeeds,
    TokenMacs, EMBED, LM_HEAD,
};
use crate::llm::TargetConfig;
use forge_schema::Ctx;
use std::collections::BTreeMap;
use std::path::Path;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::attention::build_mask;
pub use crate::layers::attention::{ttt_attention, ttt_mask};
use crate::layers::{linear, AttnMask, DecoderLayer, Keys, LayerKv, Linear, ParamInit, RmsNorm, Rotary, TttKv};
use crate::speculative::{pick, DraftSession, DraftedPath, Proposal, StepFeatures};
use crate::llm::TargetModel;
use tch::{nn, Device, Kind, Tensor};

/// EAGLE-3's hyper-parameters plus the target dimensions it is built for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Eagle3Spec {
    pub ttt_length: i64,
    pub step_decay: f64,
    /// Target layers whose outputs are concatenated into fc's input.
    pub aux_layers: Vec<i64>,
    pub draft_vocab_size: i64,
    pub target_hidden_size: i64,
    /// The target's vocabulary size.
    pub vocab_size: i64,
    pub layer: DraftLayerSpec,
}

forge_schema::section! {
    /// EAGLE-3 with training-time test.
    pub struct Eagle3Section {
        /// Unrolled training-time-test steps.
        ttt_length: i64 = 7,
        /// Loss weight of step i is step_decay^i.
        step_decay: f64 = 0.8,
        /// Draft vocabulary size (capped at the target's vocabulary).
        draft_vocab_size: i64 = 32000,
        /// Target layers whose outputs feed the draft (default: 1, L/2-1, L-4).
        aux_layers: Option<Vec<i64>> = None,
        /// Draft hidden size (default: the target's).
        hidden_size: Option<i64> = None,
        /// Draft attention heads (default: the target's).
        num_heads: Option<i64> = None,
        /// Draft KV heads (default: the target's).
        num_kv_heads: Option<i64> = None,
        /// Draft MLP width (default: the target's).
        intermediate_size: Option<i64> = None,
    }
}

impl DrafterKind for Eagle3 {
    const DOCS: &'static str = "docs/methods/eagle3.md";
    type Section = Eagle3Section;
    type Spec = Eagle3Spec;

    fn validate(e: &Eagle3Section, cx: &mut Ctx) {
        cx.positive("drafter.ttt_length", e.ttt_length);
        cx.fraction("drafter.step_decay", e.step_decay);
        cx.positive("drafter.draft_vocab_size", e.draft_vocab_size);
        if let Some(layers) = &e.aux_layers {
            if layers.is_empty() {
                cx.issue_at(
                    "drafter.aux_layers",
                    "must list at least one layer (or be left out for the default 1, L/2-1, L-4)",
                );
            }
            for (i, &l) in layers.iter().enumerate() {
                if l < 0 {
                    cx.issue_at("drafter.aux_layers", format!("entry {i} is {l}; layer indices are >= 0"));
                }
            }
        }
        cx.positive_if_set("drafter.hidden_size", e.hidden_size);
        cx.positive_if_set("drafter.num_heads", e.num_heads);
        cx.positive_if_set("drafter.num_kv_heads", e.num_kv_heads);
        cx.positive_if_set("drafter.intermediate_size", e.intermediate_size);
        if let (Some(h), Some(kv)) = (e.num_heads, e.num_kv_heads) {
            if kv > 0 && h % kv != 0 {
                cx.issue_at(
                    "drafter.num_kv_heads",
                    format!("num_heads {h} must be a multiple of num_kv_heads {kv}"),
                );
            }
        }
    }

    fn resolve(e: &Eagle3Section, target: ResolveTarget) -> Result<Eagle3Spec> {
        let cfg = target.config;
        let aux_layers = e.aux_layers.clone().unwrap_or_else(|| cfg.default_aux_layers());
        let mut problems = Vec::new();
        let missing: Vec<String> = aux_layers
            .iter()
            .filter(|&&l| l < 0 || l >= cfg.num_layers)
            .map(|l| l.to_string())
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "layer(s) {} do not exist (the target has layers 0..{})",
                missing.join(", "),
                cfg.num_layers - 1
            ));
        }
        if aux_layers.len() != 3 {
            problems.push(format!(
                "{} layers given, EAGLE-3 takes exactly 3 (SGLang and vLLM build fc over 3 x hidden)",
                aux_layers.len()
            ));
        }
        if aux_layers.windows(2).any(|w| w[0] > w[1]) {
            problems.push("the layers must ascend (engines concatenate the captured layers in layer order)".into());
        }
        if !problems.is_empty() {
            return Err(ModelError::Invalid(format!("drafter.aux_layers {aux_layers:?}: {}", problems.join("; "))));
        }
        Ok(Eagle3Spec {
            ttt_length: e.ttt_length,
            step_decay: e.step_decay,
            aux_layers,
            draft_vocab_size: e.draft_vocab_size.min(cfg.vocab_size).max(1),
            target_hidden_size: cfg.hidden_size,
            vocab_size: cfg.vocab_size,
            layer: DraftLayerSpec::from_target(cfg, e.hidden_size, e.num_heads, e.num_kv_heads, e.intermediate_size)?,
        })
    }

    fn check_notes(e: &mut Eagle3Section, target: &TargetConfig) -> Vec<String> {
        if e.draft_vocab_size > target.vocab_size {
            vec![format!(
                "drafter.draft_vocab_size {} is capped at the target vocabulary {}",
                e.draft_vocab_size, target.vocab_size
            )]
        } else {
            Vec::new()
        }
    }

    fn build(spec: &Eagle3Spec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Eagle3::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(_spec: &Eagle3Spec, _fresh: bool) -> TargetNeeds {
        super::eagle::target_needs()
    }

    fn feature_needs(e: &Eagle3Spec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: true,
            aux_layers: e.aux_layers.clone(),
            target_topk: 0,
        }
    }

    fn prepare_data(e: &Eagle3Spec, data: &mut dyn PrepareData) -> Result<()> {
        data.vocab_mapping(e.draft_vocab_size as usize).map(|_| ())
    }

    fn warnings(e: &Eagle3Spec) -> Vec<String> {
        if engines_serve_aux_layers(&e.aux_layers) {
            Vec::new()
        } else {
            vec![format!(
                "drafter.aux_layers {:?} repeats a layer: this trains, but no engine can serve it (they capture each layer once) and forge export will refuse it",
                e.aux_layers
            )]
        }
    }

    /// SGLang's / the EAGLE authors' `LlamaForCausalLMEagle3`, or vLLM's speculators layout
    /// (`Eagle3Speculator`).
    fn recognise(dir: &Path, cfg: &serde_json::Value, target: &TargetConfig) -> Result<Option<EngineDraft<Eagle3Spec>>> {
        let arch = architecture(cfg);
        if arch != "LlamaForCausalLMEagle3" && arch != "Eagle3Speculator" {
            return Ok(None);
        }
        let cfg_path = dir.join("config.json");
        // the speculators layout keeps the draft layer's Llama fields apart
        let speculators = arch == "Eagle3Speculator";
        let l = match cfg.get("transformer_layer_config").filter(|_| speculators) {
            Some(t) => DraftLayerSpec::from_engine_config(t, &cfg_path)?,
            None => DraftLayerSpec::from_engine_config(cfg, &cfg_path)?,
        };
        let int = |key: &str| cfg.get(key).and_then(serde_json::Value::as_i64);
        let draft_vocab = int("draft_vocab_size").unwrap_or(target.vocab_size);
        let target_hidden = int("target_hidden_size").unwrap_or(l.hidden_size);
        // forge's midlayer adds the un-normed hidden state to the residual: SGLang's and
        // vLLM's EAGLE-3 by default, the speculators parser only with an explicit false
        let nbr = cfg
            .get("norm_before_residual")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(speculators);
        if nbr {
            return Err(ModelError::Invalid(format!(
                "{}: norm_before_residual is {} for this EAGLE-3 draft (the residual is the normed hidden state); forge's EAGLE-3 adds the un-normed one and cannot load it",
                cfg_path.display(),
                if cfg.get("norm_before_residual").is_some() { "true" } else { "unset (true in the speculators layout)" }
            )));
        }
        let aux = engine_aux_layers(cfg, target, &cfg_path)?;
        if !engines_serve_aux_layers(&aux) || aux.iter().any(|&a| a < 0 || a >= target.num_layers) {
            return Err(ModelError::Invalid(format!(
                "{}: auxiliary layers {aux:?} (as target layer outputs) are not 3 distinct ascending layers of this {}-layer target",
                cfg_path.display(),
                target.num_layers
            )));
        }
        Ok(Some(EngineDraft {
            spec: Eagle3Spec {
                ttt_length: 1,
                step_decay: 1.0,
                aux_layers: aux,
                draft_vocab_size: draft_vocab,
                target_hidden_size: target_hidden,
                vocab_size: target.vocab_size,
                layer: l,
            },
            // SGLang's and vLLM's layouts hold the same tensors; vLLM's export also holds drafts
            // whose last aux layer SGLang cannot capture
            format: if speculators { ExportFormat::Speculators } else { ExportFormat::Vllm },
            weights: dir.join("model.safetensors"),
            what: "EAGLE-3 (SGLang / vLLM)",
        }))
    }
}

/// EAGLE-3's auxiliary layers (target layer outputs, 0-based) from an engine config: SGLang's
/// `eagle_config.eagle_aux_hidden_state_layer_ids` are output ids, vLLM's top-level key
/// capture points (output + 1); forge writes both (they must agree); without either, the
/// engines' default layers of the target.
fn engine_aux_layers(cfg: &serde_json::Value, target: &TargetConfig, cfg_path: &Path) -> Result<Vec<i64>> {
    let ids = |v: Option<&serde_json::Value>| -> Option<Vec<i64>> {
        v?.as_array()?.iter().map(serde_json::Value::as_i64).collect()
    };
    let sglang = ids(cfg.get("eagle_config").and_then(|e| e.get("eagle_aux_hidden_state_layer_ids")));
    let vllm: Option<Vec<i64>> = ids(cfg.get("eagle_aux_hidden_state_layer_ids")).map(|a| a.iter().map(|l| l - 1).collect());
    match (sglang, vllm) {
        (Some(s), Some(v)) if s != v => Err(ModelError::Invalid(format!(
            "{}: eagle_config.eagle_aux_hidden_state_layer_ids {s:?} (SGLang: layer outputs) and eagle_aux_hidden_state_layer_ids {:?} (vLLM: capture points, output + 1) name different layers; fix one of them",
            cfg_path.display(),
            v.iter().map(|l| l + 1).collect::<Vec<_>>()
        ))),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(target.default_aux_layers()),
    }
}

pub struct Eagle3 {
    spec: DrafterSpec,
    e: Eagle3Spec,
    vs: nn::VarStore,
    fc: Linear,
    hidden_norm: RmsNorm,
    input_layernorm: RmsNorm,
    midlayer: DecoderLayer,
    norm: RmsNorm,
    lm_head: Linear,
    d2t: Tensor,
    t2d: Tensor,
    /// The target's embedding `[V, h]` and lm_head `[V, H_t]`, frozen (compute kind).
    embed: Tensor,
    target_lm_head: Tensor,
    rotary: Rotary,
    compute: Kind,
}

/// Whether SGLang and vLLM can serve a draft trained on these auxiliary layers: both build fc
/// over exactly 3 target layers, each captured once and concatenated in layer order, so the
/// layers must be 3 distinct ascending ones.
pub fn engines_serve_aux_layers(aux: &[i64]) -> bool {
    aux.len() == 3 && aux.windows(2).all(|w| w[0] < w[1])
}

/// vLLM's `speculators` layout of an EAGLE-3 config.json (vLLM's
/// `maybe_override_with_speculators` and `SpeculatorsConfig`): no top-level `model_type` (its
/// absence routes the folder to the speculators parser), the draft layer's Llama fields under
/// `transformer_layer_config`, the EAGLE-3 fields at top level (vLLM's layer ids, written
/// already), `norm_before_residual: false` (forge's midlayer adds the un-normed hidden state,
/// and the speculators parser would otherwise assume true), and `speculators_config` naming the
/// verifier (the target) and a greedy proposal of `tokens` tokens.
fn speculators_config(llama: serde_json::Value, tokens: i64, target_config: &serde_json::Value) -> serde_json::Value {
    let mut layer = llama.clone();
    let mut top = serde_json::Map::new();
    if let Some(o) = layer.as_object_mut() {
        o.remove("architectures");
        for key in [
            "draft_vocab_size",
            "target_hidden_size",
            "eagle_aux_hidden_state_layer_ids",
            "eagle_config",
        ] {
            if let Some(v) = o.remove(key) {
                top.insert(key.into(), v);
            }
        }
        o.insert("model_type".into(), "llama".into());
    }
    let verifier_arch = target_config
        .get("architectures")
        .cloned()
        .unwrap_or_else(|| serde_json::json!(["LlamaForCausalLM"]));
    let verifier = target_config
        .get("_name_or_path")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let mut c = serde_json::json!({
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens, "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier, "architectures": verifier_arch},
        },
        "transformer_layer_config": layer,
        "norm_before_residual": false,
    });
    if let Some(o) = c.as_object_mut() {
        o.extend(top);
    }
    c
}

/// Writes a vocabulary mapping into an EAGLE-3 VarStore's `d2t` / `t2d` buffers and, when the
/// target's lm_head is given, initialises `lm_head` from its rows at the draft vocabulary.
pub fn install_vocab_mapping(
    vs: &nn::VarStore,
    d2t: &[i64],
    t2d: &[bool],
    target_lm_head: Option<&Tensor>,
) -> Result<()> {
    let vars = vs.variables();
    let (Some(d), Some(t)) = (vars.get("d2t"), vars.get("t2d")) else {
        return Err(ModelError::Invalid("this drafter has no d2t/t2d buffers".into()));
    };
    if d.size() != [d2t.len() as i64] || t.size() != [t2d.len() as i64] {
        return Err(ModelError::Invalid(format!(
            "vocabulary mapping of {} draft / {} target tokens does not fit d2t {:?} / t2d {:?}",
            d2t.len(),
            t2d.len(),
            d.size(),
            t.size()
        )));
    }
    let dev = d.device();
    let new_d = Tensor::from_slice(d2t).to_device(dev);
    let ids = Tensor::arange(d2t.len() as i64, (Kind::Int64, dev)) + &new_d;
    let target_ids: Vec<i64> = d2t.iter().enumerate().map(|(i, d)| i as i64 + d).collect();
    if target_ids.iter().any(|&id| id < 0 || id >= t2d.len() as i64) || target_ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ModelError::Invalid(
            "vocabulary mapping: d2t must map draft ids to ascending target ids inside the target vocabulary".into(),
        ));
    }
    let mut new_t = Tensor::zeros([t2d.len() as i64], (Kind::Bool, dev));
    let _ = new_t.index_fill_(0, &ids, 1);
    let given: Vec<bool> = t2d.to_vec();
    let given = Tensor::from_slice(&given.iter().map(|&b| b as u8).collect::<Vec<u8>>())
        .to_device(dev)
        .to_kind(Kind::Bool);
    if !given.equal(&new_t) {
        return Err(ModelError::Invalid(
            "vocabulary mapping: t2d does not mark exactly the d2t targets".into(),
        ));
    }
    tch::no_grad(|| {
        d.shallow_clone().copy_(&new_d);
        t.shallow_clone().copy_(&new_t);
        if let (Some(w), Some(head)) = (target_lm_head, vars.get("lm_head.weight")) {
            if w.size()[1] == head.size()[1] {
                head.shallow_clone()
                    .copy_(&w.to_device(dev).to_kind(Kind::Float).index_select(0, &ids));
            }
        }
    });
    Ok(())
}

/// The target's side of an EAGLE-3 loss ([`Eagle3::target_probs`]), all `[B, T]` but
/// `probs` `[B, T, Vd]`.
pub struct TargetDist {
    /// The target's distribution at each position over the draft vocabulary.
    pub probs: Tensor,
    /// Whether each position is trained.
    pub keep: Tensor,
    /// The draft-vocabulary index of `probs`' arg-max.
    pub argmax: Tensor,
    /// The entropy of `probs` (nats).
    pub entropy: Tensor,
}

impl Eagle3 {
    pub fn new(e: Eagle3Spec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        let l = &e.layer;
        l.validate()?;
        if e.ttt_length < 1 || e.aux_layers.is_empty() || e.draft_vocab_size < 1 || e.draft_vocab_size > e.vocab_size {
            return Err(ModelError::Invalid(format!(
                "eagle3: ttt_length must be >= 1, aux_layers non-empty, draft_vocab_size in 1..={} (got {}, {:?}, {})",
                e.vocab_size, e.ttt_length, e.aux_layers, e.draft_vocab_size
            )));
        }
        if l.hidden_size != e.target_hidden_size {
            return Err(ModelError::Invalid(format!(
                "eagle3: the draft reads the target's (frozen, shared) embedding, so its hidden_size must be the target's {} (got {})",
                e.target_hidden_size, l.hidden_size
            )));
        }
        let (h, v, vd) = (l.hidden_size, e.vocab_size, e.draft_vocab_size);
        let embed = frozen(target, EMBED, [v, h], device, compute, "eagle3")?;
        let target_lm_head = frozen(target, LM_HEAD, [v, e.target_hidden_size], device, compute, "eagle3")?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let init = ParamInit::Default;
        let a = e.aux_layers.len() as i64 * e.target_hidden_size;
        let fc = linear(&root / "fc", a, h, false, init, compute);
        let mid = &root / "midlayer";
        let hidden_norm = RmsNorm::new(&mid / "hidden_norm", h, l.rms_norm_eps, init);
        let input_layernorm = RmsNorm::new(&mid / "input_layernorm", h, l.rms_norm_eps, init);
        let midlayer = DecoderLayer::new(mid, l.layer_config(2 * h, compute), init);
        let norm = RmsNorm::new(&root / "norm", h, l.rms_norm_eps, init);
        let lm_head = linear(&root / "lm_head", h, vd, false, init, compute);
        let d2t = root.add("d2t", Tensor::zeros([vd], (Kind::Int64, device)), false);
        let t2d = root.add("t2d", Tensor::arange(v, (Kind::Int64, device)).lt(vd), false);
        let rotary = Rotary::new(l.head_dim, l.rope_theta, &l.rope_scaling, device);
        Ok(Self {
            spec: DrafterSpec::Eagle3(e.clone()),
            e,
            vs,
            fc,
            hidden_norm,
            input_layernorm,
            midlayer,
            norm,
            lm_head,
            d2t,
            t2d,
            embed,
            target_lm_head,
            rotary,
            compute,
        })
    }

    pub fn eagle3_spec(&self) -> &Eagle3Spec {
        &self.e
    }

    /// Target ids of the draft vocabulary `[draft_vocab]`.
    pub fn draft_ids(&self) -> Tensor {
        Tensor::arange(self.e.draft_vocab_size, (Kind::Int64, self.d2t.device())) + &self.d2t
    }

    /// Target side, no gradients: for every position p, the target's distribution at p over
    /// the draft vocabulary (fp32, zero rows where unused), whether position p is trained
    /// (token p+1 is a trained token and the target's arg-max at p is in the draft
    /// vocabulary), and, computed once here for every TTT step that reads them, the
    /// distribution's arg-max and entropy.
    pub fn target_probs(&self, f: &Features) -> Result<TargetDist> {
        let hidden = f.hidden_normed()?;
        let head = &self.target_lm_head;
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let device = hidden.device();
        let vd = self.e.draft_vocab_size;
        Ok(tch::no_grad(|| {
            let next = shift_left(&f.loss_mask.ne(0).to_kind(Kind::Int64), 1).ne(0); // [B, T]
            let idx = rows(&next);
            let mut probs = Tensor::zeros([b * t, vd], (Kind::Float, device));
            let mut keep = Tensor::zeros([b * t], (Kind::Bool, device));
            let mut argmax = Tensor::zeros([b * t], (Kind::Int64, device));
            let mut entropy = Tensor::zeros([b * t], (Kind::Float, device));
            let n = idx.size()[0];
            let ids = self.draft_ids();
            let flat = hidden.reshape([b * t, -1]);
            let kind = head.kind();
            let chunk = 1024;
            let mut s = 0;
            while s < n {
                let m = chunk.min(n - s);
                let sel = idx.narrow(0, s, m);
                let logits = flat
                    .index_select(0, &sel)
                    .to_kind(kind)
                    .matmul(&head.tr())
                    .to_kind(Kind::Float);
                let arg = logits.argmax(-1, false);
                let ok = self.t2d.index_select(0, &arg);
                let p = logits.index_select(1, &ids).softmax(-1, Kind::Float);
                let ent = -(&p * p.clamp_min(1e-30).log()).sum_dim_intlist(-1, false, Kind::Float);
                let _ = probs.index_copy_(0, &sel, &p);
                let _ = keep.index_copy_(0, &sel, &ok);
                let _ = argmax.index_copy_(0, &sel, &p.argmax(-1, false));
                let _ = entropy.index_copy_(0, &sel, &ent);
                s += m;
            }
            TargetDist {
                probs: probs.view([b, t, vd]),
                keep: keep.view([b, t]),
                argmax: argmax.view([b, t]),
                entropy: entropy.view([b, t]),
            }
        }))
    }

    /// The midlayer on `emb` (token embeddings) and `hidden` at RoPE `cos`/`sin`: the shared
    /// decoder layer with attention input `cat(input_layernorm(emb), hidden_norm(hidden))`
    /// (2h wide) and residual `hidden`; returns the output hidden state `[B, T, h]` (before
    /// `norm`).
    fn midlayer(
        &self,
        emb: &Tensor,
        hidden: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        keys: Keys,
    ) -> Tensor {
        let x = Tensor::cat(
            &[self.input_layernorm.forward(emb), self.hidden_norm.forward(hidden)],
            -1,
        );
        self.midlayer.forward_split(hidden, &x, cos, sin, mask, keys)
    }

    /// One midlayer pass while decoding: attention over `cache` (appended to) at RoPE
    /// positions `start..start+T`; `next` are the tokens whose embeddings are read.
    fn midlayer_cached(&self, hidden: &Tensor, next: &[i64], start: i64, cache: &mut LayerKv) -> Tensor {
        let device = hidden.device();
        let h = self.e.layer.hidden_size;
        let k = next.len() as i64;
        let ids = Tensor::from_slice(next).to_device(device);
        let emb = self.embed.index_select(0, &ids).view([1, k, h]);
        let pos = Tensor::arange_start(start, start + k, (Kind::Int64, device)).view([1, k]);
        let (cos, sin) = self.rotary.cos_sin(&pos, self.compute);
        let mask = AttnMask::for_cache(1, cache.len(), k, device);
        self.midlayer(&emb, hidden, &cos, &sin, &mask, Keys::Cache(cache))
    }

    /// The training-time-test unroll: the output hidden state `[B, T, h]` (before `norm`) of
    /// every step (at most ttt_length; steps with no position left to predict are skipped).
    pub fn step_hidden(&self, f: &Features) -> Result<Vec<Tensor>> {
        let c = self.compute;
        let aux = f
            .aux_hidden
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("eagle3 needs the target's auxiliary hidden states".into()))?;
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let h = self.e.layer.hidden_size;
        let embed = &self.embed;
        let mask0 = AttnMask::Explicit(build_mask(b, 0, t, Some(&f.attention_mask), None, aux.device()));
        let mut hidden = self.fc.forward(aux);
        let mut kv = TttKv::default();
        let mut out = Vec::new();
        for i in 0..self.e.ttt_length.min(t - 1) {
            // step i at position p reads token p+i+1 at RoPE position p+i
            let ids = shift_left(&f.input_ids, i + 1);
            let emb = embed.index_select(0, &ids.reshape([-1])).view([b, t, h]);
            let (cos, sin) = self.rotary.cos_sin(&(&f.position_ids + i), c);
            hidden = self.midlayer(&emb, &hidden, &cos, &sin, &mask0, Keys::Ttt(&mut kv));
            out.push(hidden.shallow_clone());
        }
        Ok(out)
    }

    /// Draft logits `[N, Vd]` (fp32) of hidden states `[N, h]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(&self.norm.forward(hidden)).to_kind(Kind::Float)
    }
}

impl Drafter for Eagle3 {
    fn spec(&self) -> &DrafterSpec {
        &self.spec
    }

    /// An engine folder's vocabulary mapping (`d2t`, `t2d`), validated as one: ascending
    /// draft ids, `t2d` marking them. A full-vocabulary draft's folder may leave them out
    /// (forge's exports do: the only mapping is the identity, the one built) or hold them.
    fn imported(&self, file: &BTreeMap<String, Tensor>) -> Result<Vec<String>> {
        let (Some(d), Some(t)) = (file.get("d2t"), file.get("t2d")) else {
            if file.contains_key("d2t") || file.contains_key("t2d") {
                return Err(ModelError::Invalid(
                    "the folder holds one of d2t and t2d without the other".into(),
                ));
            }
            if self.e.draft_vocab_size < self.e.vocab_size {
                return Err(ModelError::Invalid(format!(
                    "a draft vocabulary of {} of the target's {} tokens needs its mapping: d2t and t2d are missing",
                    self.e.draft_vocab_size, self.e.vocab_size
                )));
            }
            return Ok(Vec::new());
        };
        let d2t = Vec::<i64>::try_from(&d.to_kind(Kind::Int64))?;
        let t2d: Vec<bool> = Vec::<i64>::try_from(&t.to_kind(Kind::Int64))?.into_iter().map(|x| x != 0).collect();
        install_vocab_mapping(&self.vs, &d2t, &t2d, None)?;
        Ok(vec!["d2t".into(), "t2d".into()])
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The draft vocabulary from the training data, and `lm_head` initialised from the
    /// target's lm_head rows at it.
    fn prepare(&mut self, data: &mut dyn PrepareData, target: &TargetAccess) -> Result<()> {
        let (d2t, t2d) = data.vocab_mapping(self.e.draft_vocab_size as usize)?;
        install_vocab_mapping(&self.vs, &d2t, &t2d, target.tensor(LM_HEAD).as_ref())
    }

    fn loss(&self, f: &Features, ctx: &StepContext) -> Result<LossOutput> {
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let h = self.e.layer.hidden_size;
        let target = self.target_probs(f)?;
        let (probs, keep) = (&target.probs, &target.keep);
        let steps = self.step_hidden(f)?;
        // zero with a graph: a batch without trained positions still back-propagates
        let mut total = self.lm_head.ws.sum(Kind::Float) * 0.0;
        let (mut parts, mut metrics) = (Vec::new(), Vec::new());
        // The rows each step is trained on (step i at position p is matched to the target's
        // distribution at p + i + 1), gathered first so that the draft's norm and lm_head run
        // once over the rows of every step: one large matrix product (and one for each
        // gradient) instead of one per step, which runs the same arithmetic row by row at a
        // better rate.
        let mut picked: Vec<Option<(Tensor, i64)>> = Vec::new();
        let mut xs = Vec::new();
        for i in 0..self.e.ttt_length {
            let Some(hidden) = steps.get(i as usize) else {
                picked.push(None);
                continue;
            };
            let n = t - i - 1;
            let idx = rows(&keep.narrow(1, i + 1, n));
            let count = idx.size()[0];
            if count == 0 {
                picked.push(None);
                continue;
            }
            xs.push(hidden.narrow(1, 0, n).reshape([b * n, h]).index_select(0, &idx));
            picked.push(Some((idx, n)));
        }
        // split, not narrowed: the split's backward is one concatenation of the steps'
        // gradients (narrowing would give each step a zero-filled full-size gradient to add)
        let counts: Vec<i64> = xs.iter().map(|x| x.size()[0]).collect();
        let mut logits = if xs.is_empty() {
            Vec::new()
        } else {
            self.logits(&Tensor::cat(&xs, 0)).split_with_sizes(&counts, 0)
        }
        .into_iter();
        // Every step reports every metric (count 0 when it has no trained position), so that
        // metric sets agree across micro-batches and ranks.
        for (i, pick) in picked.iter().enumerate() {
            let (mut ce_v, mut hits, mut kl_v, mut cnt) = (0.0, 0.0, 0.0, 0.0);
            if let Some((idx, n)) = pick {
                let (i64_i, n) = (i as i64, *n);
                let count = idx.size()[0];
                let lg = logits
                    .next()
                    .ok_or_else(|| ModelError::Invalid("eagle3: a step without its logits".into()))?;
                let sel = |x: &Tensor| x.narrow(1, i64_i + 1, n).reshape([b * n, -1]).index_select(0, idx);
                let p = sel(probs);
                let ce = soft_ce(&lg, &p);
                total += &ce * self.e.step_decay.powi(i as i32);
                cnt = count as f64;
                ce_v = ce.double_value(&[]);
                // KL(target || draft) = soft-CE - target entropy: 0 for a perfect draft
                let (hit, ent) = tch::no_grad(|| {
                    let hit = lg.argmax(-1, false).eq_tensor(&sel(&target.argmax).view([-1]));
                    (
                        hit.sum(Kind::Float).double_value(&[]),
                        sel(&target.entropy).sum(Kind::Float).double_value(&[]),
                    )
                });
                hits = hit;
                kl_v = ce_v - ent / cnt;
            }
            let m = |name: String, sum: f64| Metric { name, sum, count: cnt };
            parts.push(m(format!("ce/step{i}"), ce_v * cnt));
            metrics.push(m(format!("acc/step{i}"), hits));
            metrics.push(m(format!("kl/step{i}"), kl_v * cnt));
        }
        if !ctx.train {
            // chains of ttt_length proposals from each start p: step i proposes token p+i+2
            // (a start counts where each proposal's token is trained; a target arg-max outside
            // the draft vocabulary is a miss, not a skipped position)
            let starts = t - self.e.ttt_length;
            let (mut hits, mut valid) = (Vec::new(), Vec::new());
            tch::no_grad(|| {
                let trained = shift_left(&f.loss_mask.ne(0).to_kind(Kind::Int64), 1).ne(0);
                for i in 0..self.e.ttt_length {
                    match steps.get(i as usize).filter(|_| starts > 0) {
                        Some(hidden) => {
                            let x = hidden.narrow(1, 0, starts).reshape([b * starts, h]);
                            let arg = self.logits(&x).argmax(-1, false).view([b, starts]);
                            let hit = arg.eq_tensor(&probs.narrow(1, i + 1, starts).argmax(-1, false));
                            hits.push(hit.logical_and(&keep.narrow(1, i + 1, starts)));
                            valid.push(trained.narrow(1, i + 1, starts));
                        }
                        None => {
                            let none = Tensor::zeros([b, 0], (Kind::Bool, f.input_ids.device()));
                            hits.push(none.shallow_clone());
                            valid.push(none);
                        }
                    }
                }
            });
            metrics.extend(super::chain_metrics(&hits, &valid));
        }
        Ok(LossOutput {
            loss: total,
            parts,
            metrics,
        })
    }

    /// The target's side under no_grad: its full lm_head `[V, H_t]` over the T-1 positions
    /// whose next token is trained. fc over the auxiliary layers (inputs need no gradient) at
    /// every position. Then min(ttt_length, T-1) unrolled steps, each running the midlayer
    /// over all T positions: q/k/v over its 2h-wide input (the trainable norms make even step
    /// 0's input need a gradient), o_proj and the MLP; attention computes the full T x T
    /// scores over the step-0 keys plus one diagonal key per earlier step (T + i keys per
    /// query in step i, values alike); step i's draft lm_head `[Vd, h]` reads the T-i-1
    /// positions it is trained on.
    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        if seq_len < 1 {
            return TokenMacs::default();
        }
        let e = &self.e;
        let l = &e.layer;
        let t = seq_len as f64;
        let (h, ht, v, vd) = (
            l.hidden_size as f64,
            e.target_hidden_size as f64,
            e.vocab_size as f64,
            e.draft_vocab_size as f64,
        );
        let aux = e.aux_layers.len() as f64 * ht;
        let mut macs = TokenMacs::none(v * ht * (t - 1.0) / t) + TokenMacs::one(aux * h);
        for i in 0..e.ttt_length.min(seq_len - 1) {
            let i = i as f64;
            let midlayer = l.layer_macs(2 * l.hidden_size) + l.attention_macs(t + i);
            macs = macs + TokenMacs::both(midlayer + vd * h * (t - i - 1.0) / t);
        }
        macs
    }

    fn export_formats(&self) -> &'static [ExportFormat] {
        &[ExportFormat::Sglang, ExportFormat::Vllm, ExportFormat::Speculators]
    }

    /// fc, the midlayer, its norm and the draft-vocabulary lm_head (all its own weights; the
    /// embedding is the target's, gathered).
    fn serving_shape(&self) -> Option<super::ServingShape> {
        let l = &self.e.layer;
        Some(super::ServingShape {
            params_per_forward: super::float_params(&self.vs),
            layers: 1,
            kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            q_dim: l.num_heads * l.head_dim,
            one_forward: false,
            sglang_algorithm: Some("EAGLE3"),
            vllm_method: Some(("eagle3", "vLLM 0.33 / 0.34")),
        })
    }

    fn serving(&self, format: ExportFormat) -> Option<&'static str> {
        match format {
            // every folder carries both engines' aux-layer keys (docs/export.md)
            ExportFormat::Sglang | ExportFormat::Vllm => Some(
                "SGLang 0.5.23: --speculative-algorithm EAGLE3 --speculative-draft-model-path DIR \
                 (unset steps/topk/draft tokens give a Llama target a tree 5/4/8, other targets a chain 3/1/4); \
                 vLLM 0.33 / 0.34: --speculative-config '{\"method\": \"eagle3\", \"model\": \"DIR\", \"num_speculative_tokens\": 5}'",
            ),
            ExportFormat::Speculators => Some(
                "vLLM 0.33 / 0.34 (the speculators layout is read by its speculators config parser): \
                 --speculative-config '{\"model\": \"DIR\", \"num_speculative_tokens\": 5}'",
            ),
            _ => None,
        }
    }

    fn export(&self, format: ExportFormat, target_config: &serde_json::Value) -> Result<ExportBundle> {
        if !matches!(
            format,
            ExportFormat::Sglang | ExportFormat::Vllm | ExportFormat::Speculators
        ) {
            return Err(ModelError::Invalid(format!(
                "eagle3 drafters export to sglang, vllm, speculators or forge, not {}",
                format.name()
            )));
        }
        let e = &self.e;
        let l = &e.layer;
        let (h, vd) = (l.hidden_size, e.draft_vocab_size);
        let (q, kv) = (l.num_heads * l.head_dim, l.num_kv_heads * l.head_dim);
        // One table for both engines: forge names are the engines' names.
        let expected: Vec<(String, Vec<i64>)> = vec![
            (
                "fc.weight".into(),
                vec![h, e.aux_layers.len() as i64 * e.target_hidden_size],
            ),
            ("midlayer.hidden_norm.weight".into(), vec![h]),
            ("midlayer.input_layernorm.weight".into(), vec![h]),
            ("midlayer.self_attn.q_proj.weight".into(), vec![q, 2 * h]),
            ("midlayer.self_attn.k_proj.weight".into(), vec![kv, 2 * h]),
            ("midlayer.self_attn.v_proj.weight".into(), vec![kv, 2 * h]),
            ("midlayer.self_attn.o_proj.weight".into(), vec![h, q]),
            ("midlayer.post_attention_layernorm.weight".into(), vec![h]),
            ("midlayer.mlp.gate_proj.weight".into(), vec![l.intermediate_size, h]),
            ("midlayer.mlp.up_proj.weight".into(), vec![l.intermediate_size, h]),
            ("midlayer.mlp.down_proj.weight".into(), vec![h, l.intermediate_size]),
            ("norm.weight".into(), vec![h]),
            ("lm_head.weight".into(), vec![vd, h]),
        ];
        // The vocabulary mapping, unless it is the identity (a full-vocabulary draft: d2t must
        // map ascending ids inside the vocabulary, so no other mapping exists), which engines
        // assume when it is absent and vLLM's loader refuses as unexpected tensors.
        let mut expected = expected;
        if vd < e.vocab_size {
            expected.push(("d2t".into(), vec![vd]));
            expected.push(("t2d".into(), vec![e.vocab_size]));
        }
        // Both engines capture each auxiliary layer once, in layer order, and build fc over
        // exactly 3 of them: the draft's fc reads its layers in the listed order, so only 3
        // distinct ascending layers serve what was trained.
        let a = &e.aux_layers;
        if !engines_serve_aux_layers(a) {
            return Err(ModelError::Invalid(format!(
                "eagle3 aux_layers {a:?} cannot be served by {}: SGLang and vLLM build fc over exactly 3 target layers, each captured once and concatenated in layer order; train with 3 distinct ascending drafter.aux_layers (the target needs at least 3 layers)",
                format.name()
            )));
        }
        let mut tensors = export_same_names(&self.vs, &expected, &format!("{} eagle3", format.name()))?;
        if format == ExportFormat::Speculators {
            // the speculators layout (what its checkpoints on the hub hold) names the decoder
            // layer layers.0.*; SGLang and vLLM's own layout name it midlayer.*
            for (name, _) in &mut tensors {
                if let Some(rest) = name.strip_prefix("midlayer.") {
                    *name = format!("layers.0.{rest}");
                }
            }
        }
        let mut config = l.llama_config("LlamaForCausalLMEagle3", target_config);
        config["vocab_size"] = e.vocab_size.into();
        config["draft_vocab_size"] = vd.into();
        config["target_hidden_size"] = e.target_hidden_size.into();
        // forge's aux layer l is the *output* of target layer l (0-based). Both engines
        // capture a layer's input: SGLang reads eagle_config.eagle_aux_hidden_state_layer_ids
        // and adds 1 itself; vLLM reads the top-level key as capture points (no + 1). Both
        // keys go into every folder, so that a draft exported for one engine and served by the
        // other reads the layers it was trained on (not the engine's default ones).
        if format == ExportFormat::Sglang {
            // SGLang captures the input of layer l + 1: the last layer's output is not there
            let layers = target_config.get("num_hidden_layers").and_then(serde_json::Value::as_i64);
            if let (Some(n), Some(&last)) = (layers, a.iter().max()) {
                if last >= n - 1 {
                    return Err(ModelError::Invalid(format!(
                        "eagle3 aux_layers {a:?} cannot be served by sglang: SGLang captures the input of layer l + 1 for aux layer l, so the largest it serves on this {n}-layer target is {} (train with drafter.aux_layers below it, or export for vllm)",
                        n - 2
                    )));
                }
            }
        }
        config["eagle_config"] = serde_json::json!({ "eagle_aux_hidden_state_layer_ids": a });
        let ids: Vec<i64> = a.iter().map(|l| l + 1).collect();
        config["eagle_aux_hidden_state_layer_ids"] = ids.into();
        if format == ExportFormat::Speculators {
            config = speculators_config(config, e.ttt_length, target_config);
        }
        Ok(ExportBundle {
            tensor_files: vec![("model.safetensors".into(), tensors)],
            json_files: vec![("config.json".into(), config)],
        })
    }

    fn session<'a>(&'a self, _target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        Ok(Box::new(Eagle3Session {
            m: self,
            draft_ids: self.draft_ids(),
            cache: LayerKv::default(),
            committed: 0,
            last: None,
            drafted: DraftedPath::default(),
        }))
    }
}

/// Speculative decoding with EAGLE-3, the inference form of training-time test: committed
/// positions run the midlayer on fc(auxiliary target layers) with their keys/values kept in
/// the draft's cache (step 0 of TTT); proposal step i runs on the previous step's output
/// hidden state at RoPE position committed - 1 + i, attending to the committed keys and the
/// earlier steps' keys, exactly as TTT's mask lets step i attend in training. Draft-vocabulary
/// ids map to target ids through d2t.
struct Eagle3Session<'a> {
    m: &'a Eagle3,
    /// Target ids of the draft vocabulary `[Vd]`.
    draft_ids: Tensor,
    cache: LayerKv,
    committed: i64,
    /// The midlayer output at the last committed position `[1, 1, h]`.
    last: Option<Tensor>,
    /// Tree drafting: the path whose steps the cache holds past the committed positions.
    drafted: DraftedPath,
}

impl Eagle3Session<'_> {
    /// The draft's logits over the target vocabulary `[V]` (-inf outside the draft vocabulary)
    /// for a midlayer output `[1, 1, h]`.
    fn full_logits(&self, hidden: &Tensor) -> Tensor {
        let draft = self.m.logits(&hidden.view([1, -1])).view([-1]);
        Tensor::full([self.m.e.vocab_size], f64::NEG_INFINITY, (Kind::Float, draft.device())).index_copy(
            0,
            &self.draft_ids,
            &draft,
        )
    }
}

impl DraftSession for Eagle3Session<'_> {
    fn commit(&mut self, start: i64, features: &StepFeatures, next: &[i64]) -> Result<()> {
        if start != self.committed {
            return Err(ModelError::Invalid(format!(
                "eagle3: commit at {start}, {} positions committed",
                self.committed
            )));
        }
        let aux = features
            .aux
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("eagle3 needs the target's auxiliary hidden states".into()))?;
        self.cache.truncate(start);
        let hidden = self.m.fc.forward(&aux.unsqueeze(0));
        let out = self.m.midlayer_cached(&hidden, next, start, &mut self.cache);
        let k = next.len() as i64;
        self.committed = start + k;
        let last = out.narrow(1, k - 1, 1);
        self.drafted.reset(&last);
        self.last = Some(last);
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        let mut hidden = self
            .last
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("eagle3: propose before commit".into()))?
            .shallow_clone();
        self.drafted.reset(&hidden);
        let (mut tokens, mut logits) = (Vec::with_capacity(gamma), Vec::with_capacity(gamma));
        for i in 0..gamma {
            let full = self.full_logits(&hidden);
            let token = pick(&full, sampling, rng)?;
            tokens.push(token);
            logits.push(full);
            if i + 1 < gamma {
                hidden = self
                    .m
                    .midlayer_cached(&hidden, &[token], self.committed + i as i64, &mut self.cache);
            }
        }
        self.cache.truncate(self.committed);
        Ok(Proposal {
            tokens,
            logits: Tensor::stack(&logits, 0),
        })
    }

    fn can_branch(&self) -> bool {
        true
    }

    /// The proposal loop's steps along `path`: step i at position committed + i.
    fn path_logits(&mut self, path: &[i64]) -> Result<Tensor> {
        let (m, committed) = (self.m, self.committed);
        let c = self.drafted.keep_common(path)?;
        self.cache.truncate(committed + c as i64);
        let cache = &mut self.cache;
        let hidden = self
            .drafted
            .extend(path, |h, token, i| Ok(m.midlayer_cached(h, &[token], committed + i as i64, cache)))?;
        Ok(self.full_logits(&hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, heads, macs, matrix_macs, tiny_layer};

    /// Hidden 64 (4 heads / 2 KV heads of 16, MLP 128), 3 auxiliary layers, vocabulary 96,
    /// draft vocabulary 32, ttt_length 3. Per position: fc 192 x 64 = 12288 (grad_one); per
    /// step the midlayer, q 128 x 64 = 8192 + k 4096 + v 4096 over the 128-wide input, o 4096,
    /// MLP 24576: 45056, and attention 2 x 64 MACs per key over T + i keys in step i; step i's
    /// lm_head 32 x 64 = 2048 over T-i-1 of T positions (all grad_both). The target's lm_head
    /// 96 x 64 = 6144 over T-1 of T positions (no_grad).
    /// - T = 16, 3 steps: grad_both 3 * 45056 + 128 * (16 + 17 + 18) + 2048 * (15 + 14 + 13)/16
    ///   = 135168 + 6528 + 5376 = 147072; no_grad 6144 * 15/16 = 5760.
    /// - T = 32: 135168 + 128 * 99 + 2048 * 90/32 = 135168 + 12672 + 5760 = 153600; no_grad
    ///   6144 * 31/32 = 5952 (doubling T: attention + 6144, the rest only by shares).
    /// - T = 2: one step (T-1): 45056 + 128 * 2 + 2048 * 1/2 = 46336; no_grad 3072.
    #[test]
    fn token_macs_count_every_ttt_step_its_extra_keys_and_the_draft_head() {
        let spec = Eagle3Spec {
            ttt_length: 3,
            step_decay: 0.8,
            aux_layers: vec![0, 1, 2],
            draft_vocab_size: 32,
            target_hidden_size: 64,
            vocab_size: 96,
            layer: tiny_layer(),
        };
        let m = Eagle3::new(spec, &heads(96, 64), Device::Cpu, Kind::Float).expect("eagle3");
        for (t, want) in [
            (16, macs(147072.0, 12288.0, 5760.0)),
            (32, macs(153600.0, 12288.0, 5952.0)),
            (2, macs(46336.0, 12288.0, 3072.0)),
        ] {
            let got = m.token_macs(t);
            assert_macs(got, want, &format!("T {t}"));
            // from the VarStore: fc once, the midlayer once per step, the head on its share
            // of the positions per step; plus attention over T + i keys in step i
            let tf = t as f64;
            let steps: Vec<f64> = (0..3.min(t - 1)).map(|i| i as f64).collect();
            let trained = matrix_macs(&m.vs, |name| match name {
                "fc.weight" => Some(1.0),
                "lm_head.weight" => Some(steps.iter().map(|i| (tf - i - 1.0) / tf).sum()),
                n if n.starts_with("midlayer.") => Some(steps.len() as f64),
                _ => None,
            });
            let attention: f64 = steps.iter().map(|i| 2.0 * 64.0 * (tf + i)).sum();
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + attention, 0.0, 0.0),
                &format!("T {t}: from the VarStore"),
            );
        }
    }
}
