use super::rotary::apply_rotary;
use super::{linear, Linear, ParamInit, RmsNorm};
use tch::{nn, Device, Kind, Tensor};

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
    /// Repeat the KV heads up to the query heads before attention (HF `repeat_kv`) instead of
    /// grouped-query SDPA. On CPU this selects libtorch's fused kernel (its GQA path falls
    /// back to the unfused one); drafters use it, targets use native GQA. The two agree to
    /// rounding, not bit for bit, so each keeps the numbers it was measured with.
    pub repeat_kv: bool,
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

    /// A cache that reads this one's valid positions and appends past them, into the same
    /// buffers while they have room (then into its own): scratch entries for the owner's
    /// positions past its `len`, which the owner never reads and overwrites when it appends
    /// there itself (SpAF drafting over the target's cache).
    pub fn fork(&self) -> LayerKv {
        LayerKv {
            k: self.k.as_ref().map(|t| t.shallow_clone()),
            v: self.v.as_ref().map(|t| t.shallow_clone()),
            len: self.len,
        }
    }

    /// Keeps, of the positions from `start` on, those at offsets `rows` (ascending), moved to
    /// `start..start + rows.len()`; the rest are dropped (tree verification keeps the
    /// accepted path).
    pub fn keep(&mut self, start: i64, rows: &[i64]) {
        let n = rows.len() as i64;
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            let idx = Tensor::from_slice(rows).to_device(k.device()) + start;
            let (kk, vv) = (k.index_select(2, &idx), v.index_select(2, &idx));
            k.narrow(2, start, n).copy_(&kk);
            v.narrow(2, start, n).copy_(&vv);
        }
        self.len = self.len.min(start + n);
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

/// Which keys and values a query attends to, besides the mask.
pub enum Keys<'a> {
    /// Only the keys of this call's own tokens.
    Own,
    /// This call's keys and values are appended to the cache; queries attend over all of it.
    Cache(&'a mut LayerKv),
    /// Training-time test (EAGLE-3): this step's keys and values are pushed onto the per-step
    /// lists; see [`ttt_attention`] for the pattern.
    Ttt(&'a mut TttKv),
}

/// The per-step keys and values of a training-time-test unroll (KV heads already expanded).
#[derive(Debug, Default)]
pub struct TttKv {
    pub ks: Vec<Tensor>,
    pub vs: Vec<Tensor>,
}

#[derive(Debug)]
pub struct Attention {
    pub cfg: AttentionConfig,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: AttentionConfig, init: ParamInit, compute: Kind) -> Self {
        let (h, kv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let q_proj = linear(&p / "q_proj", cfg.in_dim, h * d, cfg.qkv_bias, init, compute);
        let k_proj = linear(&p / "k_proj", cfg.in_dim, kv * d, cfg.qkv_bias, init, compute);
        let v_proj = linear(&p / "v_proj", cfg.in_dim, kv * d, cfg.qkv_bias, init, compute);
        let o_proj = linear(&p / "o_proj", h * d, cfg.out_dim, cfg.o_bias, init, compute);
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
            head_dim: d,
            ..
        } = self.cfg;
        let mut q = self.q_proj.forward(x).view([b, t, h, d]);
        if let Some(qn) = &self.q_norm {
            q = qn.forward(&q);
        }
        let q = apply_rotary(&q.transpose(1, 2), cos, sin);
        let (k, v) = self.kv(x, cos, sin);
        (q, k, v)
    }

    /// Projects `x` `[B, T, in_dim]` to RoPE'd keys and values `[B, kvh, T, d]` only.
    pub fn kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor) {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (kv, d) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let mut k = self.k_proj.forward(x).view([b, t, kv, d]);
        let v = self.v_proj.forward(x).view([b, t, kv, d]).transpose(1, 2);
        if let Some(kn) = &self.k_norm {
            k = kn.forward(&k);
        }
        (apply_rotary(&k.transpose(1, 2), cos, sin), v)
    }

    /// Appends the keys and values of `x` `[B, T, in_dim]` to `cache` without computing any
    /// query or output: the tokens become context for later queries (a hybrid drafter's
    /// transformer blocks keep every token's keys, also for tokens routed to another block).
    pub fn append_kv(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: &mut LayerKv) {
        let (k, v) = self.kv(x, cos, sin);
        let _ = cache.append(&k, &v);
    }

    /// Scaled-dot-product attention of `q` `[B,h,T,d]` over keys/values `[B,kvh,S,d]`
    /// (grouped-query heads as the config says), then o_proj: `[B, T, out_dim]`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask) -> Tensor {
        let (k, v) = (self.expand_kv(k), self.expand_kv(v));
        let gqa = self.cfg.num_heads != k.size()[1];
        let y = match mask {
            AttnMask::Full => Tensor::scaled_dot_product_attention::<Tensor>(q, &k, &v, None, 0.0, false, None, gqa),
            AttnMask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(q, &k, &v, None, 0.0, true, None, gqa),
            AttnMask::Explicit(m) => Tensor::scaled_dot_product_attention(q, &k, &v, Some(m), 0.0, false, None, gqa),
        };
        self.output(&y)
    }

    /// `[B, h, T, d]` attention values -> o_proj `[B, T, out_dim]`.
    fn output(&self, y: &Tensor) -> Tensor {
        let (b, t) = (y.size()[0], y.size()[2]);
        let y = y
            .transpose(1, 2)
            .reshape([b, t, self.cfg.num_heads * self.cfg.head_dim]);
        self.o_proj.forward(&y)
    }

    /// KV heads repeated up to the query heads when the config asks for it (`repeat_kv`).
    fn expand_kv(&self, x: &Tensor) -> Tensor {
        if self.cfg.repeat_kv {
            repeat_kv(x, self.cfg.num_heads / self.cfg.num_kv_heads)
        } else {
            x.shallow_clone()
        }
    }

    /// The whole block: projections, RoPE, attention over `keys` under `mask`, o_proj.
    pub fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &AttnMask, keys: Keys) -> Tensor {
        let (q, k, v) = self.qkv(x, cos, sin);
        match keys {
            Keys::Own => self.attend(&q, &k, &v, mask),
            Keys::Cache(c) => {
                let (k, v) = c.append(&k, &v);
                self.attend(&q, &k, &v, mask)
            }
            Keys::Ttt(kv) => {
                let rep = self.cfg.num_heads / self.cfg.num_kv_heads;
                kv.ks.push(repeat_kv(&k, rep));
                kv.vs.push(repeat_kv(&v, rep));
                let mask0 = match mask {
                    AttnMask::Explicit(m) => m.shallow_clone(),
                    // full or causal over the step-0 keys
                    other => {
                        let t = q.size()[2];
                        let causal = matches!(other, AttnMask::Causal);
                        let pos = Tensor::arange(t, (Kind::Int64, q.device()));
                        let m = if causal {
                            pos.view([1, t]).le_tensor(&pos.view([t, 1]))
                        } else {
                            Tensor::ones([t, t], (Kind::Bool, q.device()))
                        };
                        m.view([1, 1, t, t])
                    }
                };
                self.output(&ttt_attention(&q, &kv.ks, &kv.vs, &mask0))
            }
        }
    }
}

/// `[B, kvh, T, d]` -> `[B, kvh * rep, T, d]` (HF `repeat_kv`).
pub fn repeat_kv(x: &Tensor, rep: i64) -> Tensor {
    if rep == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2)
        .expand([s[0], s[1], rep, s[2], s[3]], false)
        .reshape([s[0], s[1] * rep, s[2], s[3]])
}

/// The explicit TTT attention mask of step `step` (0-based) for `t` positions: `[t, t*(step+1)]`,
/// `true` = attend; key block 0 = step-0 keys (causal), block j = step j's keys (diagonal).
pub fn ttt_mask(t: i64, step: i64, device: Device) -> Tensor {
    let pos = Tensor::arange(t, (Kind::Int64, device));
    let causal = pos.view([1, t]).le_tensor(&pos.view([t, 1]));
    let eye = pos.view([1, t]).eq_tensor(&pos.view([t, 1]));
    let mut blocks = vec![causal];
    for _ in 0..step {
        blocks.push(eye.shallow_clone());
    }
    Tensor::cat(&blocks, 1)
}

/// Training-time-test attention (EAGLE-3): `q` `[B, h, T, d]`; `ks`/`vs` one `[B, h, T, d]`
/// per step so far (step 0 first); `mask0` `[B, 1, T, T]` (bool) over the step-0 keys. Query
/// t of the current step sees the step-0 keys `mask0` allows plus key t of every later step:
/// the pattern of [`ttt_mask`], computed as a full score block for step 0 and one diagonal
/// score per later step instead of a `[T, T * steps]` mask. Returns `[B, h, T, d]`.
pub fn ttt_attention(q: &Tensor, ks: &[Tensor], vs: &[Tensor], mask0: &Tensor) -> Tensor {
    let d = q.size()[3];
    let scale = 1.0 / (d as f64).sqrt();
    let s0 = q.matmul(&ks[0].transpose(-1, -2)) * scale;
    let s0 = s0.masked_fill(&mask0.logical_not(), f64::NEG_INFINITY);
    let mut scores = vec![s0];
    for k in &ks[1..] {
        scores.push((q * k).sum_dim_intlist(-1, true, q.kind()) * scale);
    }
    let t = q.size()[2];
    let sk = if q.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let w = Tensor::cat(&scores, -1).softmax(-1, sk).to_kind(q.kind());
    let mut out = w.narrow(-1, 0, t).matmul(&vs[0]);
    for (j, v) in vs.iter().enumerate().skip(1) {
        out = w.narrow(-1, t + j as i64 - 1, 1) * v + out;
    }
    out
}

impl AttnMask {
    /// The mask for `t` new tokens after `past` cached ones, without padding: every key for
    /// one token, causal from an empty cache, an explicit causal mask over cache + new keys
    /// otherwise.
    pub fn for_cache(batch: i64, past: i64, t: i64, device: Device) -> AttnMask {
        match (past, t) {
            (_, 1) => AttnMask::Full,
            (0, _) => AttnMask::Causal,
            _ => AttnMask::Explicit(build_mask(batch, past, t, None, None, device)),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Rotary;

    fn attention(repeat_kv: bool) -> (nn::VarStore, Attention) {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = AttentionConfig {
            in_dim: 16,
            out_dim: 16,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            qkv_bias: false,
            o_bias: false,
            qk_norm_eps: None,
            repeat_kv,
        };
        let a = Attention::new(vs.root() / "attn", cfg, ParamInit::Default, Kind::Float);
        (vs, a)
    }

    fn rope(start: i64, t: i64) -> (Tensor, Tensor) {
        let pos = Tensor::arange_start(start, start + t, (Kind::Int64, Device::Cpu)).view([1, t]);
        Rotary::new(4, 10000.0, &crate::layers::RopeScaling::None, Device::Cpu).cos_sin(&pos, Kind::Float)
    }

    #[test]
    fn cached_attention_in_pieces_equals_causal_attention_over_the_whole_sequence() {
        for repeat_kv in [false, true] {
            let (_vs, a) = attention(repeat_kv);
            let x = Tensor::randn([1, 7, 16], (Kind::Float, Device::Cpu));
            let (cos, sin) = rope(0, 7);
            let full = a.forward(&x, &cos, &sin, &AttnMask::Causal, Keys::Own);
            let mut cache = LayerKv::default();
            let mut outs = Vec::new();
            for (s, n) in [(0, 4), (4, 1), (5, 2)] {
                let (c, sn) = rope(s, n);
                let mask = AttnMask::for_cache(1, cache.len(), n, Device::Cpu);
                outs.push(a.forward(&x.narrow(1, s, n), &c, &sn, &mask, Keys::Cache(&mut cache)));
            }
            let diff = (Tensor::cat(&outs, 1) - full).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "repeat_kv {repeat_kv}: {diff}");
            // a rollback is a truncation: re-appending gives the same again
            cache.truncate(5);
            let (c, sn) = rope(5, 2);
            let again = a.forward(
                &x.narrow(1, 5, 2),
                &c,
                &sn,
                &AttnMask::for_cache(1, 5, 2, Device::Cpu),
                Keys::Cache(&mut cache),
            );
            assert!(again.equal(&outs[2]));
        }
    }

    #[test]
    fn ttt_keys_equal_attention_over_every_step_with_the_explicit_ttt_mask() {
        let (_vs, a) = attention(true);
        let t = 5;
        let mask0 = AttnMask::Explicit(build_mask(1, 0, t, None, None, Device::Cpu));
        let mut kv = TttKv::default();
        let (cos, sin) = rope(0, t);
        let xs: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn([1, t, 16], (Kind::Float, Device::Cpu)))
            .collect();
        for (step, x) in xs.iter().enumerate() {
            let got = a.forward(x, &cos, &sin, &mask0, Keys::Ttt(&mut kv));
            // reference: queries of this step over the concatenated keys of every step so far
            let (q, _, _) = a.qkv(x, &cos, &sin);
            let k = Tensor::cat(&kv.ks, 2);
            let v = Tensor::cat(&kv.vs, 2);
            let m = ttt_mask(t, step as i64, Device::Cpu).view([1, 1, t, t * (step as i64 + 1)]);
            let y = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&m), 0.0, false, None, false);
            let want = a.output(&y);
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "step {step}: {diff}");
        }
        assert_eq!(kv.ks.len(), 3);
    }

    #[test]
    fn masks_for_a_cache() {
        assert!(matches!(AttnMask::for_cache(1, 0, 1, Device::Cpu), AttnMask::Full));
        assert!(matches!(AttnMask::for_cache(1, 9, 1, Device::Cpu), AttnMask::Full));
        assert!(matches!(AttnMask::for_cache(1, 0, 4, Device::Cpu), AttnMask::Causal));
        let AttnMask::Explicit(m) = AttnMask::for_cache(1, 2, 3, Device::Cpu) else {
            panic!("explicit mask expected")
        };
        // query 0 (position 2) sees keys 0..=2, query 2 (position 4) sees all 5
        let want = Tensor::from_slice(&[1u8, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
            .view([1, 1, 3, 5])
            .to_kind(Kind::Bool);
        assert!(m.equal(&want));
    }
}
