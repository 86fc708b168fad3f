//! Medusa (Cai et al. 2024; method: docs/methods/medusa.md): K heads on the target's last normed hidden state.
//! Head k (1-based) = ResBlock^L (x + SiLU(Linear(x)), weight zero-initialised, with bias) ->
//! Linear(H, V, bias=False) initialised from the target's lm_head (or the target's lm_head
//! itself, frozen and shared, with `original_lm_head`). Head k at position t predicts token
//! t+k+1; loss = sum_k decay^k * CE_k over positions whose label is a trained token.
//!
//! Weight names (VarStore = forge checkpoint = vLLM names): `blocks.{k}.layers.{j}.weight|bias`
//! `[H, H]|[H]`, `lm_heads.{k}.weight` `[V, H]` (0-based k).

use super::{
    architecture, ce_and_hits, check_names_and_shapes, config_int, Drafter, DrafterKind, DrafterSpec, EngineDraft,
    ExportBundle, ExportFormat, FeatureNeeds, Features, LossOutput, Metric, ResolveTarget, StepContext, TargetAccess,
    TargetNeeds, TokenMacs, LM_HEAD,
};
use crate::llm::TargetConfig;
use forge_schema::Ctx;
use std::path::Path;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::{project, Linear};
use crate::speculative::{pick, DraftSession, Proposal, StepFeatures};
use crate::llm::TargetModel;
use tch::{nn, Device, Kind, Tensor};

/// Medusa's hyper-parameters plus the target dimensions it is built for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MedusaSpec {
    pub num_heads: i64,
    pub num_layers: i64,
    pub original_lm_head: bool,
    pub loss_decay: f64,
    pub top_k: i64,
    pub hidden_size: i64,
    pub vocab_size: i64,
}

impl MedusaSpec {
    /// A fresh drafter initialises its heads from the target's lm_head; a loaded one needs it
    /// only when it shares it (`original_lm_head`).
    pub fn target_needs(&self, fresh: bool) -> TargetNeeds {
        if fresh || self.original_lm_head {
            TargetNeeds::Tensors(vec![LM_HEAD.into()])
        } else {
            TargetNeeds::Nothing
        }
    }
}

forge_schema::section! {
    /// Medusa heads on the target's last hidden state (docs/methods/medusa.md).
    pub struct MedusaSection {
        /// Number of heads; head k (1-based) predicts token t+k+1.
        num_heads: i64 = 4,
        /// ResBlocks (x + SiLU(Linear(x))) per head.
        num_layers: i64 = 1,
        /// Share the target's lm_head (frozen) instead of one trainable copy per head.
        original_lm_head: bool = false,
        /// Loss weight of head k is loss_decay^k.
        loss_decay: f64 = 0.8,
        /// Accuracy@k logged per head besides top-1.
        top_k: i64 = 3,
    }
}

impl DrafterKind for Medusa {
    const DOCS: &'static str = "docs/methods/medusa.md";
    type Section = MedusaSection;
    type Spec = MedusaSpec;

    fn validate(m: &MedusaSection, cx: &mut Ctx) {
        cx.positive("drafter.num_heads", m.num_heads);
        if m.num_layers < 0 {
            cx.issue_at("drafter.num_layers", format!("must be >= 0, got {}", m.num_layers));
        }
        cx.fraction("drafter.loss_decay", m.loss_decay);
        cx.positive("drafter.top_k", m.top_k);
    }

    fn resolve(m: &MedusaSection, target: ResolveTarget) -> Result<MedusaSpec> {
        Ok(MedusaSpec {
            num_heads: m.num_heads,
            num_layers: m.num_layers,
            original_lm_head: m.original_lm_head,
            loss_decay: m.loss_decay,
            top_k: m.top_k,
            hidden_size: target.config.hidden_size,
            vocab_size: target.config.vocab_size,
        })
    }

    fn build(spec: &MedusaSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Medusa::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(spec: &MedusaSpec, fresh: bool) -> TargetNeeds {
        spec.target_needs(fresh)
    }

    fn feature_needs(_spec: &MedusaSpec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: true,
            ..FeatureNeeds::default()
        }
    }

    /// vLLM's `MedusaModel` folder, or FasterDecoding / TensorRT-LLM's
    /// `medusa_lm_head.safetensors` with its `medusa_num_heads` config.
    fn recognise(dir: &Path, cfg: &serde_json::Value, target: &TargetConfig) -> Result<Option<EngineDraft<MedusaSpec>>> {
        let cfg_path = dir.join("config.json");
        let spec = |num_heads, num_layers, original_lm_head| MedusaSpec {
            num_heads,
            num_layers,
            original_lm_head,
            loss_decay: 0.8,
            top_k: 3,
            hidden_size: target.hidden_size,
            vocab_size: target.vocab_size,
        };
        let heads_file = dir.join("medusa_lm_head.safetensors");
        if heads_file.is_file() && cfg.get("medusa_num_heads").is_some() {
            return Ok(Some(EngineDraft {
                spec: spec(
                    config_int(cfg, "medusa_num_heads", &cfg_path)?,
                    config_int(cfg, "medusa_num_layers", &cfg_path)?,
                    false,
                ),
                format: ExportFormat::FasterDecoding,
                weights: heads_file,
                what: "FasterDecoding / TensorRT-LLM Medusa",
            }));
        }
        if architecture(cfg) == "MedusaModel" {
            let original = cfg.get("original_lm_head").and_then(serde_json::Value::as_bool).unwrap_or(false);
            return Ok(Some(EngineDraft {
                spec: spec(
                    config_int(cfg, "num_heads", &cfg_path)?,
                    config_int(cfg, "num_hidden_layers", &cfg_path)?,
                    original,
                ),
                format: ExportFormat::Vllm,
                weights: dir.join("model.safetensors"),
                what: "vLLM Medusa",
            }));
        }
        Ok(None)
    }
}

pub struct Medusa {
    spec: DrafterSpec,
    m: MedusaSpec,
    vs: nn::VarStore,
    blocks: Vec<Vec<Linear>>,
    /// Own heads' weights, or empty when the target's lm_head is shared.
    lm_heads: Vec<Tensor>,
    /// The target's frozen lm_head when shared: as the target holds it (what export writes:
    /// the target's own tensor, no copy), and in the compute kind (cast once here, not at
    /// every use; the same tensor when the kinds agree).
    shared_lm_head: Option<(Tensor, Tensor)>,
    compute: Kind,
}

impl Medusa {
    pub fn new(m: MedusaSpec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        if m.num_heads < 1 || m.num_layers < 0 {
            return Err(ModelError::Invalid(format!(
                "medusa: num_heads must be >= 1 and num_layers >= 0, got {} and {}",
                m.num_heads, m.num_layers
            )));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (h, v) = (m.hidden_size, m.vocab_size);
        let blocks = (0..m.num_heads)
            .map(|k| {
                (0..m.num_layers)
                    .map(|j| {
                        let cfg = nn::LinearConfig {
                            ws_init: nn::Init::Const(0.),
                            ..Default::default()
                        };
                        let l = nn::linear(&root / "blocks" / k / "layers" / j, h, h, cfg);
                        Linear::from_weights(l.ws, l.bs, compute)
                    })
                    .collect()
            })
            .collect();
        let head_init = target.tensor(LM_HEAD);
        let head_init = head_init.as_ref();
        if let Some(w) = head_init {
            if w.size() != [v, h] {
                return Err(ModelError::Invalid(format!(
                    "medusa: the target lm_head is {:?}, expected [{v}, {h}]",
                    w.size()
                )));
            }
        }
        let (lm_heads, shared_lm_head) = if m.original_lm_head {
            let w = head_init
                .ok_or_else(|| ModelError::Invalid("medusa with original_lm_head needs the target's lm_head".into()))?;
            let stored = w.detach().to_device(device);
            let cast = if stored.kind() == compute {
                stored.shallow_clone()
            } else {
                stored.to_kind(compute)
            };
            (Vec::new(), Some((stored, cast)))
        } else {
            let heads = (0..m.num_heads)
                .map(|k| {
                    let p = &root / "lm_heads" / k;
                    match head_init {
                        // copy(): each head owns its storage (to_device/to_kind return the
                        // target's own tensor when it is already fp32 on `device`)
                        Some(w) => p.add("weight", w.detach().to_device(device).to_kind(Kind::Float).copy(), true),
                        None => p.zeros("weight", &[v, h]),
                    }
                })
                .collect();
            (heads, None)
        };
        Ok(Medusa {
            spec: DrafterSpec::Medusa(m.clone()),
            m,
            vs,
            blocks,
            lm_heads,
            shared_lm_head,
            compute,
        })
    }

    fn head_logits(&self, k: usize, x: &Tensor) -> Tensor {
        let mut x = x.to_kind(self.compute);
        for l in &self.blocks[k] {
            x = &x + l.forward(&x).silu();
        }
        match &self.shared_lm_head {
            Some((_, w)) => project(&x, w, self.compute),
            None => project(&x, &self.lm_heads[k], self.compute),
        }
    }

    /// Logits of every head at the given positions: `[K, N, V]` for hidden `[N, H]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let hs: Vec<Tensor> = (0..self.m.num_heads as usize)
            .map(|k| self.head_logits(k, hidden))
            .collect();
        Tensor::stack(&hs, 0)
    }

    fn expected_vllm(&self) -> Vec<(String, Vec<i64>)> {
        let (h, v) = (self.m.hidden_size, self.m.vocab_size);
        let mut e = Vec::new();
        for k in 0..self.m.num_heads {
            for j in 0..self.m.num_layers {
                e.push((format!("blocks.{k}.layers.{j}.weight"), vec![h, h]));
                e.push((format!("blocks.{k}.layers.{j}.bias"), vec![h]));
            }
            if !self.m.original_lm_head {
                e.push((format!("lm_heads.{k}.weight"), vec![v, h]));
            }
        }
        if self.m.original_lm_head {
            e.push(("lm_head.weight".into(), vec![v, h]));
        }
        e
    }

    fn expected_medusa(&self) -> Vec<(String, Vec<i64>)> {
        let (h, v, l) = (self.m.hidden_size, self.m.vocab_size, self.m.num_layers);
        let mut e = Vec::new();
        for k in 0..self.m.num_heads {
            for j in 0..l {
                e.push((format!("{k}.{j}.linear.weight"), vec![h, h]));
                e.push((format!("{k}.{j}.linear.bias"), vec![h]));
            }
            e.push((format!("{k}.{l}.weight"), vec![v, h]));
        }
        e
    }

    /// The lm_head weight of head k (own, or the target's as it stores it).
    fn lm_head_weight(&self, k: usize) -> Tensor {
        match &self.shared_lm_head {
            Some((w, _)) => w.shallow_clone(),
            None => self.lm_heads[k].shallow_clone(),
        }
    }
}

impl Drafter for Medusa {
    fn spec(&self) -> &DrafterSpec {
        &self.spec
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    fn loss(&self, f: &Features, ctx: &StepContext) -> Result<LossOutput> {
        let hidden = f.hidden_normed()?.to_kind(Kind::Float);
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let h = self.m.hidden_size;
        let device = hidden.device();
        let mut total = Tensor::zeros([], (Kind::Float, device));
        let mut parts = Vec::new();
        let mut metrics = Vec::new();
        for k in 0..self.m.num_heads {
            // head k (0-based) at position p predicts token p + k + 2
            let shift = k + 2;
            let weight = self.m.loss_decay.powi(k as i32 + 1);
            let name = format!("head{}", k + 1);
            if t <= shift {
                continue;
            }
            let n = t - shift;
            let labels = f.input_ids.narrow(1, shift, n);
            let mask = f.loss_mask.narrow(1, shift, n).ne(0);
            let idx = mask.reshape([-1]).nonzero().squeeze_dim(-1);
            let count = idx.size()[0];
            if count == 0 {
                continue;
            }
            let x = hidden.narrow(1, 0, n).reshape([b * n, h]).index_select(0, &idx);
            let y = labels.reshape([-1]).index_select(0, &idx);
            let logits = self.head_logits(k as usize, &x);
            let (ce, top1, topk) = ce_and_hits(&logits, &y, self.m.top_k);
            total += &ce * weight;
            let c = count as f64;
            parts.push(Metric {
                name: format!("ce/{name}"),
                sum: ce.double_value(&[]) * c,
                count: c,
            });
            metrics.push(Metric {
                name: format!("acc/{name}"),
                sum: top1,
                count: c,
            });
            metrics.push(Metric {
                name: format!("top{}/{name}", self.m.top_k),
                sum: topk,
                count: c,
            });
        }
        if !ctx.train {
            // chains of num_heads proposals from each start p: head k proposes token p+k+2
            let kk = self.m.num_heads;
            let starts = t - kk - 1;
            let (mut hits, mut valid) = (Vec::new(), Vec::new());
            tch::no_grad(|| {
                for k in 0..kk {
                    if starts > 0 {
                        let x = hidden.narrow(1, 0, starts).reshape([b * starts, h]);
                        let arg = self.head_logits(k as usize, &x).argmax(-1, false).view([b, starts]);
                        hits.push(arg.eq_tensor(&f.input_ids.narrow(1, k + 2, starts)));
                        valid.push(f.loss_mask.narrow(1, k + 2, starts).ne(0));
                    } else {
                        let none = Tensor::zeros([b, 0], (Kind::Bool, device));
                        hits.push(none.shallow_clone());
                        valid.push(none);
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

    fn export_formats(&self) -> &'static [ExportFormat] {
        &[ExportFormat::Vllm, ExportFormat::FasterDecoding]
    }

    /// Every head's blocks and lm_head (a shared target lm_head read once per head) in one
    /// forward over the last position; no attention.
    fn serving_shape(&self) -> Option<super::ServingShape> {
        let shared = self
            .shared_lm_head
            .as_ref()
            .map(|(w, _)| (w.numel() as i64 * self.m.num_heads) as f64)
            .unwrap_or(0.0);
        Some(super::ServingShape {
            params_per_forward: super::float_params(&self.vs) + shared,
            layers: 0,
            kv_heads: 1,
            head_dim: 1,
            q_dim: self.m.hidden_size,
            one_forward: true,
            sglang_algorithm: None,
            vllm_method: Some(("medusa", "vLLM 0.32 and earlier (removed in 0.33)")),
        })
    }

    fn serving(&self, format: ExportFormat) -> Option<&'static str> {
        match format {
            ExportFormat::Vllm => Some(
                "vLLM 0.32 and earlier: --speculative-config '{\"method\": \"medusa\", \"model\": \"DIR\", \"num_speculative_tokens\": HEADS}'. \
                 vLLM 0.33 removed Medusa and SGLang (0.5.23) never served it: for those, train EAGLE-3 (recipes/eagle3-*.yaml)",
            ),
            ExportFormat::FasterDecoding => Some(
                "Hugging Face TGI (medusa_lm_head.safetensors beside the config) and TensorRT-LLM's Medusa converter; \
                 not vLLM or SGLang",
            ),
            _ => None,
        }
    }

    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        let (h, v, layers) = (self.m.hidden_size as f64, self.m.vocab_size as f64, self.m.num_layers);
        // one head over one position: the first ResBlock's input (the target's hidden state)
        // needs no gradient, the later ones and the lm_head's input do (when there are blocks)
        let blocks = if layers == 0 {
            TokenMacs::default()
        } else {
            TokenMacs {
                grad_one: h * h,
                grad_both: (layers - 1) as f64 * h * h,
                no_grad: 0.0,
            }
        };
        let head = match (self.m.original_lm_head, layers > 0) {
            (false, true) => TokenMacs {
                grad_both: v * h,
                ..Default::default()
            },
            (false, false) | (true, true) => TokenMacs {
                grad_one: v * h,
                ..Default::default()
            },
            (true, false) => TokenMacs {
                no_grad: v * h,
                ..Default::default()
            },
        };
        // head k trains positions 0..T-k-2
        let t = seq_len as f64;
        (0..self.m.num_heads)
            .map(|k| (blocks + head) * ((t - k as f64 - 2.0).max(0.0) / t))
            .fold(TokenMacs::default(), |a, b| a + b)
    }

    fn export(&self, format: ExportFormat, target_config: &serde_json::Value) -> Result<ExportBundle> {
        let m = &self.m;
        let vars = self.vs.variables();
        let var = |name: &str| -> Result<Tensor> {
            vars.get(name)
                .map(|t| t.detach())
                .ok_or_else(|| ModelError::Invalid(format!("medusa: no variable {name}")))
        };
        match format {
            ExportFormat::Vllm => {
                // One explicit table: forge names are vLLM's, plus the shared head when used.
                let mut tensors = Vec::new();
                for k in 0..m.num_heads {
                    for j in 0..m.num_layers {
                        for p in ["weight", "bias"] {
                            let n = format!("blocks.{k}.layers.{j}.{p}");
                            tensors.push((n.clone(), var(&n)?));
                        }
                    }
                    if !m.original_lm_head {
                        let n = format!("lm_heads.{k}.weight");
                        tensors.push((n.clone(), var(&n)?));
                    }
                }
                if m.original_lm_head {
                    tensors.push(("lm_head.weight".into(), self.lm_head_weight(0).detach()));
                }
                check_names_and_shapes("vllm medusa", &tensors, &self.expected_vllm())?;
                let config = serde_json::json!({
                    "architectures": ["MedusaModel"],
                    "model_type": "medusa",
                    "num_heads": m.num_heads,
                    "num_hidden_layers": m.num_layers,
                    "hidden_size": m.hidden_size,
                    "vocab_size": m.vocab_size,
                    "truncated_vocab_size": m.vocab_size,
                    "original_lm_head": m.original_lm_head,
                    "medusa_fc_bias": true,
                });
                Ok(ExportBundle {
                    tensor_files: vec![("model.safetensors".into(), tensors)],
                    json_files: vec![("config.json".into(), config)],
                })
            }
            ExportFormat::FasterDecoding => {
                // Table: blocks.{k}.layers.{j}.{p} -> {k}.{j}.linear.{p}; head k -> {k}.{L}.weight
                let mut tensors = Vec::new();
                for k in 0..m.num_heads {
                    for j in 0..m.num_layers {
                        for p in ["weight", "bias"] {
                            tensors.push((
                                format!("{k}.{j}.linear.{p}"),
                                var(&format!("blocks.{k}.layers.{j}.{p}"))?,
                            ));
                        }
                    }
                    tensors.push((
                        format!("{k}.{}.weight", m.num_layers),
                        self.lm_head_weight(k as usize).detach(),
                    ));
                }
                check_names_and_shapes("original medusa", &tensors, &self.expected_medusa())?;
                let base = target_config
                    .get("_name_or_path")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null);
                let config = serde_json::json!({
                    "medusa_num_heads": m.num_heads,
                    "medusa_num_layers": m.num_layers,
                    "base_model_name_or_path": base,
                    "hidden_size": m.hidden_size,
                    "vocab_size": m.vocab_size,
                });
                Ok(ExportBundle {
                    tensor_files: vec![("medusa_lm_head.safetensors".into(), tensors)],
                    json_files: vec![("config.json".into(), config)],
                })
            }
            other => Err(ModelError::Invalid(format!(
                "medusa drafters export to vllm, medusa or forge, not {}",
                other.name()
            ))),
        }
    }

    fn session<'a>(&'a self, _target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        Ok(Box::new(MedusaSession { m: self, last: None }))
    }
}

/// Speculative decoding with Medusa heads: the chain is head k's choice for token k + 2
/// after the last committed position (one proposal per head, so gamma <= num_heads).
struct MedusaSession<'a> {
    m: &'a Medusa,
    /// The target's normed hidden state at the last committed position `[1, H]`.
    last: Option<Tensor>,
}

impl DraftSession for MedusaSession<'_> {
    fn max_gamma(&self) -> Option<usize> {
        Some(self.m.m.num_heads as usize)
    }

    fn commit(&mut self, _start: i64, features: &StepFeatures, _next: &[i64]) -> Result<()> {
        let k = features.hidden_normed.size()[0];
        self.last = Some(features.hidden_normed.narrow(0, k - 1, 1).to_kind(Kind::Float));
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        let h = self
            .last
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("medusa: propose before commit".into()))?;
        if gamma > self.m.m.num_heads as usize {
            return Err(ModelError::Invalid(format!(
                "medusa has {} heads, {gamma} proposals asked",
                self.m.m.num_heads
            )));
        }
        let logits: Vec<Tensor> = (0..gamma)
            .map(|k| self.m.head_logits(k, h).to_kind(Kind::Float).view([-1]))
            .collect();
        let tokens = logits
            .iter()
            .map(|l| pick(l, sampling, rng))
            .collect::<Result<Vec<_>>>()?;
        Ok(Proposal {
            tokens,
            logits: Tensor::stack(&logits, 0),
        })
    }

    fn can_branch(&self) -> bool {
        true
    }

    /// Head d's distribution for a path of length d: the heads read only the last committed
    /// position, not the drafted tokens (Medusa's trees combine the heads' top-k the same way).
    fn path_logits(&mut self, path: &[i64]) -> Result<Tensor> {
        let h = self
            .last
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("medusa: tree drafting before commit".into()))?;
        let d = path.len();
        if d >= self.m.m.num_heads as usize {
            return Err(ModelError::Invalid(format!(
                "medusa has {} heads: a tree of {} steps is too deep (steps <= heads)",
                self.m.m.num_heads,
                d + 1
            )));
        }
        Ok(self.m.head_logits(d, h).to_kind(Kind::Float).view([-1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, heads, macs, matrix_macs};

    fn medusa(layers: i64, original_lm_head: bool) -> Medusa {
        let spec = MedusaSpec {
            num_heads: 3,
            num_layers: layers,
            original_lm_head,
            loss_decay: 0.8,
            top_k: 3,
            hidden_size: 64,
            vocab_size: 96,
        };
        Medusa::new(spec, &heads(96, 64), Device::Cpu, Kind::Float).expect("medusa")
    }

    /// Hidden 64, vocabulary 96, 3 heads; a ResBlock is 64 x 64 = 4096 MACs a row, an lm_head
    /// 96 x 64 = 6144. Head k (0-based) trains T-k-2 positions: 14 + 13 + 12 = 39 of T = 16,
    /// 30 + 29 + 28 = 87 of T = 32 (no attention: doubling T changes only these counts).
    /// - 2 ResBlocks, own heads: the first block reads the target's state (grad_one 4096),
    ///   the second block and the head read trained outputs (grad_both 4096 + 6144).
    ///   T = 16: grad_one 4096 * 39/16 = 9984, grad_both 10240 * 39/16 = 24960;
    ///   T = 32: 4096 * 87/32 = 11136, 10240 * 87/32 = 27840.
    /// - 2 ResBlocks, the target's frozen head shared: the head's input needs a gradient, its
    ///   weight none (grad_one): grad_one 24960, grad_both 9984 (T = 32: 27840, 11136).
    /// - no ResBlocks: an own head reads the target's state (grad_one 6144 * 39/16 = 14976);
    ///   the shared frozen head trains nothing (no_grad 14976).
    #[test]
    fn token_macs_count_each_heads_blocks_and_lm_head_over_its_positions() {
        let cases = [
            (2, false, 16, macs(24960.0, 9984.0, 0.0)),
            (2, false, 32, macs(27840.0, 11136.0, 0.0)),
            (2, true, 16, macs(9984.0, 24960.0, 0.0)),
            (2, true, 32, macs(11136.0, 27840.0, 0.0)),
            (0, false, 16, macs(0.0, 14976.0, 0.0)),
            (0, true, 16, macs(0.0, 0.0, 14976.0)),
        ];
        for (layers, original, t, want) in cases {
            let m = medusa(layers, original);
            let got = m.token_macs(t);
            let what = format!("{layers} layers, original_lm_head {original}, T {t}");
            assert_macs(got, want, &what);
            // the same from the VarStore: every trainable matrix of head k applied to its
            // (T-k-2)/T share of the positions, plus the shared frozen head on trained inputs
            let share = |k: f64| (t as f64 - k - 2.0) / t as f64;
            let trained = matrix_macs(&m.vs, |name| {
                let k: f64 = name.split('.').nth(1)?.parse().ok()?;
                (name.starts_with("blocks.") || name.starts_with("lm_heads.")).then(|| share(k))
            });
            let frozen_head = if original && layers > 0 {
                6144.0 * (share(0.0) + share(1.0) + share(2.0))
            } else {
                0.0
            };
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + frozen_head, 0.0, 0.0),
                &format!("{what}: from the VarStore"),
            );
        }
    }
}
