"""Structured channel pruning (torch-pruning) with a recovery fine-tune; PyTorch sources only.

Pruning alone wrecks accuracy (the digits CNN falls to ~0.3), so a fine-tune always
follows: on the labels when the calibration data has them, otherwise by distillation
from the unpruned model's outputs (no labels needed, said in the report).

Public API: :class:`PruneConfig`, :func:`prune_module`.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from pydantic import Field

from .errors import PruningError
from .passes import PassConfig, register_pass

__all__ = ["PruneConfig", "prune_module"]


class PruneConfig(PassConfig):
    channel_ratio: float = Field(default=0.3, gt=0.0, lt=0.95, description="Fraction of channels removed from each prunable layer.")
    finetune_epochs: int = Field(default=10, ge=0, le=1000, description="Recovery fine-tune epochs on the calibration data.")
    lr: float = Field(default=1e-3, gt=0, description="Fine-tune learning rate.")


@register_pass("prune", stage="prune", description="Structured channel pruning by L2 magnitude, then recovery fine-tune (labels, or distillation).", config=PruneConfig)
def prune_module(config: PruneConfig, module: Any, sample_shape: tuple[int, ...], x: np.ndarray, y: np.ndarray | None) -> tuple[Any, dict[str, Any]]:
    """A pruned copy of ``module`` (the original is untouched) and what was done."""
    import torch
    import torch_pruning as tp

    if not isinstance(module, torch.nn.Module) or isinstance(module, torch.jit.ScriptModule):
        raise PruningError("pruning needs an eager torch.nn.Module", hint="give a module:callable factory or an nn.Module, not TorchScript/ONNX")
    model = copy.deepcopy(module).eval()
    example = torch.from_numpy(np.ascontiguousarray(x[:2]))
    with torch.no_grad():
        teacher = model(torch.from_numpy(x)).detach()
    # The classifier head's outputs are the model's contract: never prune them.
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ignored = linears[-1:]
    before = sum(p.numel() for p in model.parameters())
    try:
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=config.channel_ratio, ignored_layers=ignored)
        pruner.step()
    except Exception as e:  # torch-pruning's graph tracing fails in many ways on exotic modules
        raise PruningError(f"torch-pruning could not prune this model: {str(e).splitlines()[0][:200]}") from None
    after = sum(p.numel() for p in model.parameters())
    how = "none"
    if config.finetune_epochs:
        from .zoo import train_model

        if y is not None:
            train_model(model, x, y, epochs=config.finetune_epochs, lr=config.lr)
            how = f"{config.finetune_epochs} epochs on {len(x)} labelled calibration samples"
        else:
            train_model(model, x, teacher.numpy(), epochs=config.finetune_epochs, lr=config.lr)
            how = f"{config.finetune_epochs} epochs of distillation from the unpruned model ({len(x)} unlabelled samples)"
    model.eval()
    return model, {"params_before": before, "params_after": after, "channel_ratio": config.channel_ratio, "finetune": how}
