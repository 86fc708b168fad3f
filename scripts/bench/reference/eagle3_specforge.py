#!/usr/bin/env python3
"""Reference for `forge bench train --drafter eagle3`: SpecForge 0.2.0's own EAGLE-3 training
step (its draft model, training model, step strategy, trainer step and optimizer, all imported
from the `specforge` package), fed by a Hugging Face transformers target, on the same libtorch
(the venv of setup.sh beside this file).

SpecForge 0.2.0 has no in-process target any more: its online mode streams the target's
features from an SGLang server (and its offline mode reads them from disk). Here the target is
run with transformers (fp32, sdpa, eval, frozen, no_grad, no KV cache) and its features are
handed to SpecForge exactly as its EAGLE-3 capture contract names them (`hidden_state` = the
three auxiliary layer outputs concatenated, `target` = the last hidden state after the final
norm, target_repr "hidden_state", which SpecForge's own TargetHead turns into logits inside the
step). What is SpecForge's:
- the draft config, generated from the target by specforge.training.model_loading
  (_generate_draft_config with the eagle3 provider: one Llama decoder layer with the target's
  hidden size, heads, KV heads, MLP width, RoPE; draft vocabulary 32000);
- the draft model, built by specforge.algorithms.model_providers.build_eagle3_draft
  (LlamaForCausalLMEagle3 from specforge.modeling.draft.llama3_eagle, the target's embedding
  loaded and frozen, the d2t/t2d mapping loaded by its load_vocab_mapping: the first 32000 ids,
  as forge's bench uses);
- the capture layers, from its resolve_eagle_capture_layers ([1, L/2-1, L-4]);
- the training model OnlineEagle3Model (specforge.algorithms.eagle3.model, ttt_length 7,
  attention backend "sdpa" = its eager TTT attention), the step Eagle3TrainStrategy (ploss
  decay 0.8), the step driver TrainerCore (specforge.training.controller), the frozen
  TargetHead (specforge.modeling.target.target_head) and the optimizer BF16Optimizer
  (specforge.optimizer: fp32 master copies, AdamW, clipping at 0.5, cosine schedule) with
  SpecForge's defaults;
- on CPU the soft cross-entropy is SpecForge's own torch reference (_compute_loss in
  specforge/core/loss.py) instead of its Triton kernel LogSoftmaxLoss, which needs a GPU.

Timed per step: target forward | SpecForge forward + loss (strategy.forward_loss) | backward |
optimizer step (BF16Optimizer.step: clip, AdamW, zero_grad, copy back) | the rest of
TrainerCore.train_step (its metric reductions).
"""

import os
import sys
import tempfile
import time
import types
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main():
    p = C.parser(__doc__.split("\n")[0])
    p.add_argument("--ttt-length", type=int, default=7)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--attention-backend", default="sdpa", choices=["sdpa", "flex_attention"],
                   help="SpecForge's draft attention (its own default is flex_attention, which has no "
                        "backward on CPU in torch 2.13: CUDA only)")
    p.add_argument("--optimizer", default="specforge", choices=["specforge", "torch"],
                   help="specforge: its BF16Optimizer (AdamW betas (0.9, 0.999), fp32 masters); "
                        "torch: torch.optim.AdamW with forge's betas (0.9, 0.95) + clip_grad_norm_")
    impl = p.add_mutually_exclusive_group()
    impl.add_argument("--foreach", action="store_true", help="with --optimizer torch: AdamW(foreach=True)")
    impl.add_argument("--fused", action="store_true", help="with --optimizer torch: AdamW(fused=True)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-compile", action="store_true",
                   help="run SpecForge's torch.compile'd functions (RMSNorm, target probabilities, "
                        "loss) eagerly")
    a = p.parse_args()
    C.check_args(a)
    if (a.foreach or a.fused) and a.optimizer != "torch":
        sys.exit("--foreach / --fused choose torch.optim.AdamW's variant: they need --optimizer torch")
    C.set_threads(a.threads)
    if a.no_compile:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"
    # SpecForge picks its device itself (CUDA when present): make it the one asked for
    os.environ["SPECFORGE_DEVICE"] = "cuda" if a.device.startswith("cuda") else "cpu"
    torch, device = C.setup_torch(a)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    warnings.filterwarnings("ignore", message="flash_attn is not found")
    warnings.filterwarnings("ignore", message="To get the last learning rate")  # SpecForge's scheduler
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    import specforge.algorithms.eagle3.model as sf_eagle3_model
    from specforge.algorithms.eagle3.providers import algorithm_providers
    from specforge.algorithms.model_providers import build_eagle3_draft, build_eagle3_model
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.backend import TrainingBackend
    from specforge.training.controller import TrainerCore
    from specforge.training.model_loading import _apply_draft_overrides, _generate_draft_config
    from specforge.training.strategies.base import StepContext
    from importlib.metadata import version

    providers = algorithm_providers()
    tmp = tempfile.mkdtemp(prefix="forge-bench-specforge-")
    vocab_file = os.path.join(tmp, "vocab_mapping.pt")
    # SpecForge's run configuration, only the fields its builders read (its defaults, but fp32,
    # the sdpa draft attention, and the vocabulary mapping below)
    cfg = types.SimpleNamespace(
        mode="online",
        deployment=types.SimpleNamespace(mode="colocated"),
        model=types.SimpleNamespace(
            target_model_path=a.target, cache_dir=None, trust_remote_code=False,
            torch_dtype="float32", draft_checkpoint_path=None, vocab_mapping_path=vocab_file,
            load_target_embedding=True, embedding_key="model.embed_tokens.weight",
            aux_hidden_state_layer_ids=None, draft_num_hidden_layers=None, draft_block_size=None,
        ),
        training=types.SimpleNamespace(
            strategy="eagle3", attention_backend=a.attention_backend, ttt_length=a.ttt_length,
            lk_loss_type=None, kl_scale=1.0, kl_decay=1.0, compact_teacher=False,
            compact_teacher_chunk_size=None, learning_rate=a.lr, max_grad_norm=0.5,
            warmup_ratio=0.015, lr_scheduler="cosine",
        ),
    )

    # the target (transformers), frozen
    target = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32, attn_implementation="sdpa")
    target.to(device).eval().requires_grad_(False)
    tcfg = target.config
    vocab, h = tcfg.vocab_size, tcfg.hidden_size

    # SpecForge's draft config, capture layers, draft model and training model
    draft_config = _generate_draft_config(cfg, providers.model.draft_config)
    draft_config.draft_vocab_size = min(a.draft_vocab, vocab)
    _apply_draft_overrides(cfg, draft_config, providers.model.draft_config)
    layers = providers.model.resolve_capture_layers(cfg, draft_config, tcfg)
    vd = draft_config.draft_vocab_size
    torch.save({"t2d": torch.arange(vocab) < vd, "d2t": torch.zeros(vd, dtype=torch.long)}, vocab_file)
    draft = build_eagle3_draft(cfg, draft_config)
    parts = build_eagle3_model(cfg, draft, draft_config, tcfg, None)
    model = parts.model
    model.train()
    # the frozen target head the step turns the last hidden state into logits with
    # (TargetHead.from_pretrained wants a sharded checkpoint and casts to bf16: same class,
    # built directly, fp32)
    head = TargetHead(a.target)
    with torch.no_grad():
        head.fc.weight.copy_(target.get_output_embeddings().weight)
    head.freeze_weights()
    head = head.eval().to(device=device, dtype=torch.float32)
    strategy = providers.step.build(model, target_head=head, **providers.step.options(cfg))

    loss_impl = "Triton LogSoftmaxLoss (SpecForge's default)"
    if device.type != "cuda":
        from specforge.core.loss import _compute_loss

        class TorchSoftCE:
            """SpecForge's own torch reference of its soft cross-entropy (core/loss.py)."""

            @staticmethod
            def apply(logits, target_p, position_mask):
                return _compute_loss(logits, target_p, position_mask)

        sf_eagle3_model.LogSoftmaxLoss = TorchSoftCE
        loss_impl = "specforge.core.loss._compute_loss (SpecForge's torch reference; its Triton kernel needs a GPU)"

    params = [q for q in model.parameters() if q.requires_grad]
    trainable = sum(q.numel() for q in params)
    total_steps = a.warmup + a.steps
    if a.optimizer == "specforge":
        opt = BF16Optimizer(model, lr=a.lr, max_grad_norm=0.5, warmup_ratio=0.015,
                            lr_scheduler="cosine", total_steps=total_steps)
        opt_desc = ("specforge.optimizer.BF16Optimizer: fp32 master copies, torch.optim.AdamW "
                    "(betas (0.9, 0.999), eps 1e-8, weight_decay 0, torch's default variant), clip 0.5, cosine LR")
        step_fn = opt.step
    else:
        adamw = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  foreach=True if a.foreach else None, fused=True if a.fused else None)
        variant = "fused" if a.fused else "foreach" if a.foreach else "torch's default variant"
        opt_desc = (f"torch.optim.AdamW {variant} (betas (0.9, 0.95), eps 1e-8, weight_decay 0) "
                    "+ clip_grad_norm_ 0.5 + zero_grad(set_to_none=True)")

        def step_fn():
            norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
            adamw.step()
            adamw.zero_grad()
            return norm

    clock = C.Clock(torch, device)

    class Backend(TrainingBackend):
        """One process, no FSDP: what SpecForge's FSDP backend does unwrapped."""

        name = "single-process"

        def prepare_model(self, m):
            return m

        def backward(self, loss, *, is_boundary=True):
            clock.lap("fwd_loss")
            loss.backward()
            clock.lap("backward")

        def step(self):
            norm = step_fn()
            clock.lap("optimizer")
            return norm

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    core = TrainerCore(strategy, Backend(), accumulation_steps=1)
    seen = {}
    forward_loss = strategy.forward_loss

    def recorded_forward_loss(batch, ctx=None):
        out = forward_loss(batch, ctx)
        seen["loss"] = out.loss.detach()
        seen["plosses"] = out.metrics.get("plosses")
        return out

    strategy.forward_loss = recorded_forward_loss

    totals, phases = [], []
    loss0 = plosses0 = None
    for step in range(total_steps):
        ids, ones = C.synthetic_batch(torch, vocab, a, device)
        loss_mask = ones.clone()
        loss_mask[:, -1] = 0  # as SpecForge's own collation: the last token has no next one
        t_step = time.perf_counter()
        clock.start()
        with torch.no_grad():
            out = target.model(input_ids=ids, output_hidden_states=True, use_cache=False)
            aux = torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)
            last = out.last_hidden_state
        clock.lap("target")
        batch = TrainBatch(
            sample_ids=[f"bench-{step}-{i}" for i in range(a.batch)],
            strategy="eagle3",
            tensors={"input_ids": ids, "attention_mask": ones, "loss_mask": loss_mask,
                     "hidden_state": aux, "target": last},
            metadata={"target_repr": "hidden_state"},
        )
        core.train_step(batch, StepContext(global_step=step, total_steps=total_steps))
        clock.lap("trainer_rest")
        if step == 0:
            loss0 = seen["loss"].item()
            plosses0 = [float(x) for x in seen["plosses"]] if seen.get("plosses") else None
        if step >= a.warmup:
            totals.append(clock.total())
            phases.append(clock.phases)
        if step < a.warmup:
            print(f"  warm-up step {step}: {(time.perf_counter() - t_step):.1f} s", file=sys.stderr)

    row = C.summarise(a, "eagle3", "specforge", totals, phases, "target", {
        "trainable_params": trainable,
        "loss_step0": loss0,
        "ploss_step0": plosses0,
        "settings": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "specforge": version("specforge"),
            "dtype": "fp32",
            "target_attention": "sdpa (transformers)",
            "draft_attention_backend": a.attention_backend,
            "torch_compile": not a.no_compile,
            "ttt_length": a.ttt_length,
            "draft_vocab": vd,
            "aux_layers": layers,
            "draft_layer": {k: getattr(draft_config, k, None) for k in (
                "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "num_hidden_layers", "rms_norm_eps")},
            "loss": loss_impl,
            "optimizer": opt_desc,
            "modules": ["specforge.algorithms.eagle3.model.OnlineEagle3Model",
                        "specforge.modeling.draft.llama3_eagle.LlamaForCausalLMEagle3",
                        "specforge.training.strategies.base.Eagle3TrainStrategy",
                        "specforge.training.controller.TrainerCore",
                        "specforge.modeling.target.target_head.TargetHead",
                        "specforge.optimizer.BF16Optimizer" if a.optimizer == "specforge" else "torch.optim.AdamW"],
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    })
    C.report(a, row)
    print(f"  step-0 loss {loss0:.4f} (SpecForge's scale: per TTT step the soft CE averaged over all "
          f"B*T rows), trainable params {trainable:,}, aux layers {layers}")


if __name__ == "__main__":
    main()
