"""Name -> builder registries of the attacks and defenses used by the evaluation and CLI.

Attacks (:data:`ATTACKS`, :func:`parse_attack`, :func:`build_attack`):

=================  ==========================================  ==================
name               what                                        attack target
=================  ==========================================  ==================
``fgsm``           one sign step of size eps                   the bare model
``ifgsm``          iterative FGSM (no random start)            the bare model
``pgd``            PGD with a random start                     the bare model
``mim``            momentum iterative method                   the bare model
``cw``             Carlini-Wagner margin, PGD steps            the bare model
``houdini``        Houdini's probit surrogate, PGD steps       the bare model
``bpda``           PGD through the defense, identity backward  the defense
``bpda-eot``       BPDA averaged over ``eot_samples`` draws    the defense
``full``           PGD through the unrolled purifier (+ EOT)   the defense
``adaptive``       ``L_task - lambda_e L_equi(x + delta)``;    the defense
                   a sweep over ``lambdas`` keeps the worst
                   case per image
``apgd-ce``        Auto-PGD with cross-entropy                 the bare model
``apgd-dlr``       Auto-PGD with the DLR loss                  the bare model
``apgd-t``         Auto-PGD, targeted DLR over top classes     the bare model
``square``         Square (score-based, ``queries`` budget)    the bare model
``apgd-bpda``      Auto-PGD through the defense (BPDA, EOT)    the defense
``autoattack``     the AutoAttack-style ensemble               the defense
                   (:class:`~equivision.robust.ensemble.
                   AutoAttackEnsemble`, ``version``; through
                   a defense with BPDA and EOT)
=================  ==========================================  ==================

"Bare model" attacks are the paper's standard attacks: generated on the undefended model
and transferred to the defended one. With no defense every attack targets the model
(``bpda``/``full``/``adaptive`` then reduce to PGD).

A spec is a name, ``"adaptive:10"`` (one ``lambda_e``), ``"adaptive:0/1/10"`` (a sweep),
or a mapping ``{"name": "pgd", "steps": 20, "label": "pgd-20"}`` whose other keys override
the attack's keyword arguments.

Defenses (:data:`DEFENSES`, :func:`build_defense`): ``none``, ``random``,
``equivariance``, ``invariance``, ``rotation``, ``contrastive`` (these two need a trained
head: a head object, a file written by :func:`save_head`, or a dataset to train one on)
and ``equivariance-reference`` (the released code's flawed settings, for comparison).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import load_checkpoint, save_checkpoint
from ..registry import Registry
from ..transforms import Transform
from .apgd import APGD, APGDT
from .attacks import (
    BPDA,
    CW,
    FGSM,
    IFGSM,
    MIM,
    PGD,
    Adaptive,
    FullGradient,
    Houdini,
)
from .defenses import Defense, EquivarianceDefense, InvarianceDefense, RandomNoiseDefense
from .ensemble import EnsembleAttack
from .heads import (
    ContrastiveDefense,
    ContrastiveHead,
    RotationDefense,
    RotationHead,
    train_contrastive_head,
    train_rotation_head,
)
from .square import Square

__all__ = [
    "ATTACKS", "DEFENSES", "AttackSpec", "build_attack", "build_defense", "load_head",
    "parse_attack", "save_head",
]

#: attack name -> (class, whether it is generated with the defense in the loop)
ATTACKS: Registry[tuple[Callable[..., Any], bool]] = Registry("attack", str.lower)
for _name, _entry, _what in (
        ("fgsm", (FGSM, False), "one sign step of size eps"),
        ("ifgsm", (IFGSM, False), "iterative FGSM (no random start)"),
        ("pgd", (PGD, False), "PGD with a random start"),
        ("mim", (MIM, False), "momentum iterative method"),
        ("cw", (CW, False), "Carlini-Wagner margin, PGD steps"),
        ("houdini", (Houdini, False), "Houdini's probit surrogate, PGD steps"),
        ("bpda", (BPDA, True), "PGD through the defense, identity backward"),
        ("bpda-eot", (BPDA, True), "BPDA averaged over eot_samples draws"),
        ("full", (FullGradient, True), "PGD through the unrolled purifier (+ EOT)"),
        ("adaptive", (Adaptive, True), "L_task - lambda_e L_equi(x + delta), lambda_e sweep"),
        ("apgd-ce", (APGD, False), "Auto-PGD, cross-entropy (Croce & Hein 2020)"),
        ("apgd-dlr", (partial(APGD, loss="dlr"), False), "Auto-PGD, DLR loss"),
        ("apgd-t", (APGDT, False), "Auto-PGD, targeted DLR over the top classes"),
        ("square", (Square, False), "Square attack: score-based, no gradients"),
        ("apgd-bpda", (partial(APGD, through="bpda"), True),
         "Auto-PGD through the defense, identity backward (+ EOT)"),
        ("autoattack", (partial(EnsembleAttack, through="bpda"), True),
         "AutoAttack-style ensemble (version standard / rand / seg), per-image worst case")):
    ATTACKS.add(_name, _entry, _what)

#: attacks that are not IterativeAttack subclasses: their own keyword arguments
_OWN_ARGS = ("apgd-ce", "apgd-dlr", "apgd-t", "square", "apgd-bpda", "autoattack")

#: keyword arguments an attack spec may override
_ATTACK_KEYS = {"eps", "alpha", "steps", "norm", "random_start", "restarts", "targeted", "seed",
                "loss", "kappa", "decay", "through", "eot_samples", "lambda_e", "lambdas",
                "ignore_index", "queries", "n_targets", "p_init", "version", "eval_draws",
                "best_iterate"}


@dataclass(frozen=True)
class AttackSpec:
    """One attack row of an evaluation.

    Attributes:
        name: a name in :data:`ATTACKS`.
        label: the row's name in tables (default: the spec text).
        options: keyword overrides for the attack (e.g. ``steps``, ``lambdas``).
    """

    name: str
    label: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def in_loop(self) -> bool:
        """Whether the attack is generated with the defense in the loop."""
        return ATTACKS.get(self.name)[1]


def parse_attack(spec: str | Mapping[str, Any] | AttackSpec) -> AttackSpec:
    """``"pgd"``, ``"adaptive:10"``, ``"adaptive:0/1/10"`` or a mapping -> :class:`AttackSpec`.

    Raises:
        ValueError: unknown name (the message lists the names), a bad value, or an unknown
            override key.
    """
    if isinstance(spec, AttackSpec):
        return spec
    if isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        label = str(options.pop("label", name))
        ATTACKS.get(name)  # an unknown name fails here, with suggestions
        bad = sorted(set(options) - _ATTACK_KEYS)
        if bad:
            raise ValueError(f"attack {name!r}: unknown option(s) {bad}; valid: "
                             f"{', '.join(sorted(_ATTACK_KEYS))}")
        return AttackSpec(str(name), label, options)
    if not isinstance(spec, str):
        raise TypeError(f"an attack spec must be a name or a mapping, got {type(spec).__name__}")
    text = spec.strip().lower()
    name, sep, value = text.partition(":")
    ATTACKS.get(name)  # an unknown name fails here, with suggestions
    if not sep:
        return AttackSpec(name, name)
    if name != "adaptive":
        raise ValueError(f"attack {spec!r}: only 'adaptive' takes a value (adaptive:LAMBDA or "
                         "adaptive:L1/L2/...)")
    try:
        lambdas = [float(v) for v in value.split("/")]
    except ValueError:
        raise ValueError(f"attack {spec!r}: lambda_e must be numbers, e.g. adaptive:0/1/10"
                         ) from None
    if not lambdas or any(not (lam >= 0) for lam in lambdas):
        raise ValueError(f"attack {spec!r}: lambda_e values must be >= 0")
    return AttackSpec(name, text, {"lambdas": lambdas})


def build_attack(spec: AttackSpec, model: nn.Module, defense: Defense | None,
                 **settings: Any) -> tuple[Any, str]:
    """The attack object of ``spec`` and its target (``"model"`` or ``"defense"``).

    Args:
        spec: the attack.
        model: the undefended network (target of the standard attacks).
        defense: the defense or None; ``in_loop`` attacks are built on it.
        **settings: keyword arguments of :class:`IterativeAttack` (``eps``, ``steps``, ...;
            ``eot_samples`` applies to ``bpda-eot`` and ``full`` only, ``lambda_e`` to
            ``adaptive``); ``spec.options`` override them.

    Returns:
        ``(attack, target)``. Without a defense, ``bpda``/``bpda-eot``/``full``/``adaptive``
        are plain PGD on ``model`` (there is nothing else to differentiate).
    """
    kw = {**settings, **spec.options}
    kw.pop("lambdas", None)
    eps = kw.pop("eps")
    cls, in_loop = ATTACKS.get(spec.name)
    if spec.name in _OWN_ARGS:
        return _build_own(spec, cls, in_loop, model, defense, eps, kw)
    randomized = bool(getattr(defense, "randomized", False))
    if spec.name != "bpda-eot" and spec.name != "full":
        kw.pop("eot_samples", None)
    elif not randomized:
        kw["eot_samples"] = 1  # a deterministic defense: one draw is exact
    if spec.name != "adaptive":
        kw.pop("lambda_e", None)
    if spec.name == "bpda":
        kw["eot_samples"] = 1
    if in_loop and defense is None:
        kw.pop("eot_samples", None)
        kw.pop("lambda_e", None)
        kw.pop("through", None)
        return PGD(model, eps, **kw), "model"
    if in_loop:
        return cls(defense, eps, **kw), "defense"
    return cls(model, eps, **kw), "model"


def _build_own(spec: AttackSpec, cls: Callable[..., Any], in_loop: bool, model: nn.Module,
               defense: Defense | None, eps: float, kw: dict[str, Any]) -> tuple[Any, str]:
    """APGD, APGD-T and Square: keep the settings their constructor takes (Square's
    budget is ``queries``, not ``steps``); EOT draws only for a randomized defense."""
    target_model = defense if in_loop and defense is not None else model
    if not (in_loop and defense is not None):
        kw.pop("eot_samples", None)
        kw["through"] = "plain"
    elif not bool(getattr(defense, "randomized", False)):
        kw["eot_samples"] = 1
    if spec.name == "square":
        kw.pop("steps", None)
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    apgd = inspect.signature(APGD).parameters
    own = {k: v for k, v in kw.items() if k in params or (takes_any and k in apgd)}
    return cls(target_model, eps, **own), "defense" if target_model is defense else "model"


# ----------------------------------------------------------------------------- heads


def save_head(path: str | Path, head: RotationHead | ContrastiveHead,
              feature_layer: str) -> Path:
    """Write a trained head (kind, constructor config, weights, the feature layer it reads;
    stored under the key ``"layer"``) atomically with
    :func:`equivision.checkpoint.save_checkpoint`; reload with :func:`load_head`."""
    kind = "rotation" if isinstance(head, RotationHead) else "contrastive"
    if not isinstance(head, (RotationHead, ContrastiveHead)):
        raise TypeError(f"head must be a RotationHead or ContrastiveHead, got "
                        f"{type(head).__name__}")
    return save_checkpoint(path, {"kind": kind, "config": dict(head.config),
                                  "layer": feature_layer,
                                  "model": head.state_dict()})


def load_head(path: str | Path) -> tuple[RotationHead | ContrastiveHead, str]:
    """``(head, feature_layer)`` from a file written by :func:`save_head`.

    Raises:
        equivision.checkpoint.CheckpointError: missing, corrupt or foreign file.
        ValueError: the file is not a head file.
    """
    state = load_checkpoint(path)
    kind = state.get("kind")
    if kind not in ("rotation", "contrastive") or not isinstance(state.get("config"), dict):
        raise ValueError(f"{str(path)!r} is not a head file written by save_head (kind "
                         f"{kind!r})")
    cls = RotationHead if kind == "rotation" else ContrastiveHead
    head = cls(**state["config"])
    head.load_state_dict(state["model"])
    return head.eval(), str(state.get("layer", "logits"))


def _head(name: str, model: nn.Module, head: Any, head_dataset: Dataset | None,
          feature_layer: str, head_epochs: int, seed: int) -> tuple[nn.Module, str]:
    """The trained head of defense ``name`` and the layer it reads: loaded from a file,
    given, or trained on ``head_dataset``."""
    want = RotationHead if name == "rotation" else ContrastiveHead
    if isinstance(head, (str, Path)):
        head, feature_layer = load_head(head)
    elif head is None:
        if head_dataset is None:
            raise ValueError(f"defense {name!r} needs a trained head: pass head= (a head or a "
                             "file written by save_head) or head_dataset= to train one")
        trainer = train_rotation_head if name == "rotation" else train_contrastive_head
        head = trainer(model, feature_layer, head_dataset, epochs=head_epochs, seed=seed)
    if not isinstance(head, want):
        raise ValueError(f"defense {name!r} needs a {want.__name__}, got {type(head).__name__}")
    return head, feature_layer


def _no_defense(model: nn.Module, s: dict[str, Any]) -> None:
    return None


def _random(model: nn.Module, s: dict[str, Any]) -> Defense:
    return RandomNoiseDefense(model, eps_v=s["eps_v"])


def _purifier_settings(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("eps_v", "eta", "steps", "noise")}


def _equivariance(model: nn.Module, s: dict[str, Any]) -> Defense:
    return EquivarianceDefense(model, transforms=s["transforms"], feature_layer=s["feature_layer"],
                               pairing=s["pairing"], allow_invariance=s["allow_invariance"],
                               **_purifier_settings(s))


def _invariance(model: nn.Module, s: dict[str, Any]) -> Defense:
    return InvarianceDefense(model, transforms=s["transforms"], feature_layer=s["feature_layer"],
                             pairing=s["pairing"], **_purifier_settings(s))


def _reference(model: nn.Module, s: dict[str, Any]) -> Defense:
    # the released settings (eta = 1, batch-wide norm, all pairs); the feature layer
    # stays the caller's so that a comparison with ours changes only the optimizer
    return EquivarianceDefense.reference_code(model, eps_v=s["eps_v"], steps=s["steps"],
                                              transforms=s["transforms"],
                                              feature_layer=s["feature_layer"])


def _rotation(model: nn.Module, s: dict[str, Any]) -> Defense:
    trained, layer = _head("rotation", model, s["head"], s["head_dataset"],
                           s["feature_layer"], s["head_epochs"], s["seed"])
    return RotationDefense(model, trained, layer, **_purifier_settings(s))  # type: ignore[arg-type]


def _contrastive(model: nn.Module, s: dict[str, Any]) -> Defense:
    trained, layer = _head("contrastive", model, s["head"], s["head_dataset"],
                           s["feature_layer"], s["head_epochs"], s["seed"])
    return ContrastiveDefense(model, trained, layer,  # type: ignore[arg-type]
                              transforms=s["transforms"], **_purifier_settings(s))


#: defense name -> builder ``(model, settings) -> Defense | None`` used by
#: :func:`build_defense`
DEFENSES: Registry[Callable[[nn.Module, dict[str, Any]], Defense | None]] = Registry("defense")
for _name, _builder, _what in (
        ("none", _no_defense, "no defense"),
        ("random", _random, "uniform noise of radius eps_v"),
        ("equivariance", _equivariance, "purify towards equivariant features"),
        ("invariance", _invariance, "purify towards invariant features"),
        ("rotation", _rotation, "purify towards a correct rotation prediction (a head)"),
        ("contrastive", _contrastive, "purify with a contrastive head"),
        ("equivariance-reference", _reference, "the released code's settings")):
    DEFENSES.add(_name, _builder, _what)


def build_defense(
    name: str | Defense | None,
    model: nn.Module,
    *,
    eps_v: float = 8 / 255,
    eta: float | None = None,
    steps: int = 20,
    noise: float = 1.0,
    feature_layer: str = "auto",
    pairing: str = "identity",
    transforms: Sequence[Transform] | str | None = None,
    head: Any = None,
    head_dataset: Dataset | None = None,
    head_epochs: int = 3,
    seed: int = 0,
    allow_invariance: bool = False,
) -> Defense | None:
    """Build the defense ``name`` around ``model`` (None for ``"none"``; a
    :class:`Defense` is returned as is).

    Args:
        name: a name in :data:`DEFENSES`.
        model: the frozen classifier or segmenter.
        eps_v, eta, steps, noise: purifier settings (:class:`PurifierDefense`); ``random``
            uses ``eps_v`` only.
        feature_layer: the layer read by ``equivariance``/``invariance`` and, for new
            heads, the layer a head is trained on (a head file stores its own layer);
            default ``"auto"``: the model's last spatial map.
        pairing: ``"identity"`` or ``"pairs"``.
        transforms: the views, a list or a spec string (default: the
            :func:`default_transforms` the model can take).
        allow_invariance: let ``equivariance`` read a layer that gives vectors (its loss
            is then the invariance loss); otherwise that is an error.
        head: for ``rotation``/``contrastive``: a trained head or a :func:`save_head` file.
        head_dataset: images to train a head on when ``head`` is None.
        head_epochs: epochs of that training.
        seed: seed of head training.

    Raises:
        ValueError: unknown name (with suggestions; the names are listed), an unknown
            feature layer (the layers are listed), bad settings, or a missing head.
    """
    if name is None or isinstance(name, Defense):
        return name
    settings = dict(eps_v=eps_v, eta=eta, steps=steps, noise=noise,
                    feature_layer=feature_layer, pairing=pairing, transforms=transforms,
                    head=head, head_dataset=head_dataset, head_epochs=head_epochs, seed=seed,
                    allow_invariance=allow_invariance)
    return DEFENSES.get(name)(model, settings)
