use super::rotary::apply_rotary;
use super::{linear, ParamInit, RmsNorm};
use tch::{nn, nn::Module, Kind, Tensor};

/// Shape of a multi-head attention block (GQA when `num_kv_heads < num_heads`).
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Width of the input (the hidden size, or 2x hidden for EAGLE-3's midlayer).
    pub in_dim: i64,
    /// Width of the output (o_proj's out features).
    pub out_dim: i64,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    /// Bias on q/k/v projections (Qwen2, `attention_bias: true`).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias: true` in Llama configs).
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3), with this epsilon.
    pub qk_norm_eps: Option<f64>,
}

/// Which keys each query may attend to.
#[derive(Debug)]
pub enum AttnMask {
    /// Every query attends to every key (single-token decoding without padding).
    Full,
    /// Plain causal attention over a sequence without cache or padding.
    Causal,
    /// Explicit boolean mask `[B, 1, T, S]`, `true` = attend.
    Explicit(Tensor),
}

/// One layer's key/value cache: pre-allocated `[B, kv_heads, capacity, head_dim]` buffers
/// of which the first `len` positions are valid. Truncation (rollback after rejected
/// speculative tokens) just moves `len`.
#[derive(Debug, Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: i64,
}

impl LayerKv {
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn truncate(&mut self, len: i64) {
        self.len = self.len.min(len.max(0));
    }

    /// Appends `[B, kvh, t, d]` keys/values; returns views of the whole valid cache.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let need = self.len + t;
        let cap = self.k.as_ref().map(|k| k.size()[2]).unwrap_or(0);
        if need > cap {
            let new_cap = need.max(2 * cap).max(64);
            let mut shape = k.size();
            shape[2] = new_cap;
            let nk = Tensor::zeros(&shape, (k.kind(), k.device()));
            let nv = Tensor::zeros(&shape, (v.kind(), v.device()));
            if let (Some(ok), Some(ov)) = (&self.k, &self.v) {
                if self.len > 0 {
                    nk.narrow(2, 0, self.len).copy_(&ok.narrow(2, 0, self.len));
                    nv.narrow(2, 0, self.len).copy_(&ov.narrow(2, 0, self.len));
                }
            }
            self.k = Some(nk);
            self.v = Some(nv);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => unreachable!("cache buffers allocated above"),
        };
        kb.narrow(2, self.len, t).copy_(k);
        vb.narrow(2, self.len, t).copy_(v);
        self.len = need;
        (kb.narrow(2, 0, need), vb.narrow(2, 0, need))
    }
}

#[derive(Debug)]
pub struct Attention {
    pub cfg: AttentionConfig,
    pub q_proj: nn::Linear,
    pub k_proj: nn::Linear,
    pub v_proj: nn::Linear,
    pub o_proj: nn::Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: AttentionConfig, init: ParamInit) -> Self {
        let (h, kv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let q_proj = linear(&p / "q_proj", cfg.in_dim, h * d, cfg.qkv_bias, init);
        let k_proj = linear(&p / "k_proj", cfg.in_dim, kv * d, cfg.qkv_bias, init);
        let v_proj = linear(&p / "v_proj", cfg.in_dim, kv * d, cfg.qkv_bias, init);
        let o_proj = linear(&p / "o_proj", h * d, cfg.out_dim, cfg.o_bias, init);
        let (q_norm, k_norm) = match cfg.qk_norm_eps {
            Some(eps) => (
                Some(RmsNorm::new(&p / "q_norm", d, eps, init)),
                Some(RmsNorm::new(&p / "k_norm", d, eps, init)),
            ),
            None => (None, None),
        };
        Self {
            cfg,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
        }
    }

    /// Projects `x` `[B, T, in_dim]` to RoPE'd queries `[B, h, T, d]` and keys/values
    /// `[B, kvh, T, d]`.
    pub fn qkv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let AttentionConfig {
            num_heads: h,
            num_kv_heads: kv,
            head_dim: d,
            ..
        } = self.cfg;
        let mut q = self.q_proj.forward(x).view([b, t, h, d]);
        let mut k = self.k_proj.forward(x).view([b, t, kv, d]);
        let v = self.v_proj.forward(x).view([b, t, kv, d]).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q);
            k = kn.forward(&k);
        }
        let q = apply_rotary(&q.transpose(1, 2), cos, sin);
        let k = apply_rotary(&k.transpose(1, 2), cos, sin);
        (q, k, v)
    }

    /// Attention over (optionally cached) keys; `q` `[B,h,T,d]`, `k`/`v` `[B,kvh,S,d]`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Tensor {
        let (b, t) = (q.size()[0], q.size()[2]);
        let gqa = self.cfg.num_heads != self.cfg.num_kv_heads;
        let y = match mask {
            AttnMask::Full => {
                Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, false, None, gqa)
            }
            AttnMask::Causal => {
                Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, gqa)
            }
            AttnMask::Explicit(m) => {
                Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, None, gqa)
            }
        };
        let y = y
            .transpose(1, 2)
            .reshape([b, t, self.cfg.num_heads * self.cfg.head_dim]);
        self.o_proj.forward(&y)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttnMask,
        cache: Option<&mut LayerKv>,
    ) -> Tensor {
        let (q, k, v) = self.qkv(x, cos, sin);
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v),
            None => (k, v),
        };
        self.attend(&q, &k, &v, mask)
    }
}

/// Builds the boolean mask for `t` new queries at positions `past..past+t` over `past + t`
/// keys: causal, optionally restricted to keys marked valid in `key_valid` `[B, past+t]`
/// (padding) and to a sliding window. The diagonal is always allowed so that padded query
/// rows never attend to nothing (their outputs are ignored).
pub fn build_mask(
    batch: i64,
    past: i64,
    t: i64,
    key_valid: Option<&Tensor>,
    window: Option<i64>,
    device: tch::Device,
) -> Tensor {
    let s = past + t;
    let qpos = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
    let kpos = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
    let mut m = kpos.le_tensor(&qpos); // [t, s]
    if let Some(w) = window {
        m = m.logical_and(&(&qpos - &kpos).lt(w));
    }
    let mut m = m.view([1, 1, t, s]).expand([batch, 1, t, s], false);
    if let Some(valid) = key_valid {
        m = m.logical_and(&valid.to_kind(Kind::Bool).view([batch, 1, 1, s]));
    }
    let diag = kpos.eq_tensor(&qpos).view([1, 1, t, s]);
    m.logical_or(&diag)
}
