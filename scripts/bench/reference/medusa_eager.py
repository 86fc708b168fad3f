#!/usr/bin/env python3
"""Reference for `forge bench train --drafter medusa`: the same online Medusa training step in
plain PyTorch eager, on the same libtorch (the venv of setup.sh beside this file).

Matched to forge's Medusa defaults (models/src/drafters/medusa.rs, trainer/src/recipe/,
trainer/src/bench_train.rs):
- target: the Hugging Face Llama folder through transformers (fp32, attn_implementation
  "sdpa", eval mode, frozen, under no_grad), no KV cache, no logits: the features are the base
  model's last hidden state after its final RMSNorm (= outputs.hidden_states[-1]);
- 4 heads, each 1 ResBlock x + SiLU(Linear(H, H, bias)) with the weight zero-initialised,
  then its own trainable Linear(H, V, bias=False), a copy of the target's lm_head
  (`original_lm_head: false`);
- head k (0-based) at position t predicts token t+k+2, over positions 0..T-k-3 of each row
  (picked through the loss mask, all ones, as forge does), loss = sum_k 0.8^(k+1) * CE_k;
  per-head top-1 / top-3 hit counts and the CE read back as numbers, as forge's loss does
  (--no-metrics skips them);
- AdamW lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0, gradient clipping at 0.5;
- the batch: B x T random token ids (torch.randint), every position trained.

Timed per step, like forge's: target forward | heads forward + loss | backward | clip |
optimizer step | zero_grad.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main():
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--decay", type=float, default=0.8, help="loss weight of head k is decay^(k+1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-grad-norm", type=float, default=0.5)
    impl = p.add_mutually_exclusive_group()
    impl.add_argument("--foreach", action="store_true", help="torch.optim.AdamW(foreach=True)")
    impl.add_argument("--fused", action="store_true", help="torch.optim.AdamW(fused=True)")
    p.add_argument("--zero-grad-in-place", action="store_true",
                   help="zero_grad(set_to_none=False): zero the gradients in place, as forge does "
                        "(default: PyTorch's set_to_none=True)")
    p.add_argument("--no-metrics", action="store_true",
                   help="skip the per-head top-1/top-3 counts forge computes inside its loss")
    a = p.parse_args()
    C.check_args(a)
    C.set_threads(a.threads)
    torch, device = C.setup_torch(a)
    import torch.nn as nn
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).eval().requires_grad_(False)
    cfg = model.config
    if not cfg.model_type == "llama":
        print(f"note: model_type {cfg.model_type}, the reference was written for Llama targets", file=sys.stderr)
    h, vocab = cfg.hidden_size, cfg.vocab_size
    lm_head = model.get_output_embeddings().weight  # tied to the embedding on the demo target

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(h, h, bias=True) for _ in range(a.layers))
            for b in self.blocks:
                nn.init.zeros_(b.weight)  # the bias keeps nn.Linear's (= tch's) uniform init
            self.lm_head = nn.Linear(h, vocab, bias=False)
            with torch.no_grad():
                self.lm_head.weight.copy_(lm_head)

        def forward(self, x):
            for b in self.blocks:
                x = x + F.silu(b(x))
            return self.lm_head(x)

    heads = nn.ModuleList(Head() for _ in range(a.heads)).to(device)
    params = [q for q in heads.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                            foreach=True if a.foreach else None, fused=True if a.fused else None)
    if a.fused or a.foreach:
        variant = "fused" if a.fused else "foreach"
    else:  # what torch.optim picks itself for these parameters
        from torch.optim.optimizer import _default_to_fused_or_foreach
        _, auto_foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
        variant = "foreach (torch's default here)" if auto_foreach else "for-loop / single-tensor (torch's default here)"

    def loss_fn(hidden, ids, loss_mask):
        b, t, _ = hidden.shape
        total = hidden.new_zeros(())
        stats = []
        for k, head in enumerate(heads):
            shift = k + 2
            if t <= shift:
                continue
            n = t - shift
            labels = ids[:, shift:]
            idx = loss_mask[:, shift:].ne(0).reshape(-1).nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            x = hidden[:, :n].reshape(b * n, h).index_select(0, idx)
            y = labels.reshape(-1).index_select(0, idx)
            logits = head(x)
            ce = F.cross_entropy(logits, y)
            total = total + ce * a.decay ** (k + 1)
            if not a.no_metrics:
                with torch.no_grad():
                    top1 = logits.argmax(-1).eq(y).sum().item()
                    top3 = logits.topk(3, -1).indices.eq(y.unsqueeze(-1)).any(-1).sum().item()
                    stats.append((ce.item(), top1, top3))
        return total, stats

    totals, phases = [], []
    loss0 = ce0 = None
    clock = C.Clock(torch, device)
    for step in range(a.warmup + a.steps):
        ids, ones = C.synthetic_batch(torch, vocab, a, device)
        clock.start()
        with torch.no_grad():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        clock.lap("target")
        loss, stats = loss_fn(hidden, ids, ones)
        clock.lap("heads_fwd_loss")
        loss.backward()
        clock.lap("backward")
        torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        clock.lap("clip")
        opt.step()
        clock.lap("optimizer")
        opt.zero_grad(set_to_none=not a.zero_grad_in_place)
        clock.lap("zero_grad")
        if step == 0:
            loss0 = loss.item()
            ce0 = [s[0] for s in stats] if stats else None
            if not math.isfinite(loss0):
                sys.exit(f"step 0 loss is {loss0}")
        if step >= a.warmup:
            totals.append(clock.total())
            phases.append(clock.phases)

    row = C.summarise(a, "medusa", "pytorch-eager", totals, phases, "target", {
        "trainable_params": trainable,
        "loss_step0": loss0,
        "ce_heads_step0": ce0,
        "settings": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "fp32",
            "target_attention": "sdpa (transformers)",
            "heads": a.heads, "layers": a.layers, "decay": a.decay,
            "vocab": vocab, "hidden": h,
            "optimizer": f"torch.optim.AdamW {variant}, lr {a.lr}, betas (0.9, 0.95), eps 1e-8, weight_decay 0",
            "clip": f"torch.nn.utils.clip_grad_norm_ max_norm {a.max_grad_norm}",
            "zero_grad": "in place (set_to_none=False)" if a.zero_grad_in_place else "set_to_none=True",
            "metrics": not a.no_metrics,
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    })
    C.report(a, row)
    print(f"  step-0 loss {loss0:.4f}" + (f" (CE per head {', '.join(f'{c:.3f}' for c in ce0)})" if ce0 else "")
          + f", trainable params {trainable:,}")


if __name__ == "__main__":
    main()
