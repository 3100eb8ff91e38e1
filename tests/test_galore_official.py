"""Our GaLoreAdamW against the official galore-torch 1.0 (PyPI, a test-only dependency) on fixed problems.

Same parameters, same gradients each step, several SVD refreshes, every proj_type and both weight-decay settings:
the trajectories must agree to ~1e-4 relative (the issue's bar). Only float rounding may differ.
"""

import galore_torch  # the dev extra installs it: a missing peer is a failure, not a skip
import pytest
import torch

from slimtune.optimizers import GaLoreAdamW

SHAPES = [(24, 40), (40, 24), (32, 32), (16,)]  # wide (left side), tall (right side), square, a bias (plain AdamW)


def make_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in SHAPES]


def groups(params, proj_type, weight_decay):
    return [{"params": [params[3]], "weight_decay": weight_decay},
            {"params": params[:3], "rank": 6, "update_proj_gap": 10, "scale": 0.25, "proj_type": proj_type,
             "weight_decay": weight_decay}]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_official_galore_torch(proj_type, weight_decay):
    ours, theirs = make_params(0), make_params(0)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay)
    opt_ours = GaLoreAdamW(groups(ours, proj_type, weight_decay), **kwargs)
    opt_theirs = galore_torch.GaLoreAdamW(groups(theirs, proj_type, weight_decay), **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(35):  # refreshes at calls 1, 11, 21, 31
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-5)


def test_state_is_tensors_only_unlike_the_official_projector_objects():
    params = make_params(0)
    opt = GaLoreAdamW(groups(params, "std", 0.0), lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    values = [v for state in opt.state_dict()["state"].values() for v in state.values()]
    assert values and all(isinstance(v, torch.Tensor) for v in values)
