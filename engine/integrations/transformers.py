"""The engine in a Hugging Face ``transformers.Trainer``: ``EngineTrainer`` takes the Trainer's
own arguments and

- runs the model on the engine's kernels (``engine.patch``: fused norms, attention through the
  engine's scaled_dot_product_attention, rotary, gated MLPs, and a causal LM's training loss by
  the fused linear cross-entropy, without full logits); the report is ``trainer.patch_report``;
- steps with ``engine.optim.FusedAdamW`` (one extension call per device and dtype) with the
  Trainer's learning rate, betas, epsilon and weight-decay groups, unless an optimizer is given;
- clips with ``engine.optim.clip_grad_norm_`` on one process and under DDP (``accelerate launch``,
  ``torchrun``); DeepSpeed, FSDP and XLA keep their own clipping.

    from engine.integrations.transformers import EngineTrainer
    trainer = EngineTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()
"""

from __future__ import annotations

import transformers
from accelerate.utils import DistributedType

from engine.optim import FusedAdamW, clip_grad_norm_
from engine.patching import patch

_OWN_CLIPPING = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


class EngineTrainer(transformers.Trainer):
    """``transformers.Trainer`` on the engine's kernels, optimizer and clip (see the module)."""

    def __init__(self, model=None, args=None, *positional, **kwargs):
        if model is None:
            raise ValueError("EngineTrainer: model is required (the engine patches it; model_init is not supported)")
        self.patch_report = patch(model)
        if args is None:
            args = transformers.TrainingArguments(output_dir="tmp_trainer")  # as the Trainer does
        if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
            kwargs["optimizer_cls_and_kwargs"] = (FusedAdamW, {
                "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon})
        super().__init__(model, args, *positional, **kwargs)

    def _clip_grad_norm(self, model):
        """The Trainer's clip (``max_grad_norm``), fused; the norm before clipping."""
        if self.accelerator.distributed_type not in _OWN_CLIPPING:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
