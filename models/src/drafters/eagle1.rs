//! EAGLE-1 (Li et al. 2024): feature-level autoregression. Method: docs/methods/eagle1.md.
//!
//! At position t the draft reads the target's feature f_t (its last hidden state after the
//! final norm, what lm_head reads) and the embedding of token t+1:
//! `fc(cat(embed(x_{t+1}), f_t))` `[h, 2h]` with bias -> one Llama decoder layer without
//! input_layernorm -> the predicted feature of position t+1, read out by the target's lm_head
//! (frozen). Loss over positions whose predicted token x_{t+2} is a trained token:
//! `feature_weight * SmoothL1(pred_t, f_{t+1}) + token_weight * soft-CE(lm_head(pred_t),
//! softmax(lm_head(f_{t+1})))`; optional uniform noise of half-width `feature_noise` on the
//! input features in training. The embedding and lm_head are the target's, outside the
//! VarStore.
//!
//! Weight names = SGLang `LlamaForCausalLMEagle`: `fc.weight` `[h, 2h]`, `fc.bias` `[h]`,
//! `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
//! `layers.0.post_attention_layernorm.weight`. vLLM's `EagleLlamaForCausalLM` has no fc bias.

use super::eagle::{frozen, rows, shift_left, soft_ce_and_hits, DraftLayerSpec};
use super::{
    architecture, export_same_names, Drafter, DrafterKind, DrafterSpec, EngineDraft, ExportBundle, ExportFormat,
    FeatureNeeds, Features, LossOutput, Metric, ResolveTarget, StepContext, TargetAccess, TargetNeeds, TokenMacs,
    EMBED, LM_HEAD,
};
use crate::llm::TargetConfig;
use crate::safetensors_io::SafetensorsFile;
use forge_schema::Ctx;
use std::path::Path;
use crate::error::{ModelError, Result};
use crate::generate::{RowRng, Sampling};
use crate::layers::attention::build_mask;
use crate::layers::{linear, project, AttnMask, DecoderLayer, Keys, LayerKv, Linear, ParamInit, Rotary};
use crate::speculative::{propose_chain, DraftSession, DraftedPath, Proposal, StepFeatures};
use crate::llm::TargetModel;
use tch::{nn, Device, Kind, Tensor};

/// EAGLE-1's hyper-parameters plus the target dimensions it is built for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Eagle1Spec {
    pub feature_weight: f64,
    pub token_weight: f64,
    pub feature_noise: f64,
    /// `fc` has a bias (SGLang's LlamaForCausalLMEagle has one, vLLM's EagleLlamaForCausalLM
    /// none). Checkpoints from before the key had one.
    #[serde(default = "fc_bias_default")]
    pub fc_bias: bool,
    /// The target's vocabulary size.
    pub vocab_size: i64,
    /// The draft layer; its hidden size is the target's.
    pub layer: DraftLayerSpec,
}

fn fc_bias_default() -> bool {
    true
}

forge_schema::section! {
    /// EAGLE-1: one decoder layer over cat(embed(t+1), feature_t).
    pub struct Eagle1Section {
        /// Weight of the SmoothL1 feature-regression loss.
        feature_weight: f64 = 1.0,
        /// Weight of the soft cross-entropy against the target distribution.
        token_weight: f64 = 0.1,
        /// Half-width of uniform noise added to input features during training (0 = off).
        feature_noise: f64 = 0.0,
        /// A bias in fc. SGLang's LlamaForCausalLMEagle has one (a bias-free draft exports with a zero bias); vLLM's EagleLlamaForCausalLM has none and refuses a draft trained with one: set false to serve with vLLM.
        fc_bias: bool = true,
    }
}

impl DrafterKind for Eagle1 {
    const DOCS: &'static str = "docs/methods/eagle1.md";
    type Section = Eagle1Section;
    type Spec = Eagle1Spec;

    fn validate(e: &Eagle1Section, cx: &mut Ctx) {
        cx.non_negative("drafter.feature_weight", e.feature_weight);
        cx.non_negative("drafter.token_weight", e.token_weight);
        cx.non_negative("drafter.feature_noise", e.feature_noise);
    }

    fn resolve(e: &Eagle1Section, target: ResolveTarget) -> Result<Eagle1Spec> {
        Ok(Eagle1Spec {
            feature_weight: e.feature_weight,
            token_weight: e.token_weight,
            feature_noise: e.feature_noise,
            fc_bias: e.fc_bias,
            vocab_size: target.config.vocab_size,
            layer: DraftLayerSpec::from_target(target.config, None, None, None, None)?,
        })
    }

    fn build(spec: &Eagle1Spec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Box<dyn Drafter>> {
        Ok(Box::new(Eagle1::new(spec.clone(), target, device, compute)?))
    }

    fn target_needs(_spec: &Eagle1Spec, _fresh: bool) -> TargetNeeds {
        super::eagle::target_needs()
    }

    fn feature_needs(_spec: &Eagle1Spec) -> FeatureNeeds {
        FeatureNeeds {
            last_hidden: true,
            ..FeatureNeeds::default()
        }
    }

    /// SGLang's `LlamaForCausalLMEagle` (fc with a bias) or vLLM's `EagleLlamaForCausalLM`.
    fn recognise(dir: &Path, cfg: &serde_json::Value, target: &TargetConfig) -> Result<Option<EngineDraft<Eagle1Spec>>> {
        let arch = architecture(cfg);
        if arch != "LlamaForCausalLMEagle" && arch != "EagleLlamaForCausalLM" {
            return Ok(None);
        }
        let weights = dir.join("model.safetensors");
        let bias = weights.is_file() && SafetensorsFile::open(&weights)?.names()?.iter().any(|n| n == "fc.bias");
        Ok(Some(EngineDraft {
            spec: Eagle1Spec {
                feature_weight: 1.0,
                token_weight: 0.1,
                feature_noise: 0.0,
                fc_bias: bias,
                vocab_size: target.vocab_size,
                layer: DraftLayerSpec::from_engine_config(cfg, &dir.join("config.json"))?,
            },
            format: if bias { ExportFormat::Sglang } else { ExportFormat::Vllm },
            weights,
            what: "EAGLE-1 (SGLang / vLLM)",
        }))
    }
}

pub struct Eagle1 {
    spec: DrafterSpec,
    e: Eagle1Spec,
    vs: nn::VarStore,
    fc: Linear,
    layer: DecoderLayer,
    /// The target's embedding and lm_head `[V, h]`, frozen, in the compute kind.
    embed: Tensor,
    lm_head: Tensor,
    rotary: Rotary,
    compute: Kind,
}

impl Eagle1 {
    pub fn new(e: Eagle1Spec, target: &TargetAccess, device: Device, compute: Kind) -> Result<Self> {
        let l = &e.layer;
        l.validate()?;
        let (h, v) = (l.hidden_size, e.vocab_size);
        let embed = frozen(target, EMBED, [v, h], device, compute, "eagle1")?;
        let lm_head = frozen(target, LM_HEAD, [v, h], device, compute, "eagle1")?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let init = ParamInit::Default;
        let fc = linear(&root / "fc", 2 * h, h, e.fc_bias, init, compute);
        let layer = DecoderLayer::new(&root / "layers" / 0, l.layer_config(h, compute), init);
        let rotary = Rotary::new(l.head_dim, l.rope_theta, &l.rope_scaling, device);
        Ok(Self {
            spec: DrafterSpec::Eagle1(e.clone()),
            e,
            vs,
            fc,
            layer,
            embed,
            lm_head,
            rotary,
            compute,
        })
    }

    /// The predicted next features `[B, T, h]` for input features `[B, T, h]`.
    pub fn predict(&self, f: &Features, features: &Tensor) -> Result<Tensor> {
        let b = f.input_ids.size()[0];
        let t = f.input_ids.size()[1];
        let mask = build_mask(b, 0, t, Some(&f.attention_mask), None, features.device());
        Ok(self.layer(
            features,
            &shift_left(&f.input_ids, 1),
            &f.position_ids,
            &AttnMask::Explicit(mask),
            Keys::Own,
        ))
    }

    /// The draft layer: at each position the input feature `[B, T, h]` and the embedding of
    /// the token that follows it (`next_ids` `[B, T]`), RoPE at `positions`; attention over
    /// `keys` under `mask`.
    fn layer(&self, features: &Tensor, next_ids: &Tensor, positions: &Tensor, mask: &AttnMask, keys: Keys) -> Tensor {
        let c = self.compute;
        let (b, t) = (next_ids.size()[0], next_ids.size()[1]);
        let h = self.e.layer.hidden_size;
        let emb = self.embed.index_select(0, &next_ids.reshape([-1])).view([b, t, h]);
        let x = self
            .fc
            .forward(&Tensor::cat(&[emb.to_kind(c), features.to_kind(c)], -1));
        let (cos, sin) = self.rotary.cos_sin(positions, c);
        self.layer.forward(&x, &cos, &sin, mask, keys)
    }

    /// Logits `[N, V]` (fp32) of predicted features `[N, h]` through the target's lm_head.
    fn readout(&self, features: &Tensor) -> Tensor {
        project(features, &self.lm_head, self.compute).to_kind(Kind::Float)
    }

    fn expected(&self, bias: bool) -> Vec<(String, Vec<i64>)> {
        let l = &self.e.layer;
        let h = l.hidden_size;
        let (q, kv, i) = (
            l.num_heads * l.head_dim,
            l.num_kv_heads * l.head_dim,
            l.intermediate_size,
        );
        let mut e: Vec<(String, Vec<i64>)> = vec![("fc.weight".into(), vec![h, 2 * h])];
        if bias {
            e.push(("fc.bias".into(), vec![h]));
        }
        e.extend([
            ("layers.0.self_attn.q_proj.weight".into(), vec![q, h]),
            ("layers.0.self_attn.k_proj.weight".into(), vec![kv, h]),
            ("layers.0.self_attn.v_proj.weight".into(), vec![kv, h]),
            ("layers.0.self_attn.o_proj.weight".into(), vec![h, q]),
            ("layers.0.mlp.gate_proj.weight".into(), vec![i, h]),
            ("layers.0.mlp.up_proj.weight".into(), vec![i, h]),
            ("layers.0.mlp.down_proj.weight".into(), vec![h, i]),
            ("layers.0.post_attention_layernorm.weight".into(), vec![h]),
        ]);
        e
    }
}

impl Drafter for Eagle1 {
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
        let feats = f.hidden_normed()?.to_kind(Kind::Float);
        let (b, t) = (f.input_ids.size()[0], f.input_ids.size()[1]);
        let h = self.e.layer.hidden_size;
        let input = if ctx.train && self.e.feature_noise > 0.0 {
            &feats + (ctx.rng.uniform(&feats.size(), feats.device()) * 2.0 - 1.0) * self.e.feature_noise
        } else {
            feats.shallow_clone()
        };
        let pred = self.predict(f, &input)?;
        // zero with a graph: a batch without trained positions still back-propagates
        let mut total = self.fc.ws.sum(Kind::Float) * 0.0;
        // every metric every time (count 0 without trained positions): metric sets agree
        // across micro-batches and ranks
        let (mut fl, mut cev, mut hits, mut cnt) = (0.0, 0.0, 0.0, 0.0);
        let n = t - 2;
        if n > 0 {
            // position p predicts feature p+1 and so token p+2
            let idx = rows(&f.loss_mask.narrow(1, 2, n).ne(0));
            let count = idx.size()[0];
            if count > 0 {
                let x = pred.narrow(1, 0, n).reshape([b * n, h]).index_select(0, &idx);
                let y = feats.narrow(1, 1, n).reshape([b * n, h]).index_select(0, &idx);
                let feature = x
                    .to_kind(Kind::Float)
                    .smooth_l1_loss(&y, tch::Reduction::None, 1.0)
                    .mean_dim(-1, false, Kind::Float)
                    .mean(Kind::Float);
                let logits = self.readout(&x);
                let p = tch::no_grad(|| self.readout(&y).softmax(-1, Kind::Float));
                let (ce, hit) = soft_ce_and_hits(&logits, &p);
                total = total + &feature * self.e.feature_weight + &ce * self.e.token_weight;
                cnt = count as f64;
                fl = feature.double_value(&[]);
                cev = ce.double_value(&[]);
                hits = hit;
            }
        }
        let m = |name: &str, sum: f64| Metric {
            name: name.into(),
            sum,
            count: cnt,
        };
        let parts = vec![m("feature/smooth_l1", fl * cnt), m("token/ce", cev * cnt)];
        let mut metrics = vec![m("acc/step0", hits)];
        if !ctx.train {
            // one proposal per chain in training's view (later ones read the draft's own features)
            metrics.push(m("chain/0", hits));
        }
        Ok(LossOutput {
            loss: total,
            parts,
            metrics,
        })
    }

    /// Every position: fc over cat(embedding, target feature), whose inputs need no gradient
    /// (noise included), then the draft layer over fc's output, its attention under an
    /// explicit mask computing all T x T scores. Positions 0..T-2 (T-2 of them) are read out
    /// by the target's frozen lm_head twice: the prediction (its input needs a gradient) and,
    /// under no_grad, the target's next feature for the soft labels.
    fn token_macs(&self, seq_len: i64) -> TokenMacs {
        if seq_len < 1 {
            return TokenMacs::default();
        }
        let l = &self.e.layer;
        let (h, v, t) = (l.hidden_size as f64, self.e.vocab_size as f64, seq_len as f64);
        let position = TokenMacs::one(2.0 * h * h) + TokenMacs::both(l.layer_macs(l.hidden_size) + l.attention_macs(t));
        let readout = (TokenMacs::one(v * h) + TokenMacs::none(v * h)) * ((t - 2.0).max(0.0) / t);
        position + readout
    }

    fn export_formats(&self) -> &'static [ExportFormat] {
        &[ExportFormat::Sglang, ExportFormat::Vllm]
    }

    /// fc and the layer, plus the target's lm_head it reads (shared, frozen).
    fn serving_shape(&self) -> Option<super::ServingShape> {
        let l = &self.e.layer;
        Some(super::ServingShape {
            params_per_forward: super::float_params(&self.vs) + self.lm_head.numel() as f64,
            layers: 1,
            kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            q_dim: l.num_heads * l.head_dim,
            one_forward: false,
            sglang_algorithm: Some("EAGLE"),
            vllm_method: Some(("eagle", "vLLM 0.33 / 0.34")),
        })
    }

    fn serving(&self, format: ExportFormat) -> Option<&'static str> {
        match format {
            ExportFormat::Sglang => Some(
                "SGLang 0.5.23: --speculative-algorithm EAGLE --speculative-draft-model-path DIR \
                 (--speculative-num-steps / --speculative-eagle-topk / --speculative-num-draft-tokens; unset, a Llama target gets a tree 5/4/8)",
            ),
            ExportFormat::Vllm => Some(
                "vLLM 0.33 / 0.34: --speculative-config '{\"method\": \"eagle\", \"model\": \"DIR\", \"num_speculative_tokens\": 5}'",
            ),
            _ => None,
        }
    }

    fn export(&self, format: ExportFormat, target_config: &serde_json::Value) -> Result<ExportBundle> {
        // SGLang's LlamaForCausalLMEagle has a bias in fc; vLLM's EagleLlamaForCausalLM has
        // none (and is found under that architecture name).
        let (bias, arch) = match format {
            ExportFormat::Sglang => (true, "LlamaForCausalLMEagle"),
            ExportFormat::Vllm => (false, "EagleLlamaForCausalLM"),
            other => {
                return Err(ModelError::Invalid(format!(
                    "eagle1 drafters export to sglang, vllm or forge, not {}",
                    other.name()
                )))
            }
        };
        // never drop a trained weight: a bias-free engine gets only a bias-free draft; an
        // engine with a bias gets a zero one for a bias-free draft (exactly the same layer)
        if self.e.fc_bias && !bias {
            return Err(ModelError::Invalid(format!(
                "this eagle1 draft was trained with a bias in fc (drafter.fc_bias: true); {} has none, so it would serve a different model: train with drafter.fc_bias: false to export for {}, or export for sglang",
                arch,
                format.name()
            )));
        }
        let expected = self.expected(bias);
        let mut tensors = export_same_names(
            &self.vs,
            &self.expected(self.e.fc_bias && bias),
            &format!("{} eagle1", format.name()),
        )?;
        if bias && !self.e.fc_bias {
            tensors.push((
                "fc.bias".into(),
                Tensor::zeros([self.e.layer.hidden_size], (Kind::Float, self.vs.device())),
            ));
        }
        super::check_names_and_shapes(&format!("{} eagle1", format.name()), &tensors, &expected)?;
        let mut config = self.e.layer.llama_config(arch, target_config);
        config["vocab_size"] = self.e.vocab_size.into();
        Ok(ExportBundle {
            tensor_files: vec![("model.safetensors".into(), tensors)],
            json_files: vec![("config.json".into(), config)],
        })
    }

    fn session<'a>(&'a self, _target: &'a TargetModel) -> Result<Box<dyn DraftSession + 'a>> {
        Ok(Box::new(Eagle1Session {
            m: self,
            cache: LayerKv::default(),
            committed: 0,
            last: None,
            drafted: DraftedPath::default(),
        }))
    }
}

/// Speculative decoding with EAGLE-1: committed positions run the draft layer on the target's
/// features (keys/values kept in the draft's cache); a proposal continues autoregressively on
/// the draft's own predicted features, and those cache entries are dropped at the next commit.
struct Eagle1Session<'a> {
    m: &'a Eagle1,
    cache: LayerKv,
    /// Positions whose keys in `cache` come from the target's features.
    committed: i64,
    /// The predicted feature after the last committed position `[1, 1, h]`.
    last: Option<Tensor>,
    /// Tree drafting: the path whose steps the cache holds past the committed positions.
    drafted: DraftedPath,
}

impl Eagle1Session<'_> {
    fn step(&mut self, features: &Tensor, next: &[i64], start: i64) -> Result<Tensor> {
        let device = features.device();
        let k = next.len() as i64;
        let ids = Tensor::from_slice(next).view([1, k]).to_device(device);
        let pos = Tensor::arange_start(start, start + k, (Kind::Int64, device)).view([1, k]);
        let mask = AttnMask::for_cache(1, self.cache.len(), k, device);
        Ok(self.m.layer(features, &ids, &pos, &mask, Keys::Cache(&mut self.cache)))
    }
}

impl DraftSession for Eagle1Session<'_> {
    fn commit(&mut self, start: i64, features: &StepFeatures, next: &[i64]) -> Result<()> {
        if start != self.committed {
            return Err(ModelError::Invalid(format!(
                "eagle1: commit at {start}, {} positions committed",
                self.committed
            )));
        }
        self.cache.truncate(start);
        let k = next.len() as i64;
        let out = self.step(&features.hidden_normed.unsqueeze(0), next, start)?;
        self.committed = start + k;
        let last = out.narrow(1, k - 1, 1);
        self.drafted.reset(&last);
        self.last = Some(last);
        Ok(())
    }

    fn propose(&mut self, gamma: usize, sampling: &Sampling, rng: &mut RowRng) -> Result<Proposal> {
        let first = self
            .last
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("eagle1: propose before commit".into()))?
            .shallow_clone();
        let (m, committed) = (self.m, self.committed);
        self.drafted.reset(&first);
        // the predicted feature of position committed + i, followed by proposal i
        propose_chain(
            &first,
            gamma,
            sampling,
            rng,
            |f| m.readout(f),
            |f, token, i| self.step(f, &[token], committed + i as i64),
        )
    }

    fn can_branch(&self) -> bool {
        true
    }

    /// The proposal chain's steps along `path`.
    fn path_logits(&mut self, path: &[i64]) -> Result<Tensor> {
        let committed = self.committed;
        let mut drafted = std::mem::take(&mut self.drafted);
        let c = drafted.keep_common(path);
        let feature = c.and_then(|c| {
            self.cache.truncate(committed + c as i64);
            drafted.extend(path, |f, token, i| self.step(f, &[token], committed + i as i64))
        });
        self.drafted = drafted;
        Ok(self.m.readout(&feature?.view([1, -1])).view([-1]).to_kind(Kind::Float))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drafters::macs_tests::{assert_macs, heads, macs, matrix_macs, tiny_layer};

    /// Hidden 64 (4 heads / 2 KV heads of 16, MLP 128), vocabulary 96. Per position: fc
    /// 128 x 64 = 8192 over the embedding and target feature (grad_one); the layer over fc's
    /// output, q 4096 + k 2048 + v 2048 + o 4096 + MLP 24576 = 36864, and attention 2 x 64
    /// MACs per key over all T keys: 2048 at T = 16, 4096 at T = 32 (grad_both). The frozen
    /// lm_head (96 x 64 = 6144) reads T-2 of T positions twice: the prediction (grad_one) and
    /// the target's feature (no_grad): 6144 * 14/16 = 5376 at T = 16, 6144 * 30/32 = 5760 at
    /// T = 32. T = 16: grad_both 38912, grad_one 13568, no_grad 5376; T = 32: 40960, 13952,
    /// 5760 (doubling T: + 2048 attention, + 384 readout share). T = 2: nothing read out.
    #[test]
    fn token_macs_count_fc_the_layer_its_full_attention_and_the_frozen_readouts() {
        let spec = Eagle1Spec {
            feature_weight: 1.0,
            token_weight: 0.1,
            feature_noise: 0.0,
            fc_bias: true,
            vocab_size: 96,
            layer: tiny_layer(),
        };
        let m = Eagle1::new(spec, &heads(96, 64), Device::Cpu, Kind::Float).expect("eagle1");
        for (t, want) in [
            (16, macs(38912.0, 13568.0, 5376.0)),
            (32, macs(40960.0, 13952.0, 5760.0)),
            (2, macs(37120.0, 8192.0, 0.0)),
        ] {
            let got = m.token_macs(t);
            assert_macs(got, want, &format!("T {t}"));
            // from the VarStore: every trainable matrix once per position, plus attention
            // over T keys and the frozen lm_head on the T-2 predictions
            let trained = matrix_macs(&m.vs, |_| Some(1.0));
            let tf = t as f64;
            assert_macs(
                macs(got.grad_both + got.grad_one, 0.0, 0.0),
                macs(trained + 2.0 * 64.0 * tf + 6144.0 * (tf - 2.0) / tf, 0.0, 0.0),
                &format!("T {t}: from the VarStore"),
            );
        }
    }
}
