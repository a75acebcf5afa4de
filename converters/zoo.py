"""Real models for tests, benchmarks and the demo; nothing here downloads anything.

- :func:`train_digits_cnn`: a small CNN trained on scikit-learn's bundled digits (1,797
  8x8 images) in a few seconds on 2 cores; it gives a real accuracy number.
- :func:`mobilenet_v2_like`: a MobileNetV2-sized net (inverted residuals, ~3.5 M params),
  random weights, for size and speed figures.
- :func:`small_transformer`: a 2-layer encoder classifier over token embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DigitsData:
    x_train: np.ndarray  # float32, (N, 1, 8, 8), scaled to [0, 1]
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_test = int(len(x) * test_fraction)
    te, tr = idx[:n_test], idx[n_test:]
    return DigitsData(x[tr], y[tr], x[te], y[te])


def digits_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def train_digits_cnn(epochs: int = 15, seed: int = 0, data: DigitsData | None = None):
    """Return ``(model, data, test_accuracy)``; the model is in eval mode on the CPU."""
    import torch

    torch.manual_seed(seed)
    data = data or load_digits_split(seed)
    model = digits_cnn()
    train_model(model, data.x_train, data.y_train, epochs=epochs, seed=seed)
    return model, data, accuracy(model, data.x_test, data.y_test)


def train_model(model, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int = 0, lr: float = 3e-3, batch: int = 64) -> None:
    """Plain supervised training (also the recovery fine-tune after pruning).

    Integer ``y`` are class labels (cross-entropy); float ``y`` are targets to match
    (mean squared error), which is how a pruned model is distilled from the original.
    Runs on one thread: these nets are too small to gain from more, and on a busy
    machine extra OpenMP threads made training several times slower (measured 3.4x).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.as_tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    loss_fn = torch.nn.MSELoss() if yt.is_floating_point() else torch.nn.CrossEntropyLoss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=g)
            for i in range(0, len(xt), batch):
                b = perm[i : i + batch]
                opt.zero_grad()
                loss_fn(model(xt[b]), yt[b]).backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def _inverted_residual(cin: int, cout: int, stride: int, expand: int):
    import torch.nn as nn

    hidden = cin * expand
    layers = []
    if expand != 1:
        layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
    layers += [
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
    ]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    return Block()


def mobilenet_v2_like(num_classes: int = 1000, width: float = 1.0, seed: int = 0):
    """MobileNetV2's layout (Sandler et al. 2018) with random weights: ~3.5 M params at width 1."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    c = int(32 * width)
    layers: list = [nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
    for t, ch, n, s in cfg:
        out = int(ch * width)
        for i in range(n):
            layers.append(_inverted_residual(c, out, s if i == 0 else 1, t))
            c = out
    last = int(1280 * max(1.0, width))
    layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers, nn.Dropout(0.2), nn.Linear(last, num_classes))
    # Random BatchNorm statistics make activations explode; settle them on random images
    # so the net's outputs have a realistic range for calibration and comparison.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


def small_transformer(vocab: int = 1000, dim: int = 128, heads: int = 4, layers: int = 2, seq: int = 32, classes: int = 4, seed: int = 0):
    """A text classifier over float token embeddings (input ``(N, seq, dim)``), random weights."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)

    class TinyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(dim, heads, dim * 4, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            h = self.encoder(x + self.pos)
            return self.head(h.mean(dim=1))

    return TinyEncoder().eval()
