use super::{Attention, AttentionConfig, AttnMask, Keys, LayerKv, Mlp, ParamInit, RmsNorm, TensorParallel};
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

/// A pre-norm Llama decoder layer: h = residual + attn(attention input), then
/// h + mlp(post_attention_layernorm(h)). The one decoder block of forge: the target's layers,
/// EAGLE-1's draft layer and EAGLE-3's midlayer are all this struct.
///
/// In the plain form ([`DecoderLayer::forward`]) the residual is the input `x` and the
/// attention input is `input_layernorm(x)` (or `x` itself without an input norm: EAGLE-1's
/// layer 0). [`DecoderLayer::forward_split`] takes the two separately: EAGLE-3's midlayer
/// attends over `cat(input_layernorm(embed), hidden_norm(h))`, 2h wide, with `h` as residual.
#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Option<RmsNorm>,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// A tensor-parallel target's layer: the attention and the MLP hold this rank's share
    /// of heads and width, and their outputs are summed over the group
    /// ([`crate::layers::tp`]).
    pub tp: Option<Arc<TensorParallel>>,
}

pub struct DecoderLayerConfig {
    pub attn: AttentionConfig,
    pub intermediate: i64,
    pub mlp_bias: bool,
    pub eps: f64,
    pub input_norm: bool,
    /// The kind every projection computes in (see `layers::Linear`).
    pub compute: Kind,
}

impl DecoderLayer {
    pub fn new(p: nn::Path, cfg: DecoderLayerConfig, init: ParamInit) -> Self {
        let hidden = cfg.attn.out_dim;
        let input_layernorm = cfg
            .input_norm
            .then(|| RmsNorm::new(&p / "input_layernorm", cfg.attn.in_dim, cfg.eps, init));
        let self_attn = Attention::new(&p / "self_attn", cfg.attn, init, cfg.compute);
        let post_attention_layernorm = RmsNorm::new(&p / "post_attention_layernorm", hidden, cfg.eps, init);
        let mlp = Mlp::new(&p / "mlp", hidden, cfg.intermediate, cfg.mlp_bias, init, cfg.compute);
        Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
            tp: None,
        }
    }

    /// `x` `[B, T, H]` through the layer; RoPE `cos`/`sin` for its positions.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttnMask, keys: Keys) -> Tensor {
        let normed = match &self.input_layernorm {
            Some(n) => n.forward(x),
            None => x.shallow_clone(),
        };
        self.forward_split(x, &normed, cos, sin, mask, keys)
    }

    /// Appends the keys and values of `x` `[B, T, H]` to `cache` (what [`DecoderLayer::forward`]
    /// with `Keys::Cache` would append) without computing the layer's output.
    pub fn append_kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: &mut LayerKv) {
        match &self.input_layernorm {
            Some(n) => self.self_attn.append_kv(&n.forward(x), cos, sin, cache),
            None => self.self_attn.append_kv(x, cos, sin, cache),
        }
    }

    /// The layer with its residual stream and its attention input given separately.
    pub fn forward_split(
        &self,
        residual: &Tensor,
        attn_input: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        keys: Keys,
    ) -> Tensor {
        let attn = self.self_attn.forward(attn_input, cos, sin, mask, keys);
        let h = residual + self.group_sum(attn);
        let out = self.mlp.forward(&self.post_attention_layernorm.forward(&h));
        h + self.group_sum(out)
    }

    /// A row-parallel output summed over the tensor-parallel group (itself without one).
    fn group_sum(&self, t: Tensor) -> Tensor {
        match &self.tp {
            Some(tp) => tp.reduce(t),
            None => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::attention::build_mask;
    use crate::layers::Rotary;
    use tch::Device;

    fn layer(compute: Kind, input_norm: bool, in_dim: i64, repeat_kv: bool) -> (nn::VarStore, DecoderLayer) {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = DecoderLayerConfig {
            attn: AttentionConfig {
                in_dim,
                out_dim: 32,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                qkv_bias: false,
                o_bias: false,
                qk_norm_eps: None,
                repeat_kv,
            },
            intermediate: 48,
            mlp_bias: false,
            eps: 1e-6,
            input_norm,
            compute,
        };
        let l = DecoderLayer::new(vs.root() / "layer", cfg, ParamInit::Default);
        (vs, l)
    }

    /// The Llama block written out op by op (fp64), with an explicit causal mask.
    fn reference(l: &DecoderLayer, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let d = |t: &Tensor| t.to_kind(Kind::Double);
        let rms = |n: &RmsNorm, x: &Tensor| {
            let x = d(x);
            &x * (x.square().mean_dim(-1, true, Kind::Double) + n.eps).rsqrt() * d(&n.weight)
        };
        let lin = |w: &crate::layers::Linear, x: &Tensor| x.matmul(&d(&w.ws).tr());
        let rot = |x: &Tensor| {
            let half = x.size()[3] / 2;
            let r = Tensor::cat(&[x.narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3);
            x * d(cos) + r * d(sin)
        };
        let (b, t) = (x.size()[0], x.size()[1]);
        let a = &l.self_attn;
        let h = match &l.input_layernorm {
            Some(n) => rms(n, x),
            None => d(x),
        };
        let q = rot(&lin(&a.q_proj, &h).view([b, t, 4, 8]).transpose(1, 2));
        let k = rot(&lin(&a.k_proj, &h).view([b, t, 2, 8]).transpose(1, 2)).repeat_interleave_self_int(2, 1, None);
        let v = lin(&a.v_proj, &h)
            .view([b, t, 2, 8])
            .transpose(1, 2)
            .repeat_interleave_self_int(2, 1, None);
        let s = q.matmul(&k.transpose(-1, -2)) / 8f64.sqrt();
        let causal = build_mask(b, 0, t, None, None, Device::Cpu);
        let w = s
            .masked_fill(&causal.logical_not(), f64::NEG_INFINITY)
            .softmax(-1, Kind::Double);
        let y = w.matmul(&v).transpose(1, 2).reshape([b, t, 32]);
        let h1 = d(x) + lin(&a.o_proj, &y);
        let z = rms(&l.post_attention_layernorm, &h1);
        let m = &l.mlp;
        h1.shallow_clone() + lin(&m.down_proj, &(lin(&m.gate_proj, &z).silu() * lin(&m.up_proj, &z)))
    }

    fn rope(t: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange(t, (Kind::Int64, Device::Cpu)).view([1, t]);
        Rotary::new(8, 10000.0, &crate::layers::RopeScaling::None, Device::Cpu).cos_sin(&pos, Kind::Float)
    }

    #[test]
    fn the_block_equals_a_written_out_llama_layer_with_native_or_repeated_kv_heads() {
        for repeat_kv in [false, true] {
            let (_vs, l) = layer(Kind::Float, true, 32, repeat_kv);
            let x = Tensor::randn([2, 6, 32], (Kind::Float, Device::Cpu));
            let (cos, sin) = rope(6);
            let got = l.forward(&x, &cos, &sin, &AttnMask::Causal, Keys::Own);
            let want = reference(&l, &x, &cos, &sin);
            let diff = (got.to_kind(Kind::Double) - want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "repeat_kv {repeat_kv}: {diff}");
        }
    }

    #[test]
    fn forward_is_forward_split_with_the_input_norm_and_no_norm_passes_the_input() {
        let (_vs, l) = layer(Kind::Float, true, 32, true);
        let x = Tensor::randn([1, 4, 32], (Kind::Float, Device::Cpu));
        let (cos, sin) = rope(4);
        let norm = l.input_layernorm.as_ref().expect("norm").forward(&x);
        let a = l.forward(&x, &cos, &sin, &AttnMask::Causal, Keys::Own);
        let b = l.forward_split(&x, &norm, &cos, &sin, &AttnMask::Causal, Keys::Own);
        assert!(a.equal(&b));
        let (_vs, l) = layer(Kind::Float, false, 32, true);
        let a = l.forward(&x, &cos, &sin, &AttnMask::Causal, Keys::Own);
        let b = l.forward_split(&x, &x, &cos, &sin, &AttnMask::Causal, Keys::Own);
        assert!(a.equal(&b));
        // a 2h-wide attention input (EAGLE-3's midlayer) with an h-wide residual
        let (_vs, wide) = layer(Kind::Float, false, 64, true);
        let y = wide.forward_split(
            &x,
            &Tensor::cat(&[&x, &x], -1),
            &cos,
            &sin,
            &AttnMask::Causal,
            Keys::Own,
        );
        assert_eq!(y.size(), [1, 4, 32]);
    }

    #[test]
    fn bf16_compute_casts_fp32_masters_at_the_leaves() {
        let (_vs, l) = layer(Kind::BFloat16, true, 32, true);
        assert_eq!(l.self_attn.q_proj.ws.kind(), Kind::Float, "masters stay fp32");
        let x = Tensor::randn([1, 5, 32], (Kind::Float, Device::Cpu));
        let (cos, sin) = rope(5);
        let y = l.forward(
            &x.to_kind(Kind::BFloat16),
            &cos.to_kind(Kind::BFloat16),
            &sin.to_kind(Kind::BFloat16),
            &AttnMask::Causal,
            Keys::Own,
        );
        assert_eq!(y.kind(), Kind::BFloat16);
        let want = reference(&l, &x, &cos, &sin);
        let rel = (y.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(rel < 0.05, "bf16 block off by {rel} (relative)");
    }
}
