"""SegNet and SegNet-MTAN for the dense-prediction benchmarks (NYUv2, Cityscapes).

Architecture of Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention"
(MTAN, CVPR'19), as used by the Nash-MTL / FAMO family (docs/benchmarks.md#nyuv2; written from the
papers' description of the architecture, not copied). With ``filters = (f₀, …, f₄) = (64, 128, 256,
512, 512)``:

* Shared SegNet: 5 encoder stages (conv f_{k−1}→f_k, 1–2 more convs, 2×2 max-pool with
  indices) and 5 mirrored decoder stages (unpool with the stage's indices, conv, 1–2 convs).
  Every conv is Conv3×3 → BatchNorm → ReLU.
* MTAN (``SegNetMTAN``): per task t a soft-attention branch. Encoder level j:
  a_j = σ-mask(concat(first conv output of stage j, previous attention feature)) ⊙
  (last conv output of stage j), then a shared conv and a 2×2 max-pool. Decoder level j:
  bilinear ×2 upsampling (align_corners) of the previous attention feature, a shared conv,
  mask(concat(unpooled decoder input, that)) ⊙ (last conv output of decoder stage j).
  Masks are Conv1×1→BN→ReLU→Conv1×1→BN→Sigmoid and belong to one task.
* Heads ``pred_tasks[t]`` = Conv3×3(f₀→f₀) → Conv1×1(f₀→C_t) on the task's 64-channel
  feature; "seg" outputs log-softmax over classes, "normal" divides by the per-pixel L2
  norm, "depth" is raw.

Parameter counts (checked by the tests): NYUv2 MTAN 44,229,073 (heads 111,889), NYUv2 SegNet
25,055,185, Cityscapes MTAN 41,206,984 (heads 74,376) — identical to the official models.

Shared / task-specific split (docs/methods.md#what-counts-as-shared), :func:`split_parameters`:

* ``"famo"`` (default; Nash-MTL, FAMO, FairGrad, MTLlib): everything whose name does not start
  with ``pred_`` is shared — this *includes* the task-specific attention masks, so a task's
  gradient has exact zeros on the other tasks' masks. Needed to reproduce the published tables.
* ``"cagrad"`` (original CAGrad repo): the attention masks of task t are task t's own
  parameters (they then get the head-style gradient the balancer gives heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_tune.benchmarks._dense_files import FILTERS  # declared with the file layouts (no torch there)
HEAD_KINDS = ("seg", "depth", "normal")
SPLITS = ("famo", "cagrad")


def conv_layer(cin: int, cout: int) -> nn.Sequential:
    """Conv3×3 (pad 1) → BatchNorm2d → ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def att_layer(cin: int, cmid: int, cout: int) -> nn.Sequential:
    """MTAN attention mask: Conv1×1 → BN → ReLU → Conv1×1 → BN → Sigmoid (values in (0, 1))."""
    return nn.Sequential(nn.Conv2d(cin, cmid, 1), nn.BatchNorm2d(cmid), nn.ReLU(inplace=True),
                         nn.Conv2d(cmid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid())


def pred_layer(cin: int, cout: int) -> nn.Sequential:
    """Task head: Conv3×3(cin→cin) → Conv1×1(cin→cout), no normalisation or activation."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 1))


def head_output(kind: str, raw: Tensor) -> Tensor:
    """Turn a head's raw output into the prediction the losses expect.

    seg: log pᵢ = log softmax over channels (the NLL loss takes log-probabilities);
    normal: n̂ = n / ‖n‖₂ per pixel (unit normals, so the loss is 1 − cos); depth: unchanged.
    """
    if kind == "seg":
        return F.log_softmax(raw, dim=1)
    if kind == "normal":
        # no epsilon, as in the official model: an exactly-zero output is a real divergence
        return raw / torch.norm(raw, p=2, dim=1, keepdim=True)
    return raw


def init_weights(model: nn.Module) -> None:
    """Xavier-normal conv/linear weights, zero biases, BN γ = 1, β = 0 (official init)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_filters(filters: Sequence[int]) -> tuple[int, ...]:
    f = tuple(int(c) for c in filters)
    if len(f) != 5 or min(f) < 1:
        raise ValueError(f"filters must be 5 positive channel counts, got {filters!r}")
    # the deepest decoder level of the official model only type-checks when f₃ = f₄
    if f[3] != f[4]:
        raise ValueError(f"filters[3] must equal filters[4] (SegNet's last two stages), got {filters!r}")
    return f


def _check_heads(heads: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    out = [(str(k), int(c)) for k, c in heads]
    for kind, channels in out:
        if kind not in HEAD_KINDS or channels < 1:
            raise ValueError(f"heads must be (kind in {HEAD_KINDS}, channels ≥ 1) pairs, got {heads!r}")
    return out


class SegNetTrunk(nn.Module):
    """The shared SegNet encoder–decoder (no heads). ``forward`` returns every intermediate
    the MTAN branches read: per encoder stage (first conv, last conv), the pooling indices,
    and per decoder stage (unpooled input, last conv)."""

    def __init__(self, filters: Sequence[int] = FILTERS) -> None:
        super().__init__()
        f = _check_filters(filters)
        self.encoder_block = nn.ModuleList([conv_layer(3, f[0])] + [conv_layer(f[k - 1], f[k]) for k in range(1, 5)])
        # decoder_block[k] maps stage k's channels back to stage k−1's (k = 0: f₀ → f₀)
        self.decoder_block = nn.ModuleList([conv_layer(f[0], f[0])] + [conv_layer(f[k], f[k - 1]) for k in range(1, 5)])
        self.conv_block_enc = nn.ModuleList(
            [conv_layer(f[0], f[0]), conv_layer(f[1], f[1])]
            + [nn.Sequential(conv_layer(f[k], f[k]), conv_layer(f[k], f[k])) for k in range(2, 5)])
        self.conv_block_dec = nn.ModuleList(
            [conv_layer(f[0], f[0]), conv_layer(f[0], f[0])]
            + [nn.Sequential(conv_layer(f[k - 1], f[k - 1]), conv_layer(f[k - 1], f[k - 1])) for k in range(2, 5)])
        self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"SegNet needs H and W divisible by 32 (5 poolings), got {tuple(x.shape[-2:])}")
        enc: list[tuple[Tensor, Tensor]] = []
        indices: list[Tensor] = []
        h = x
        for k in range(5):
            first = self.encoder_block[k](h)
            last = self.conv_block_enc[k](first)
            h, idx = self.down_sampling(last)
            enc.append((first, last))
            indices.append(idx)
        dec: list[tuple[Tensor, Tensor]] = []
        for j in range(5):  # decoder stage j mirrors encoder stage k = 4 − j
            k = 4 - j
            up = self.up_sampling(h, indices[k])
            h = self.conv_block_dec[k](self.decoder_block[k](up))
            dec.append((up, h))
        return enc, dec


class SegNet(nn.Module):
    """Hard parameter sharing: the SegNet trunk and one head per task on its last feature.

    ``forward(x)`` returns ``(predictions, representation)`` with the shared f₀×H×W feature
    as representation (what representation-level balancers differentiate through).
    """

    def __init__(self, heads: Sequence[tuple[str, int]], filters: Sequence[int] = FILTERS) -> None:
        super().__init__()
        self.heads = _check_heads(heads)
        self.filters = _check_filters(filters)
        self.segnet = SegNetTrunk(self.filters)
        self.pred_tasks = nn.ModuleList([pred_layer(self.filters[0], c) for _, c in self.heads])
        init_weights(self)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        _, dec = self.segnet(x)
        feature = dec[-1][1]
        preds = [head_output(kind, head(feature)) for (kind, _), head in zip(self.heads, self.pred_tasks)]
        return preds, feature


class SegNetMTAN(nn.Module):
    """SegNet-MTAN: the shared trunk plus one attention branch and one head per task.

    ``forward(x)`` returns ``(predictions, representations)`` where ``representations[t]``
    is task t's final attention feature (f₀×H×W), the input of ``pred_tasks[t]``.
    """

    def __init__(self, heads: Sequence[tuple[str, int]], filters: Sequence[int] = FILTERS) -> None:
        super().__init__()
        self.heads = _check_heads(heads)
        f = self.filters = _check_filters(filters)
        n = len(self.heads)
        self.segnet = SegNetTrunk(f)
        # encoder level k reads concat(first conv of stage k, previous attention feature): 2 f_k
        self.encoder_att = nn.ModuleList([
            nn.ModuleList([att_layer(f[0], f[0], f[0])] + [att_layer(2 * f[k], f[k], f[k]) for k in range(1, 5)])
            for _ in range(n)])
        # decoder level for stage k reads concat(unpooled input f_k, shared conv output f_{k−1})
        self.decoder_att = nn.ModuleList([
            nn.ModuleList([att_layer(2 * f[0], f[0], f[0])]
                          + [att_layer(f[k] + f[k - 1], f[k - 1], f[k - 1]) for k in range(1, 5)])
            for _ in range(n)])
        # shared attention convs (f₃ = f₄, so the deepest ones keep the width)
        self.encoder_block_att = nn.ModuleList([conv_layer(f[k], f[min(k + 1, 4)]) for k in range(5)])
        self.decoder_block_att = nn.ModuleList([conv_layer(f[0], f[0])]
                                               + [conv_layer(f[k], f[k - 1]) for k in range(1, 5)])
        self.pred_tasks = nn.ModuleList([pred_layer(f[0], c) for _, c in self.heads])
        init_weights(self)

    def _branch(self, t: int, enc: list[tuple[Tensor, Tensor]], dec: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Task t's attention path through encoder and decoder; returns its f₀×H×W feature."""
        a: Tensor | None = None
        for k in range(5):
            first, last = enc[k]
            mask = self.encoder_att[t][k](first if a is None else torch.cat((first, a), dim=1))
            a = F.max_pool2d(self.encoder_block_att[k](mask * last), kernel_size=2, stride=2)
        for j in range(5):
            k = 4 - j
            up, last = dec[j]
            a = F.interpolate(a, scale_factor=2, mode="bilinear", align_corners=True)
            a = self.decoder_block_att[k](a)
            mask = self.decoder_att[t][k](torch.cat((up, a), dim=1))
            a = mask * last
        return a

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        enc, dec = self.segnet(x)
        reps = [self._branch(t, enc, dec) for t in range(len(self.heads))]
        preds = [head_output(kind, head(rep)) for (kind, _), head, rep in zip(self.heads, self.pred_tasks, reps)]
        return preds, reps


def build_model(name: str, heads: Sequence[tuple[str, int]], filters: Sequence[int] = FILTERS) -> nn.Module:
    """``"mtan"`` → :class:`SegNetMTAN`, ``"segnet"`` → :class:`SegNet`."""
    if name == "mtan":
        return SegNetMTAN(heads, filters)
    if name == "segnet":
        return SegNet(heads, filters)
    raise ValueError(f"unknown model {name!r}; valid: 'mtan', 'segnet'")


def split_parameters(model: nn.Module, scheme: str = "famo") -> tuple[list[Tensor], list[list[Tensor]]]:
    """(shared parameters, one list of task-specific parameters per task); see the module doc.

    ``scheme="famo"``: task t owns ``pred_tasks.t.*`` only. ``scheme="cagrad"``: task t also
    owns ``encoder_att.t.*`` and ``decoder_att.t.*`` (identical to "famo" for plain SegNet).
    Every parameter lands in exactly one list.
    """
    if scheme not in SPLITS:
        raise ValueError(f"unknown parameter split {scheme!r}; valid: {', '.join(SPLITS)}")
    owned = ("pred_tasks",) + (("encoder_att", "decoder_att") if scheme == "cagrad" else ())
    n_tasks = len(model.heads)
    shared: list[Tensor] = []
    tasks: list[list[Tensor]] = [[] for _ in range(n_tasks)]
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] in owned:
            tasks[int(parts[1])].append(p)
        else:
            shared.append(p)
    return shared, tasks
