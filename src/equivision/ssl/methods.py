"""Base SSL methods (MoCo-v3, DINO, Barlow Twins), each usable with or without SER.

``Method(encoder, ser=SERConfig(...), **method_kwargs)``; ``forward(batch)`` returns
``{"loss", "loss_ssl", "loss_equiv"}``.  The base loss uses both views of the whole
batch (T and T_eq images together); the equivariance term uses only the T_eq part
(``batch.eq_index``) and is weighted by ``SERConfig.weight`` (lambda).  With
``weight = 0`` (the control) the term is still computed and reported, but adds
nothing.

Multi-crop (``batch.local_views``, small views of every image) feeds only the base loss:

* DINO, as in its paper: the student sees every view, the teacher the two global ones;
  each student view is scored against each teacher view but its own.
* MoCo-v3 (our choice; the MoCo-v3 paper has no multi-crop): the momentum encoder, like
  DINO's teacher, encodes only the two global views; every view's query is scored
  against the key of each global view but its own. The loss is twice the mean over
  these pairs, so with no local views it is MoCo-v3's symmetric loss unchanged.
* Barlow Twins (our choice, as DINO pairs views): the cross-correlation loss of the two
  global views and of each local view with each global view, averaged over these
  pairs, so with no local views it is the two-view loss unchanged.

The SER term always uses the two global views of the T_eq images.

Every method records its constructor keyword arguments (SER excluded) in
``method.method_kwargs``, which :func:`~equivision.ssl.pretrain.pretrain` stores so that
:func:`~equivision.ssl.pretrain.load_method` rebuilds the same method.  Call
:meth:`SSLMethod.on_step_end` after every optimiser step: it moves the
momentum / EMA teachers and DINO's teacher temperature.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .losses import (
    AugSelfHead,
    DINOLoss,
    EquiModHead,
    PatchNTXent,
    barlow_twins_loss,
    infonce,
    mlp,
)
from .views import ViewBatch, act_on_canvas
from .vit import SSLViT, ViTOutput

__all__ = ["DINO", "SSL_METHODS", "BarlowTwins", "MoCoV3", "SERConfig", "SSLMethod",
           "build_method", "cosine_momentum", "encode_sized", "encode_view"]


@dataclass
class SERConfig:
    """Soft equivariance regularization settings.

    Attributes:
        weight: lambda (0 = control: computed and reported, not trained on).
        layer: ``None`` = the encoder's ``cls_layer`` (token map after ``norm_l``); an
            int ``1..depth`` = the raw patch-token map after that block; ``"all"`` = the
            mean of the loss over every block's patch-token map (one projector each).
        tau: NT-Xent temperature (paper: 0.3 MoCo-v3 / Barlow Twins, 0.5 DINO).
        proj_dim, hidden: projector output and hidden width.
        variant: ``"ser"`` (patch-wise NT-Xent), ``"augself"`` or ``"equimod"`` (those
            objectives on the mean-pooled map at the chosen layer).
    """

    weight: float = 0.5
    layer: int | Literal["all"] | None = None
    tau: float = 0.3
    proj_dim: int = 512
    hidden: int = 1024
    variant: Literal["ser", "augself", "equimod"] = "ser"

    #: the fraction r of each batch given equivariant views with a SER config, the
    #: lambda = 0 control included (paper); without one (``None``, the plain method)
    #: the default is 0 (every image gets the base policy T)
    RATIO: ClassVar[float] = 0.25

    @classmethod
    def paper(cls, method: str, **overrides: object) -> SERConfig:
        """The paper's settings: lambda 0.5; tau 0.5 for DINO, 0.3 for MoCo-v3 and
        Barlow Twins (the released code's defaults differ). Overrides that are None keep
        the default."""
        tau = 0.5 if method.lower() == "dino" else 0.3
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{"weight": 0.5, "tau": tau, **given})  # type: ignore[arg-type]

    @classmethod
    def control(cls, method: str, **overrides: object) -> SERConfig:
        """The lambda = 0 control: :meth:`paper` settings with ``weight = 0``. With the
        same ratio r as SER (:meth:`default_ratio` gives :attr:`RATIO` for it) the
        control and SER runs see the same views and differ only in the SER term, so
        this, not ``None`` (no T_eq at all, r = 0), is the baseline that isolates SER."""
        return cls.paper(method, **{**overrides, "weight": 0.0})

    @classmethod
    def arms(cls, method: str, **overrides: object) -> dict[str, SERConfig | None]:
        """The three arms of a SER comparison, by name: ``"baseline"`` (the lambda = 0
        control, :meth:`control`), ``"ser"`` (:meth:`paper`) and ``"plain"`` (``None``:
        the base method without T_eq)."""
        return {"baseline": cls.control(method, **overrides),
                "ser": cls.paper(method, **overrides), "plain": None}

    @staticmethod
    def default_ratio(ser: SERConfig | None) -> float:
        """The partition ratio r to use with ``ser`` when none is given: :attr:`RATIO`
        with SER, 0 without."""
        return SERConfig.RATIO if ser is not None else 0.0


def encode_sized(backbone: nn.Module, images: list[Tensor],
                 all_tokens: bool = False) -> list[ViTOutput]:
    """Encode images of different sizes ``(C, H_i, W_i)``, one forward pass per size;
    one :class:`ViTOutput` (batch 1) per image, in order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    out: list[ViTOutput | None] = [None] * len(images)
    for idx in groups.values():
        o = backbone(torch.stack([images[i] for i in idx]), all_tokens=all_tokens)
        for j, i in enumerate(idx):
            maps = None if o.token_maps is None else [t[j : j + 1] for t in o.token_maps]
            out[i] = ViTOutput(o.cls[j : j + 1], o.tokens[j : j + 1], [], maps)
    return out  # type: ignore[return-value]


def encode_view(backbone: nn.Module, batch: ViewBatch, v: int,
                all_tokens: bool = False) -> ViTOutput:
    """``backbone`` on view ``v`` of ``batch``: ``cls (B, D)`` in batch order; with
    resized canvases (``batch.eq_views``) the equivariant images' outputs are also in
    ``parts`` and ``tokens`` / ``token_maps`` cover the base images only."""
    if batch.eq_views is None:
        return backbone(batch.views[v], all_tokens=all_tokens)
    parts = encode_sized(backbone, batch.eq_views[v], all_tokens)
    cls = [p.cls for p in parts]
    base = batch.views[v]
    rest = backbone(base, all_tokens=all_tokens) if base.shape[0] else None
    if rest is not None:
        cls.append(rest.cls)
    return ViTOutput(torch.cat(cls), base if rest is None else rest.tokens, [],
                     None if rest is None else rest.token_maps, parts)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """``1 - (1 - base)(cos(pi·step/total) + 1)/2``: from ``base`` to 1 over training."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, m: float) -> None:
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(m).add_(ps.detach(), alpha=1 - m)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


def _frozen_copy(module: nn.Module) -> nn.Module:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class SSLMethod(nn.Module):
    """Base class: owns the student ``backbone`` and the SER head(s).

    Attributes:
        method_kwargs: the subclass's constructor keyword arguments (all of them, defaults
            included; plain values), so ``build_method(name, encoder, ser, **method_kwargs)``
            rebuilds the same method.
    """

    def __init__(self, encoder: SSLViT, ser: SERConfig | None = None) -> None:
        super().__init__()
        self.method_kwargs: dict[str, object] = {}
        if not isinstance(encoder, SSLViT):
            raise TypeError(f"encoder must be an SSLViT, got {type(encoder).__name__}")
        self.backbone = encoder
        self.ser = ser
        self.ser_heads = nn.ModuleList()
        if ser is None:
            return
        layer = ser.layer
        if layer is not None and layer != "all" and not (
                isinstance(layer, int) and 1 <= layer <= encoder.depth):
            raise ValueError(f"SERConfig.layer must be None, 'all' or 1..{encoder.depth}, "
                             f"got {layer!r}")
        n_heads = encoder.depth if layer == "all" else 1
        for _ in range(n_heads):
            if ser.variant == "ser":
                head: nn.Module = PatchNTXent(encoder.dim, ser.proj_dim, ser.hidden, ser.tau)
            elif ser.variant == "augself":
                head = AugSelfHead(encoder.dim, ser.hidden)
            elif ser.variant == "equimod":
                head = EquiModHead(encoder.dim, ser.proj_dim, ser.hidden, ser.tau)
            else:
                raise ValueError(f"unknown SER variant {ser.variant!r}; choose 'ser', "
                                 "'augself' or 'equimod'")
            self.ser_heads.append(head)

    @property
    def _all_tokens(self) -> bool:
        return self.ser is not None and self.ser.layer is not None

    def encode(self, batch: ViewBatch) -> list[ViTOutput]:
        """Student outputs for both views (one forward pass over the concatenation)."""
        if len(batch.views) != 2:
            raise ValueError(f"expected 2 views, got {len(batch.views)}")
        if batch.eq_views is not None:
            return [encode_view(self.backbone, batch, v, self._all_tokens) for v in range(2)]
        b = batch.views[0].shape[0]
        out = self.backbone(torch.cat(batch.views), all_tokens=self._all_tokens)
        maps = out.token_maps
        return [ViTOutput(out.cls[i * b:(i + 1) * b], out.tokens[i * b:(i + 1) * b], [],
                          None if maps is None else [t[i * b:(i + 1) * b] for t in maps])
                for i in range(2)]

    def encode_locals(self, batch: ViewBatch) -> list[Tensor]:
        """The student's final [CLS] ``(B, D)`` of every local view of ``batch`` (one
        forward pass over all of them; ``[]`` without multi-crop)."""
        if not batch.local_views:
            return []
        cls = self.backbone(torch.cat(batch.local_views)).cls
        return list(cls.split(batch.local_views[0].shape[0]))

    def equivariance_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        """The SER (or AugSelf / EquiMod) term on the T_eq part; 0 without one."""
        zero = outs[0].cls.new_zeros(())
        if self.ser is None or batch.eq_index.numel() == 0:
            return zero
        if batch.eq_views is not None:
            return self._canvas_equivariance_loss(outs, batch)
        idx = batch.eq_index
        layer = self.ser.layer
        if layer is None:
            pairs = [(outs[0].tokens[idx], outs[1].tokens[idx])]
        elif layer == "all":
            pairs = [(a[idx], b[idx]) for a, b in zip(outs[0].token_maps, outs[1].token_maps)]
        else:
            pairs = [(outs[0].token_maps[layer - 1][idx], outs[1].token_maps[layer - 1][idx])]
        losses = []
        for head, (t1, t2) in zip(self.ser_heads, pairs):
            if isinstance(head, AugSelfHead):
                losses.append(head(t1, t2, batch.g1, batch.g2))
            elif isinstance(head, PatchNTXent):
                valid = batch.valid_masks(tuple(t1.shape[-2:]), t1.device)
                losses.append(head(t1, t2, batch.relative, valid))
            else:
                losses.append(head(t1, t2, batch.relative))
        return torch.stack(losses).mean()

    def _layer_maps(self, out: ViTOutput) -> list[Tensor]:
        """The token maps ``(1, D, h, w)`` of one image the SER heads read, one per head."""
        layer = self.ser.layer if self.ser is not None else None
        if layer is None:
            return [out.tokens]
        if layer == "all":
            return list(out.token_maps or [])
        return [(out.token_maps or [])[layer - 1]]

    def _canvas_equivariance_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        """The equivariance term when the two views have canvases of different sizes:
        view 1's map of each image is moved onto view 2's by :func:`act_on_canvas`
        (every position is image content), then the heads see the positions of all
        images flattened (SER) or the mean-pooled maps (AugSelf / EquiMod)."""
        parts1, parts2 = outs[0].parts or [], outs[1].parts or []
        per1 = [self._layer_maps(o) for o in parts1]
        per2 = [self._layer_maps(o) for o in parts2]
        losses = []
        for h, head in enumerate(self.ser_heads):
            t2 = [p[h] for p in per2]
            z = [act_on_canvas(a, b, p[h], tuple(t.shape[-2:]))
                 for a, b, p, t in zip(batch.g1, batch.g2, per1, t2)]
            if isinstance(head, PatchNTXent):
                flat1 = torch.cat([x.flatten(2)[0].T for x in z])  # (T, D)
                flat2 = torch.cat([x.flatten(2)[0].T for x in t2])
                image = torch.cat([torch.full((x[0, 0].numel(),), i, device=flat1.device)
                                   for i, x in enumerate(t2)])
                valid = torch.ones(flat1.shape[0], dtype=torch.bool, device=flat1.device)
                losses.append(head.forward_flat(flat1, flat2, image, valid, len(t2)))
                continue
            pooled1 = torch.cat([p[h].mean((2, 3), keepdim=True) for p in per1])
            pooled2 = torch.cat([x.mean((2, 3), keepdim=True) for x in t2])  # (M, D, 1, 1)
            if isinstance(head, AugSelfHead):
                losses.append(head(pooled1, pooled2, batch.g1, batch.g2))
            else:
                losses.append(head(pooled1, pooled2, batch.relative))
        return torch.stack(losses).mean()

    def ssl_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        """The base (invariance) loss; implemented by subclasses."""
        raise NotImplementedError

    def forward(self, batch: ViewBatch) -> dict[str, Tensor]:
        """``{"loss": total, "loss_ssl": base, "loss_equiv": equivariance term}``."""
        outs = self.encode(batch)
        loss_ssl = self.ssl_loss(outs, batch)
        loss_equiv = self.equivariance_loss(outs, batch)
        weight = self.ser.weight if self.ser is not None else 0.0
        return {"loss": loss_ssl + weight * loss_equiv, "loss_ssl": loss_ssl,
                "loss_equiv": loss_equiv}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Update teachers / schedules after optimiser step ``step`` (0-based)."""


class MoCoV3(SSLMethod):
    """MoCo-v3: projector + predictor on the student, momentum encoder + projector as
    the key encoder (momentum ``momentum`` raised to 1 by a cosine schedule),
    symmetric InfoNCE with temperature ``tau`` (0.2)."""

    def __init__(self, encoder: SSLViT, ser: SERConfig | None = None, proj_dim: int = 256,
                 hidden: int = 1024, tau: float = 0.2, momentum: float = 0.99) -> None:
        super().__init__(encoder, ser)
        self.method_kwargs = {"proj_dim": proj_dim, "hidden": hidden, "tau": tau,
                              "momentum": momentum}
        self.tau, self.base_momentum, self.momentum = tau, momentum, momentum
        self.projector = mlp(encoder.dim, hidden, proj_dim, layers=3, bn=True, last_bn=True,
                             act=nn.ReLU)
        self.predictor = mlp(proj_dim, hidden, proj_dim, layers=2, bn=True, last_bn=True,
                             act=nn.ReLU)
        self.momentum_backbone = _frozen_copy(encoder)
        self.momentum_projector = _frozen_copy(self.projector)

    def ssl_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        cls = [o.cls for o in outs] + self.encode_locals(batch)
        q = [self.predictor(self.projector(c)) for c in cls]
        with torch.no_grad():
            k = [self.momentum_projector(encode_view(self.momentum_backbone, batch, v).cls)
                 for v in range(2)]
        pairs = [infonce(qv, kg, self.tau) for v, qv in enumerate(q)
                 for g, kg in enumerate(k) if v != g]
        return torch.stack(pairs).sum() * (2 / len(pairs))  # exact sum for 2 views

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, total_steps)
        _ema(self.momentum_backbone, self.backbone, self.momentum)
        _ema(self.momentum_projector, self.projector, self.momentum)


class _DINOHead(nn.Module):
    """3-layer GELU MLP -> bottleneck -> L2 norm -> weight-normalised linear (norm 1)."""

    def __init__(self, dim: int, out_dim: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.mlp = mlp(dim, hidden, bottleneck, layers=3)
        self.last = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, D)`` -> logits ``(B, out_dim)``."""
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.last, dim=-1))


class DINO(SSLMethod):
    """DINO: student and EMA teacher (backbone + head), centring and sharpening of the
    teacher, teacher temperature warm-up 0.04 -> 0.07, student temperature 0.1, EMA
    momentum raised from ``momentum`` to 1 by a cosine schedule."""

    def __init__(self, encoder: SSLViT, ser: SERConfig | None = None, out_dim: int = 1024,
                 hidden: int = 512, bottleneck: int = 128, momentum: float = 0.996,
                 student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, warmup_frac: float = 0.3,
                 center_momentum: float = 0.9) -> None:
        super().__init__(encoder, ser)
        self.method_kwargs = {"out_dim": out_dim, "hidden": hidden, "bottleneck": bottleneck,
                              "momentum": momentum, "student_temp": student_temp,
                              "teacher_temp": teacher_temp,
                              "warmup_teacher_temp": warmup_teacher_temp,
                              "warmup_frac": warmup_frac, "center_momentum": center_momentum}
        self.base_momentum, self.momentum = momentum, momentum
        self.head = _DINOHead(encoder.dim, out_dim, hidden, bottleneck)
        self.teacher_backbone = _frozen_copy(encoder)
        self.teacher_head = _frozen_copy(self.head)
        self.criterion = DINOLoss(out_dim, student_temp, teacher_temp, warmup_teacher_temp,
                                  warmup_frac, center_momentum)

    def ssl_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        student = [self.head(c) for c in [o.cls for o in outs] + self.encode_locals(batch)]
        with torch.no_grad():
            teacher = [self.teacher_head(encode_view(self.teacher_backbone, batch, v).cls)
                       for v in range(2)]
        return self.criterion(student, teacher)

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.momentum = cosine_momentum(self.base_momentum, step, total_steps)
        _ema(self.teacher_backbone, self.backbone, self.momentum)
        _ema(self.teacher_head, self.head, self.momentum)
        self.criterion.set_progress(step + 1, total_steps)

    @torch.no_grad()
    def collapse_stats(self, images: Tensor) -> dict[str, float]:
        """The teacher's :meth:`DINOLoss.collapse_stats` on ``images (B, C, H, W)``
        (unaugmented; a fixed held-out batch makes a collapse monitor)."""
        return self.criterion.collapse_stats(self.teacher_head(self.teacher_backbone(images).cls))


class BarlowTwins(SSLMethod):
    """Barlow Twins: 3-layer BN-ReLU projector, loss with off-diagonal weight ``lambd``."""

    def __init__(self, encoder: SSLViT, ser: SERConfig | None = None, proj_dim: int = 512,
                 hidden: int = 512, lambd: float = 0.0051) -> None:
        super().__init__(encoder, ser)
        self.method_kwargs = {"proj_dim": proj_dim, "hidden": hidden, "lambd": lambd}
        self.lambd = lambd
        self.projector = mlp(encoder.dim, hidden, proj_dim, layers=3, bn=True, act=nn.ReLU)

    def ssl_loss(self, outs: list[ViTOutput], batch: ViewBatch) -> Tensor:
        z = [self.projector(c) for c in [o.cls for o in outs] + self.encode_locals(batch)]
        pairs = [(0, 1)] + [(g, v) for v in range(2, len(z)) for g in range(2)]
        return torch.stack([barlow_twins_loss(z[a], z[b], self.lambd)
                            for a, b in pairs]).mean()


def _method_key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


#: the SSL methods :func:`build_method` knows, by name (``"moco-v3"`` finds ``mocov3``)
SSL_METHODS: Registry[type[SSLMethod]] = Registry("SSL method", _method_key)
SSL_METHODS.add("mocov3", MoCoV3)
SSL_METHODS.add("dino", DINO)
SSL_METHODS.add("barlow", BarlowTwins)



def build_method(name: str, encoder: SSLViT, ser: SERConfig | None = None,
                 **kwargs: object) -> SSLMethod:
    """``"mocov3" | "dino" | "barlow"`` -> the method around ``encoder``.

    Raises:
        ValueError: unknown ``name`` (with suggestions and the valid names).
    """
    return SSL_METHODS.get(name)(encoder, ser, **kwargs)  # type: ignore[arg-type]
