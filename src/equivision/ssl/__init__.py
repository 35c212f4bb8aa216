"""Self-supervised ViTs with Soft Equivariance Regularization (SER).

Model (:mod:`.vit`), view policies and the batch partition (:mod:`.views`), losses
(:mod:`.losses`), autograd-aware gathers (:mod:`.gather`) and the base methods with
optional SER (:mod:`.methods`).
"""

from ..transforms.elements import act_on_maps, valid_masks
from .gather import all_reduce_sum, gather_no_grad, gather_with_grad, rank_and_world
from .losses import (
    AugSelfHead,
    DINOLoss,
    EquiModHead,
    PatchNTXent,
    barlow_twins_loss,
    infonce,
)
from .methods import (
    DINO,
    SSL_METHODS,
    BarlowTwins,
    MoCoV3,
    SERConfig,
    SSLMethod,
    build_method,
)
from .syncbn import SyncBatchNorm, convert_sync_batchnorm
from .views import (
    BasePolicy,
    EquivariantPolicy,
    Photometric,
    ViewBatch,
    ViewSampler,
    check_patch_aligned,
    geometric_params,
    patch_aligned_scales,
)
from .vit import SSLViT, ViTOutput

__all__ = [
    "DINO", "AugSelfHead", "BarlowTwins", "BasePolicy", "DINOLoss", "EquiModHead",
    "EquivariantPolicy", "MoCoV3", "PatchNTXent", "Photometric", "SERConfig", "SSLMethod",
    "SSL_METHODS", "SyncBatchNorm", "convert_sync_batchnorm",
    "SSLViT", "ViTOutput", "ViewBatch", "ViewSampler", "act_on_maps", "all_reduce_sum",
    "barlow_twins_loss", "build_method", "check_patch_aligned", "gather_no_grad",
    "gather_with_grad", "geometric_params", "infonce", "patch_aligned_scales",
    "rank_and_world", "valid_masks",
]
