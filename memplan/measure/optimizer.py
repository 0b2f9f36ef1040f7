"""The optimizer a Hugging Face ``Trainer`` builds for an ``optim`` name, on real or fake parameters."""

from __future__ import annotations

import warnings

import torch

from memplan.plan.optimizers import resolve_optimizer

__all__ = ["make_optimizer"]


def make_optimizer(setup, params, *, foreach: bool | None = None, fake: bool = False, lr: float = 5e-5, model=None):
    """The optimizer a HF ``Trainer`` builds for ``setup.optimizer`` (transformers/trainer_optimizer.py).

    ``foreach=None`` is torch's default: the foreach (multi-tensor) implementation on CUDA, the per-tensor
    loop on CPU. ``simulate`` passes ``foreach=True`` for CUDA semantics. bitsandbytes optimizers build their
    quantile maps with ``.tolist()`` at construction, which fake tensors cannot do: they are constructed with
    fake mode switched off (``fake=True``), and step fine on fake tensors afterwards.
    """
    name = resolve_optimizer(setup.optimizer).name
    params = list(params)
    if getattr(setup, "adapter", "lora") == "lora-fa" and model is not None:
        # LoRA-FA trains with peft's own AdamW variant over the model's named parameters (it freezes every lora_A
        # and projects B's gradient): peft/optimizers/lorafa.py create_lorafa_optimizer
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=setup.rank, lora_alpha=setup.alpha, lr=lr)
    tkw = {} if foreach is None else {"foreach": foreach}
    if name in ("adamw_torch", "adam_torch", "adamw_torch_fused"):
        cls = torch.optim.AdamW if name != "adam_torch" else torch.optim.Adam
        kw = {"fused": True} if name == "adamw_torch_fused" else tkw
        return cls(params, lr=lr, **kw)
    if name in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "sgd_momentum" else 0.0, **tkw)
    if name.startswith("rmsprop") and "bnb" not in name:
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9 if name == "rmsprop_momentum" else 0.0,
                                   centered=name == "rmsprop_centered", **tkw)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, **tkw)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False)
    # bitsandbytes: what Trainer._get_bitsandbytes_optimizer builds
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    bits = 8 if "8bit" in name else 32
    if "adamw" in name:
        cls, kw = bnb.optim.AdamW, {"optim_bits": bits, "is_paged": "paged" in name}
    elif "lion" in name:
        cls, kw = bnb.optim.Lion, {"optim_bits": bits, "is_paged": "paged" in name}
    else:
        cls, kw = bnb.optim.RMSprop, {"optim_bits": bits}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Paged optimizers are not supported on CPU"
        if fake:
            with unset_fake_temporarily():
                return cls(params, lr=lr, **kw)
        return cls(params, lr=lr, **kw)
