"""Models and constants the converter tests share (imported by name; conftest is not importable)."""

from __future__ import annotations

FAST = 5  # latency runs per candidate: tests assert on policy and accuracy, not on speed


def outlier_mlp():
    """An MLP whose third layer has one hidden channel ~500x larger than the rest.

    Per-tensor activation quantization of that layer's output rounds every other channel
    to zero, so plain INT8 fails any sensible budget; keeping the few nodes around that
    tensor in float fixes it while the first layers stay INT8.
    """
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        m[5].weight[0] *= 500
        m[5].bias[0] = 500.0
        m[7].weight[:, 0] /= 500
    return m.eval()
