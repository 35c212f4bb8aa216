"""Two gloo processes: the SER loss and its gradients match one process with the same
global batch (the gather is autograd-aware), and so does Barlow Twins."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import equivision.ssl.losses as losses_module
from equivision.ssl import PatchNTXent, SSLViT, barlow_twins_loss, gather_with_grad
from equivision.ssl.gather import gather_no_grad
from equivision.transforms import Dihedral, Scale

RELATIVE = [Dihedral(1), Dihedral(0, True) @ Scale(1.25, 0.75), Dihedral(2),
            Scale(0.75, 1.0), Dihedral(3, True)]
SHARDS = [(0, 3), (3, 5)]  # unequal shards exercise the padding of the gather


def setup():
    torch.manual_seed(0)
    vit = SSLViT(image_size=32, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    head = PatchNTXent(16, proj_dim=8, hidden=16, tau=0.3)
    proj = torch.nn.Linear(16, 6)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.rand(5, 3, 32, 32, generator=g), torch.rand(5, 3, 32, 32, generator=g)
    return vit, head, proj, x1, x2


def losses(vit, head, proj, x1, x2, sl):
    o1, o2 = vit(x1[sl]), vit(x2[sl])
    equiv = head(o1.tokens, o2.tokens, RELATIVE[sl])
    barlow = barlow_twins_loss(proj(o1.cls), proj(o2.cls))
    return equiv, barlow


def grads(*modules):
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()
                      if p.grad is not None])


def both_grads(vit, head, proj, equiv, barlow):
    """Gradients of the SER loss (encoder, head) and of Barlow Twins (encoder, projector)."""
    equiv.backward(retain_graph=True)
    g_equiv = grads(vit, head)
    for m in (vit, head, proj):
        m.zero_grad()
    barlow.backward()
    return g_equiv, grads(vit, proj)


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        vit, head, proj, x1, x2 = setup()
        equiv, barlow = losses(vit, head, proj, x1, x2, slice(*SHARDS[rank]))
        g_equiv, g_barlow = both_grads(vit, head, proj, equiv, barlow)
        # what DistributedDataParallel does: average the gradients over processes
        for g in (g_equiv, g_barlow):
            dist.all_reduce(g)
            g /= world
        # the released code's bug: gathering without gradient loses the cross terms
        for m in (vit, head):
            m.zero_grad()
        losses_module.gather_with_grad = gather_no_grad
        buggy, _ = losses(vit, head, proj, x1, x2, slice(*SHARDS[rank]))
        buggy.backward()
        g_buggy = grads(vit, head)
        dist.all_reduce(g_buggy)
        g_buggy /= world
        vals = torch.stack([equiv.detach(), barlow.detach()])
        dist.all_reduce(vals)
        vals /= world
        both = torch.cat([torch.arange(3.0) + 10 * rank, torch.zeros(rank)])
        torch.save({"vals": vals, "g_equiv": g_equiv, "g_barlow": g_barlow,
                    "g_buggy": g_buggy, "gathered": gather_no_grad(both)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path, one_thread):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "res")
    mp.spawn(worker, args=(2, init, out), nprocs=2, join=True)
    vit, head, proj, x1, x2 = setup()
    equiv, barlow = losses(vit, head, proj, x1, x2, slice(0, 5))
    g_equiv, g_barlow = both_grads(vit, head, proj, equiv, barlow)
    assert g_equiv.abs().sum() > 0
    for rank in range(2):
        res = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(res["vals"], torch.stack([equiv, barlow]).detach())
        for key, ref in (("g_equiv", g_equiv), ("g_barlow", g_barlow)):
            # float32 summation order differs; compare against the gradient's own scale
            torch.testing.assert_close(res[key], ref, rtol=1e-4,
                                       atol=1e-5 * ref.abs().max().item())
        assert not torch.allclose(res["g_buggy"], g_equiv, rtol=1e-2, atol=1e-4)
        assert res["gathered"].tolist() == [0, 1, 2, 10, 11, 12, 0]


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert torch.equal(gather_no_grad(x), x.detach())
