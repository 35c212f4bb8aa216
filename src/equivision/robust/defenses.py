"""Inference-time defenses (purifiers) of the equivariance-defense paper.

Every defense wraps a frozen model (classifier ``(B, C, H, W) -> (B, K)`` or segmenter
``-> (B, K, H, W)``, images in [0, 1]) and purifies its input before predicting:
``forward(x) = predict(x) = model(purify(x))`` with ``purify(x) = x + r`` in [0, 1],
``||r||_inf <= eps_v``.

* :class:`EquivarianceDefense` (Algorithm 1): ``r`` maximizes the agreement of
  ``g^-1 F(g (x + r))`` with ``F(x + r)`` over fixed transformations ``g``.
* :class:`InvarianceDefense`: the same, on globally pooled features (no undoing).
* :class:`RandomNoiseDefense`: ``r`` is random noise.
* :class:`~equivision.robust.heads.RotationDefense` and
  :class:`~equivision.robust.heads.ContrastiveDefense` (self-supervised heads).

The attacks in :mod:`equivision.robust.attacks` use only the :class:`Defense`
interface: ``purify(x, generator, differentiable)``, ``randomized``,
``equivariance_loss(x)``, ``model`` and ``predict``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..transforms import ColorJitter, Resize, Rotation, Transform, hflip
from .purify import check_images, check_purify_args, purify_loop
from .view_fit import check_views, fitting_views, parse_views
from .views import AUTO_LAYER, PAIRINGS, FeatureExtractor, resolve_max_batch, view_cosines

__all__ = [
    "Defense", "EquivarianceDefense", "InvarianceDefense", "PurifierDefense",
    "RandomNoiseDefense",
    "default_transforms", "equivariance_score",
]


def default_transforms(channels: int = 3, multiple: int = 1) -> list[Transform]:
    """The paper's K = 8 transformations (section 4.4).

    The paper gives "four resizing transformations ranging from 0.3 to 2 times", "one
    color jittering", "one horizontal flip" and "two rotation transformations between
    -15 to 15 degrees" without the exact values; the choices here are: resizes by
    0.3, 0.6, 1.4 and 2 (spread over the range, none near 1); a jitter of brightness
    +0.1 and contrast 1.2 (plus saturation 1.2 for RGB, ``channels == 3``); rotations
    by -15 and +15 degrees (the ends of the range). ``multiple`` rounds the resized
    sides to a multiple (4 for the ``segmenter``, which needs sides divisible by 4).
    """
    if channels == 3:
        jitter = ColorJitter(brightness=0.1, contrast=1.2, saturation=1.2)
    else:
        jitter = ColorJitter(brightness=0.1, contrast=1.2)
    resizes = [Resize(f, multiple=multiple) for f in (0.3, 0.6, 1.4, 2.0)]
    return [*resizes, jitter, hflip(),
            Rotation(-15.0), Rotation(15.0)]


class Defense(nn.Module):
    """Base class of all defenses.

    Subclasses implement :meth:`purify` and :meth:`equivariance_loss` and set
    :attr:`randomized`. The wrapped model is kept in eval mode (``defense.train()``
    does not change it) and ``purify`` never writes ``.grad`` of its parameters.

    Attributes:
        model: the wrapped classifier or segmenter.
        randomized: whether :meth:`purify` draws random numbers.
    """

    randomized: bool = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.model.eval()

    def train(self, mode: bool = True) -> Defense:
        """Set the defense's own mode; the wrapped model stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def purify(
        self, x: Tensor, generator: torch.Generator | None = None, differentiable: bool = False
    ) -> Tensor:
        """``h(x) = x + r`` in [0, 1], same shape ``(B, C, H, W)``.

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            generator: source of randomness (None: the defense's seed if it has one,
                else torch's global RNG).
            differentiable: return a result differentiable w.r.t. ``x`` (the unrolled
                purifier); otherwise a detached tensor.
        """
        raise NotImplementedError

    def equivariance_loss(self, x: Tensor) -> Tensor:
        """Per-image loss ``(B,)`` that purification minimizes (lower = more
        consistent), differentiable w.r.t. ``x`` and deterministic."""
        raise NotImplementedError

    def predict(self, x: Tensor) -> Tensor:
        """``model(purify(x))``: ``(B, K)`` or ``(B, K, H, W)``."""
        return self.model(self.purify(x))

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`predict`."""
        return self.predict(x)


class PurifierDefense(Defense):
    """A defense that purifies with the optimizer of Algorithm 1
    (:func:`~equivision.robust.purify.purify_loop`) on the loss :meth:`_loss`.

    ``steps`` sign steps of size ``eta`` along the per-image normalized gradient of the
    loss plus Gaussian noise annealed linearly from ``noise`` to zero, each projected
    to the ``eps_v`` L-inf ball around the input and to [0, 1].

    Args:
        model: frozen classifier or segmenter, images in [0, 1].
        eps_v: L-inf bound of the purification ``r`` (paper: 1.25-2 times the attack's
            eps; default 8/255 = 2 x 4/255, its ImageNet setting).
        eta: step size; default ``2.5 eps_v / steps`` (the usual PGD rule). The paper
            uses ``2 eps_v``, with which every sign step crosses the whole ball and the
            last step alone sets each pixel to ``x +- eps_v``; pass ``eta=2 * eps_v``
            to reproduce it.
        steps: number of steps ``T`` (paper: 20); 0 returns the input.
        noise: initial noise std, relative to the unit-RMS normalized gradient
            (paper: ``N(0, (T-1-t)/T)``, i.e. about 1). 0 makes purification deterministic.
        seed: when given (and no generator is passed to :meth:`purify`) every call
            draws its noise from a fresh generator seeded with it.
        grad_norm: ``"image"`` (ours: one RMS per image) or ``"batch"`` (released code:
            one L2 norm over the batch, couples the images).
        update: ``"sign"`` (paper) or ``"l2"`` (step along the noisy normalized gradient;
            with ``differentiable=True`` its second-order path is kept).
    """

    def __init__(
        self,
        model: nn.Module,
        eps_v: float = 8 / 255,
        eta: float | None = None,
        steps: int = 20,
        noise: float = 1.0,
        seed: int | None = None,
        grad_norm: str = "image",
        update: str = "sign",
    ) -> None:
        super().__init__(model)
        self.eps_v, self.eta, self.steps, self.noise = check_purify_args(
            eps_v, eta, steps, noise, grad_norm, update)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.grad_norm = grad_norm
        self.update = update

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        """True when purify draws noise (``noise > 0`` and ``steps > 1``: the last step
        has none); a ``seed`` makes the draws repeatable but they are still random."""
        return self.noise > 0 and self.steps > 1

    def _loss(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def equivariance_loss(self, x: Tensor) -> Tensor:
        """The purification loss per image: ``(B, C, H, W) -> (B,)``, lower = better."""
        check_images(x)
        return self._loss(x)

    def purify(
        self, x: Tensor, generator: torch.Generator | None = None, differentiable: bool = False
    ) -> Tensor:
        """Algorithm 1 on ``x (B, C, H, W)`` in [0, 1]; see :class:`Defense`."""
        check_images(x)
        if generator is None and self.seed is not None and self.randomized:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return purify_loop(
            self._loss, x, self.eps_v, self.eta, self.steps, self.noise, generator,
            differentiable, self.grad_norm, self.update,
        )


class EquivarianceDefense(PurifierDefense):
    """Equivariance defense (Algorithm 1): purify by restoring feature equivariance.

    The loss of an image ``x'`` is ``-mean cos`` over the compared views (see
    :func:`~equivision.robust.views.view_cosines`): with ``pairing="identity"`` (the
    paper's Eq. 2) ``cos(g_k^-1 F(g_k x'), F(x'))`` for each transformation, with
    ``"pairs"`` (the released code) all pairs of the ``K + 1`` views. The cosine is
    global per image (flattened ``C x h x w``). Classification logits (and any vector
    layer) are invariant, so ``g`` acts on them as the identity; maps get ``g^-1``'s
    action (a :class:`~equivision.transforms.Resize` is undone to the size of ``F(x')``).

    Args:
        model, eps_v, eta, steps, noise, seed, grad_norm, update: see
            :class:`PurifierDefense`.
        transforms: the ``g_k``, a list or a spec string (default: the
            :func:`default_transforms` of the input's channels that the model can take,
            :func:`~equivision.robust.view_fit.fitting_views`, fixed on the first call).
            Given views are checked on the first call: a view the model cannot take
            raises one ValueError naming it and the model's minimum input size.
        feature_layer: ``"auto"`` (default: the model's last spatial map,
            :func:`~equivision.robust.views.last_spatial_layer`, found on the first
            call), ``"logits"`` (the class scores: the model's submodule named ``logits``
            if it has one, e.g. the segmenter's scores before upsampling as in the released
            code, else the model output), ``"output"`` (always the model output) or the
            name of a submodule (captured with a forward hook).
        allow_invariance: accept a feature layer that gives vectors ``(B, C)`` (classifier
            logits), on which the loss is the invariance loss; without it such a layer
            raises a ValueError on the first call (the invariance defense always accepts
            them).
        pairing: ``"identity"`` (paper) or ``"pairs"`` (released code).
        batched: run views of the same size in one forward pass (``False``: a plain loop
            over the views, the reference the batched code must match).
        max_batch: cap on the images per batched forward pass: ``"auto"`` (16 on the
            CPU, where bigger concatenations are no faster, none on accelerators), None
            (no cap) or an int.
    """

    #: pool maps instead of undoing the transformation (the invariance objective)
    pooled: bool = False

    def __init__(
        self,
        model: nn.Module,
        eps_v: float = 8 / 255,
        eta: float | None = None,
        steps: int = 20,
        noise: float = 1.0,
        transforms: Sequence[Transform] | str | None = None,
        feature_layer: str = AUTO_LAYER,
        pairing: str = "identity",
        seed: int | None = None,
        grad_norm: str = "image",
        update: str = "sign",
        batched: bool = True,
        max_batch: int | str | None = "auto",
        allow_invariance: bool = False,
    ) -> None:
        super().__init__(model, eps_v, eta, steps, noise, seed, grad_norm, update)
        resolve_max_batch(max_batch, torch.device("cpu"))  # validates
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.transforms: list[Transform] | None = _check_transforms(transforms)
        self.extractor = FeatureExtractor(model, feature_layer)
        self.pairing = pairing
        self.batched = bool(batched)
        self.max_batch = max_batch
        self.allow_invariance = bool(allow_invariance)
        self._views_checked = False

    @property
    def feature_layer(self) -> str:
        """The feature layer's name (``"auto"`` until resolved on the first call)."""
        return self.extractor.feature_layer

    def views(self, x: Tensor) -> list[Transform]:
        """The transformations, fixed (defaults that fit) or checked against the model on
        the first call with images ``x (B, C, H, W)``."""
        if self.transforms is None:
            self.transforms = fitting_views(self.model, default_transforms(x.shape[1]), x)
        elif not self._views_checked:
            check_views(self.model, self.transforms, x)
        self._views_checked = True
        return self.transforms

    @classmethod
    def reference_code(
        cls, model: nn.Module, eps_v: float = 8 / 255, steps: int = 20, **kwargs: object
    ) -> EquivarianceDefense:
        """The released code's settings, for comparison only: FLAWED.

        ``eta = 1.0`` (far above ``2 eps_v``: each step jumps to a corner of the ball),
        one gradient norm over the whole batch (images are coupled and the normalized
        gradient ~1/sqrt(B C H W) is drowned by the unit noise, so the loop is almost a
        random-start sign step), all pairs of views, the model's output as features.
        ``kwargs`` override any of these.
        """
        settings: dict[str, object] = dict(
            eta=1.0, grad_norm="batch", pairing="pairs", feature_layer="logits", noise=1.0,
            update="sign", allow_invariance=True,
        )
        settings.update(kwargs)
        return cls(model, eps_v=eps_v, steps=steps, **settings)  # type: ignore[arg-type]

    def _loss(self, x: Tensor) -> Tensor:
        cos = view_cosines(self.extractor, x, self.views(x), self.pairing,
                           pooled=self.pooled, batched=self.batched, max_batch=self.max_batch,
                           refuse_vector=not self.pooled and not self.allow_invariance)
        return -cos.mean(dim=1)


def _check_transforms(transforms: Sequence[Transform] | str | None) -> list[Transform] | None:
    return None if transforms is None else parse_views(transforms)


class InvarianceDefense(EquivarianceDefense):
    """The paper's invariance baseline: the same optimizer, but the views' features are
    global-average-pooled (``(B, C, h, w) -> (B, C)``) and compared without undoing
    the transformations (they are not aligned after spatial transformations).

    Takes the arguments of :class:`EquivarianceDefense` (a layer that gives vectors, such
    as classifier logits, is accepted); maps of the default layer (the last spatial map)
    are pooled.
    """

    pooled = True


class RandomNoiseDefense(Defense):
    """Random-noise baseline: ``purify(x) = clip(x + n, 0, 1)`` with ``n`` uniform in
    ``[-eps_v, eps_v]`` (``kind="uniform"``) or Gaussian with std ``eps_v`` clipped to
    that interval (``kind="gaussian"``).

    Args:
        model: the wrapped model.
        eps_v: noise bound (L-inf), in (0, 1].
        kind: ``"uniform"`` or ``"gaussian"``.
        seed: as in :class:`EquivarianceDefense`.
    """

    randomized = True

    def __init__(
        self, model: nn.Module, eps_v: float = 8 / 255, kind: str = "uniform",
        seed: int | None = None,
    ) -> None:
        super().__init__(model)
        self.eps_v = check_purify_args(eps_v, None, 1, 0.0, "image", "sign")[0]
        if kind not in ("uniform", "gaussian"):
            raise ValueError(f"kind must be 'uniform' or 'gaussian', got {kind!r}")
        self.kind = kind
        self.seed = seed

    def purify(
        self, x: Tensor, generator: torch.Generator | None = None, differentiable: bool = False
    ) -> Tensor:
        """``clip(x + n, 0, 1)``; differentiable w.r.t. ``x`` (identity Jacobian where
        not clipped) when asked, else detached."""
        check_images(x)
        if generator is None and self.seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.seed)
        dev = generator.device if generator is not None else x.device
        if self.kind == "uniform":
            n = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype) * 2 - 1
            n = n * self.eps_v
        else:
            n = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
            n = torch.clamp(n * self.eps_v, -self.eps_v, self.eps_v)
        out = torch.clamp(x + n.to(x.device), 0.0, 1.0)
        return out if differentiable else out.detach()

    def equivariance_loss(self, x: Tensor) -> Tensor:
        """Zeros ``(B,)`` with a gradient path to ``x`` (this defense has no objective)."""
        check_images(x)
        return (x * 0.0).flatten(1).sum(dim=1)


@torch.no_grad()
def equivariance_score(
    model: nn.Module,
    x: Tensor,
    transforms: Sequence[Transform] | str | None = None,
    feature_layer: str = AUTO_LAYER,
    pairing: str = "identity",
) -> Tensor:
    """Mean cosine across views per image (paper Table 4: clean vs attacked vs restored).

    Uses the same code path as :class:`EquivarianceDefense`'s loss (score = -loss).

    Args:
        model: classifier or segmenter (put in eval mode).
        x: images ``(B, C, H, W)`` in [0, 1].
        transforms: the ``g_k``, a list or a spec string such as ``"hflip,rot:15"``
            (default: the :func:`default_transforms` the model can take).
        feature_layer: ``"auto"`` (the last spatial map), ``"logits"``, ``"output"`` or a
            submodule name (see :class:`EquivarianceDefense`).
        pairing: ``"identity"`` or ``"pairs"``.

    Returns:
        ``(B,)`` in [-1, 1]; 1 = exactly equivariant on these views.
    """
    check_images(x)
    model.eval()
    gs = fitting_views(model, default_transforms(x.shape[1]), x) if transforms is None \
        else parse_views(transforms)
    cos = view_cosines(FeatureExtractor(model, feature_layer), x, gs, pairing)
    return cos.mean(dim=1)
