"""Efficient building blocks, written from the papers, and a parameter / FLOP counter.

* :class:`InvertedResidual` -- MobileNetV2 (Sandler et al., 2018): 1x1 expand + BN + ReLU6,
  3x3 depthwise + BN + ReLU6, 1x1 linear projection + BN, identity shortcut when the shape
  allows. ``fused=True`` runs depthwise + projection + shortcut as one
  :class:`~compress_ops.nn.FusedDWSepConv2d` (the kernel adds the residual).
* :func:`mobilenet_v2` -- the network of the paper's Table 2, with a width multiplier.
* :class:`Fire` -- SqueezeNet (Iandola et al., 2016): 1x1 squeeze, then 1x1 and 3x3 expands
  concatenated.
* :class:`ShuffleUnit` -- ShuffleNet v1 (Zhang et al., 2018): grouped 1x1, channel shuffle,
  3x3 depthwise, grouped 1x1, add (stride 1) or concat with an average pool (stride 2).
  :meth:`ShuffleUnit.fold_shuffle` folds the shuffle, both BatchNorms and the second grouped
  conv into one fused depthwise-separable unit: the shuffle costs nothing at inference.
* :class:`DenseBlock` -- DenseNet-BC (Huang et al., 2017): BN-ReLU-1x1(4k)-BN-ReLU-3x3(k)
  layers, each concatenated to its input.
* :func:`profile` -- parameters and FLOPs per module for one input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops._text import format_table
from compress_ops.nn.dwsep_conv import FusedDWSepConv2d, fold_bn

__all__ = ["InvertedResidual", "mobilenet_v2", "Fire", "ShuffleUnit", "channel_shuffle",
           "DenseBlock", "profile", "Profile"]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    return layers + ([nn.ReLU6()] if act else [])


class InvertedResidual(nn.Module):
    """MobileNetV2's block: ``x (+) project(dw(expand(x)))``; see the module docstring."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int,
                 fused: bool = False) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(*_conv_bn(cin, hidden, 1)) if expand_ratio != 1 else None
        self.fused = fused
        if fused:
            self.dwpw = FusedDWSepConv2d(hidden, cout, 3, stride, 1, "relu6", "none")
        else:
            self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
            self.act = nn.ReLU6()
            self.pw = nn.Conv2d(hidden, cout, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        if self.fused:
            return self.dwpw(h, x if self.use_res else None)
        y = self.bn2(self.pw(self.act(self.bn1(self.dw(h)))))
        return x + y if self.use_res else y

    def fuse(self) -> InvertedResidual:
        """A fused copy (call on an eval-mode block: BatchNorm is folded with its running
        statistics; the shortcut is added by the kernel)."""
        if self.fused:
            return copy.deepcopy(self)
        new = copy.deepcopy(self)
        new.dwpw = FusedDWSepConv2d.from_modules(self.dw, self.pw, self.bn1, self.act, self.bn2)
        for name in ("dw", "bn1", "act", "pw", "bn2"):
            delattr(new, name)
        new.fused = True
        return new


# (expansion t, channels c, repeats n, first stride s): MobileNetV2, Table 2
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
         (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, fused: bool = False,
                 stages: int = 7) -> nn.Sequential:
    """MobileNetV2 (random weights; no downloads): stem 3x3/2, the inverted-residual stages of
    Table 2 (the first ``stages`` of them), 1x1 to 1280 (x width), pool, classifier."""
    def ch(c: int) -> int:  # the paper's code: multiples of 8, never 10% below c * width
        v = c * width
        new = max(8, int(v + 4) // 8 * 8)
        return new + 8 if new < 0.9 * v else new

    layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, ch(32), 3, 2))]
    cin = ch(32)
    for t, c, n, s in _MBV2[:stages]:
        for i in range(n):
            layers.append(InvertedResidual(cin, ch(c), s if i == 0 else 1, t, fused))
            cin = ch(c)
    last = max(1280, ch(1280)) if width > 1.0 else 1280
    layers += [nn.Sequential(*_conv_bn(cin, last, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


class Fire(nn.Module):
    """SqueezeNet's Fire module: ``cat(relu(e1(s)), relu(e3(s)))``, ``s = relu(squeeze(x))``."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: channel ``a * groups + b`` of the result is channel
    ``b * (C / groups) + a`` of ``x``."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: ``relu(x + branch(x))`` (stride 1) or
    ``relu(cat(avgpool3x3/2(x), branch(x)))`` (stride 2), with ``branch`` = grouped 1x1 + BN +
    ReLU, shuffle, 3x3 depthwise (stride) + BN, grouped 1x1 + BN."""

    def __init__(self, cin: int, cout: int, groups: int, stride: int = 1) -> None:
        super().__init__()
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 unit adds its input: cin must equal cout")
        branch_out = cout - cin if stride == 2 else cout
        mid = cout // 4
        if mid % groups or cin % groups or branch_out % groups:
            raise ValueError(f"channels must be divisible by groups={groups}")
        self.groups, self.stride = groups, stride
        self.gconv1 = nn.Conv2d(cin, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.gconv2 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.folded: FusedDWSepConv2d | None = None

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.gconv1(x)))
        if self.folded is not None:
            return self.folded(h)
        h = self.bn2(self.dw(channel_shuffle(h, self.groups)))
        return self.bn3(self.gconv2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.stride == 1:
            return F.relu(x + y)
        return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), y], 1))

    def fold_shuffle(self) -> ShuffleUnit:
        """A copy whose shuffle -> dw -> BN -> grouped 1x1 -> BN runs as one fused unit with no
        shuffle: depthwise channels and BatchNorm are per-channel, so the permutation moves
        past them (``dw'[perm[p]] = dw[p]``) and into the columns of the 1x1 weight, which the
        fused kernel reads as a dense ``[Cout, C]`` matrix anyway (eval-mode statistics)."""
        new = copy.deepcopy(self)
        mid, g = self.dw.in_channels, self.groups
        p = torch.arange(mid)
        perm = (p % g) * (mid // g) + p // g  # shuffled channel p holds channel perm[p]
        dw_w, dw_b = fold_bn(self.dw.weight[:, 0], None, self.bn2)
        blocks = self.gconv2.weight[:, :, 0, 0].reshape(g, -1, mid // g)
        dense = torch.block_diag(*blocks)  # [Cout, mid]: the grouped conv as a dense one
        pw_w, pw_b = fold_bn(dense, None, self.bn3)
        dw_new, dwb_new, pw_new = (torch.empty_like(dw_w), torch.empty_like(dw_b),
                                   torch.empty_like(pw_w))
        dw_new[perm], dwb_new[perm], pw_new[:, perm] = dw_w, dw_b, pw_w
        fused = FusedDWSepConv2d(mid, pw_w.shape[0], 3, self.stride, 1, "none", "none",
                                 device=self.dw.weight.device, dtype=self.dw.weight.dtype)
        with torch.no_grad():
            fused.dw_weight.copy_(dw_new)
            fused.dw_bias.copy_(dwb_new)
            fused.pw_weight.copy_(pw_new)
            fused.pw_bias.copy_(pw_b)
        new.folded = fused
        for name in ("dw", "bn2", "gconv2", "bn3"):
            setattr(new, name, nn.Identity())
        return new


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bottleneck * growth, 1,
                                                                 bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(h)))], 1)


class DenseBlock(nn.Sequential):
    """DenseNet-BC dense block: ``num_layers`` layers, each adding ``growth`` channels."""

    def __init__(self, num_layers: int, cin: int, growth: int) -> None:
        super().__init__(*(_DenseLayer(cin + i * growth, growth) for i in range(num_layers)))
        self.out_channels = cin + num_layers * growth


@dataclass(frozen=True)
class ProfileRow:
    name: str
    kind: str
    params: int
    flops: int


class Profile(list):
    """Rows of :func:`profile`; ``str()`` is a table with totals."""

    @property
    def params(self) -> int:
        return sum(r.params for r in self)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self)

    def __str__(self) -> str:
        rows = [(r.name, r.kind, str(r.params), f"{r.flops / 1e6:.2f}") for r in self]
        rows.append(("TOTAL", "", str(self.params), f"{self.flops / 1e6:.2f}"))
        return format_table(("module", "kind", "params", "MFLOPs"), rows)


@torch.no_grad()
def profile(model: nn.Module, x: torch.Tensor) -> Profile:
    """Parameters and FLOPs (2 x multiply-adds) of every conv, linear and fused unit of
    ``model`` for the input ``x`` (one forward pass; BatchNorm and activations not counted)."""
    rows: dict[str, ProfileRow] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, FusedDWSepConv2d)):
            def hook(mod, args, out, name=name):
                params = sum(p.numel() for p in mod.parameters(recurse=False))
                if isinstance(mod, FusedDWSepConv2d):
                    flops = mod.flops(args[0].shape[2], args[0].shape[3], args[0].shape[0])
                elif isinstance(mod, nn.Conv2d):
                    kh, kw = mod.kernel_size
                    flops = 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
                else:
                    flops = 2 * out.numel() * mod.in_features
                old = rows.get(name)  # a module called several times: sum its FLOPs
                rows[name] = ProfileRow(name, type(mod).__name__, params,
                                        flops + (old.flops if old else 0))
            hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return Profile(rows.values())
