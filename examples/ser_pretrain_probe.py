"""Pretrain a small ViT with MoCo-v3 + Soft Equivariance Regularization (SER), then probe
its encoder (linear and k-NN accuracy, equivariance per block).

    python examples/ser_pretrain_probe.py --out runs/example-ser [--tiny]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from equivision.ssl import SERConfig, SSLViT, build_method
from equivision.ssl.data import load_images
from equivision.ssl.pretrain import PretrainConfig, default_views, load_pretrained, pretrain
from equivision.ssl.probe import run_probes
from equivision.utils import seed_everything


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the probe results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/example-ser")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (for the smoke test)")
    args = p.parse_args(argv)
    images, epochs, dim, steps = (32, 1, 16, 5) if args.tiny else (1024, 8, 64, 200)
    seed_everything(0)  # the same initial weights every run
    encoder = SSLViT(image_size=16, patch_size=4, dim=dim, depth=2, heads=2, cls_layer=1)
    ser = SERConfig.paper("mocov3")  # lambda 0.5, tau 0.3, at the [CLS]-insertion layer
    method = build_method("mocov3", encoder, ser)
    config = PretrainConfig(epochs=epochs, batch_size=16, warmup_epochs=0, ratio=0.5,
                            device="cpu")
    data = load_images("photos", "train", 16, images)
    out = Path(args.out)
    pretrain(method, data, config, out_dir=out, resume=(out / "last.pt").exists(),
             views=default_views(encoder, 0.5), progress=False)
    trained, _ = load_pretrained(out / "last.pt")
    train_set = load_images("digits", "train", 16, images, seed=1)
    test_set = load_images("digits", "test", 16, images // 2, seed=1)
    results = run_probes(trained, train_set, test_set, which=["linear", "knn", "equivariance"],
                         options={"linear": {"steps": steps}})
    print({k: results[k].get("top1") for k in ("linear", "knn")})
    return results


if __name__ == "__main__":
    main()
