"""FRUGAL against torch.optim.AdamW, GaLore and float64 formulas of the author code
(``frugal/proj_optimizer_templates.py``)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from slimtune.optimizers.base import allocated_state_bytes
from slimtune.optimizers.frugal import FRUGAL
from slimtune.optimizers.galore import GaLoreAdamW
from slimtune.optimizers.projection import active_blocks, generator, random_orthogonal


def fixed_grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def make(shapes, proj_kwargs=None, regular_shapes=(), seed=0, **opt_kwargs):
    torch.manual_seed(seed)
    proj = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    regular = [torch.nn.Parameter(torch.randn(s)) for s in regular_shapes]
    groups = [{"params": proj, "is_proj_params": True, **(proj_kwargs or {})}]
    if regular:
        groups.append({"params": regular})
    return proj + regular, FRUGAL(groups, **opt_kwargs)


def drive(params, opt, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("proj_type", ["columns", "rows", "randk", "blockwise"])
def test_density_one_without_refresh_is_torch_adamw(proj_type):
    shapes, regular = [(12, 8), (6, 10)], [(8,)]
    params, opt = make(shapes, regular_shapes=regular, lr=1e-2, weight_decay=0.1, proj_type=proj_type,
                       density=1.0, update_gap=1000)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)  # eps 1e-8 and decay-before, like FRUGAL
    grads = fixed_grads(shapes + regular, 15)
    drive(params, opt, grads)
    drive(ref, torch_opt, grads)
    for a, b in zip(params, ref):  # identical math; only lerp/addcdiv rounding differs from torch's kernel
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_svd_without_reset_and_residual_is_galore_with_torch_eps():
    shape, steps, gap = (16, 12), 14, 5
    params, opt = make([shape], lr=1e-2, weight_decay=0.0, proj_type="svd", density=0.25, update_gap=gap,
                       reset_statistics=False, inactive_update_rule="none", proj_params_lr_scale=0.5, eps=0.0)
    galore_p = torch.nn.Parameter(params[0].detach().clone())
    # eps = 0 makes GaLore's eps-hat placement and torch's placement the same function
    galore = GaLoreAdamW([{"params": [galore_p], "rank": round(0.25 * 12), "update_proj_gap": gap, "scale": 0.5,
                           "proj_type": "std"}], lr=1e-2, eps=0.0)
    grads = fixed_grads([shape], steps)
    drive(params, opt, grads)
    drive([galore_p], galore, grads)
    torch.testing.assert_close(params[0], galore_p, rtol=1e-5, atol=1e-6)
    assert int(opt.state[params[0]]["step"]) == steps  # no reset


@pytest.mark.parametrize("proj_type,shape,expect", [
    ("svd", (20, 12), {"ortho": (3, 12), "exp_avg": (20, 3)}),      # right, round(0.25 * 12) = 3
    ("svd", (12, 20), {"ortho": (12, 3), "exp_avg": (3, 20)}),      # left, round(0.25 * 12) = 3
    ("random", (20, 10), {"ortho": (2, 10), "exp_avg": (20, 2)}),   # round(2.5) = 2 (banker's rounding, as Python)
    ("columns", (20, 10), {"indices": (2,), "exp_avg": (20, 2)}),   # int(0.25 * 10) = 2
    ("rows", (20, 10), {"indices": (5,), "exp_avg": (5, 10)}),      # int(0.25 * 20) = 5
    ("randk", (20, 10), {"indices": (50,), "exp_avg": (50,)}),      # int(0.25 * 200) = 50
])
def test_each_proj_type_selects_documented_count(proj_type, shape, expect):
    params, opt = make([shape], proj_type=proj_type, density=0.25)
    drive(params, opt, fixed_grads([shape], 1))
    state = opt.state[params[0]]
    assert {k: tuple(state[k].shape) for k in expect} == expect
    if "indices" in state:
        assert state["indices"].unique().numel() == state["indices"].numel()


def test_blockwise_activates_round_density_times_tensors():
    shapes = [(4, 3)] * 7
    params, opt = make(shapes, proj_type="blockwise", density=0.3, update_gap=2)
    for _ in range(3):
        drive(params, opt, fixed_grads(shapes, 2, seed=_))
        assert sum(bool(opt.state[p]["active"]) for p in params) == round(7 * 0.3)
        assert all(("exp_avg" in opt.state[p]) == bool(opt.state[p]["active"]) for p in params)


def test_random_projection_is_orthonormal_and_seeded():
    a = random_orthogonal((3, 10), generator(7, 0), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=0)
    assert torch.equal(a, random_orthogonal((3, 10), generator(7, 0), torch.float32, torch.device("cpu")))
    b = random_orthogonal((10, 3), generator(7, 1), torch.float32, torch.device("cpu"))
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("proj_type,rule", [("columns", "sign_sgd"), ("svd", "sign_sgd"), ("randk", "sgd")])
def test_residual_update_equals_float64_formula(proj_type, rule):
    shape, lr, wd, pls, ils = (10, 8), 0.1, 0.2, 0.5, 0.3
    params, opt = make([shape], lr=lr, weight_decay=wd, proj_type=proj_type, density=0.5,
                       inactive_update_rule=rule, inactive_lr_scale=ils, proj_params_lr_scale=pls)
    w0 = params[0].detach().double().clone()
    g32 = fixed_grads([shape], 1)[0][0]
    drive(params, opt, [[g32]])
    g, state = g32.double(), opt.state[params[0]]
    if proj_type == "svd":
        q = state["ortho"].double()  # right side (10 >= 8), taken from the fp32 gradient as the author code
        down, up = (lambda x: x @ q.T), (lambda x: x @ q)
    else:
        idx = state["indices"]

        def down(x):
            return x.reshape(-1)[idx] if proj_type == "randk" else x[:, idx]

        def up(x):
            full = torch.zeros(shape, dtype=torch.float64)
            if proj_type == "randk":
                full.view(-1)[idx] = x
            else:
                full[:, idx] = x
            return full
    low = down(g)
    m, v = 0.1 * low, 0.001 * low * low  # one step from zero moments
    adam = -(lr * pls / 0.1) * m / (v.sqrt() / math.sqrt(0.001) + 1e-8)
    residual = g - up(low)
    free = residual.sign() if rule == "sign_sgd" else residual
    expected = w0 * (1 - lr * wd) + up(adam) - lr * pls * ils * free
    torch.testing.assert_close(params[0].detach().double(), expected, rtol=1e-6, atol=1e-6)
    assert (residual.abs() > 1e-3).sum() > 0  # the residual term is really exercised


@pytest.mark.parametrize("reset", [True, False])
def test_reset_at_refresh_zeroes_moments_and_step(reset):
    shape, gap = (10, 6), 4
    params, opt = make([shape], proj_type="columns", density=0.5, update_gap=gap, reset_statistics=reset)
    grads = fixed_grads([shape], gap + 1)
    drive(params, opt, grads[:gap])
    assert int(opt.state[params[0]]["step"]) == gap
    before = opt.state[params[0]]["exp_avg"].clone()
    drive(params, opt, grads[gap:])  # call gap + 1 refreshes
    state = opt.state[params[0]]
    low = grads[gap][0][:, state["indices"]]
    if reset:
        assert int(state["step"]) == 1
        torch.testing.assert_close(state["exp_avg"], 0.1 * low, rtol=1e-6, atol=0)
    else:
        assert int(state["step"]) == gap + 1
        torch.testing.assert_close(state["exp_avg"], 0.9 * before + 0.1 * low, rtol=1e-6, atol=1e-7)


def author_walk(order, n, k, refreshes):
    """The author's ``next_block_start`` loop (BlockOptimizer._update_states), transcribed literally."""
    out, start = [], None
    for _ in range(refreshes):
        picked = []
        if order == "ascending":
            start = 0 if start is None else start
            picked = [i % n for i in range(start, start + k)]
            start += k
            start -= n if start >= n else 0
        elif order == "descending":
            start = n - 1 if start is None else start
            picked = [i % n for i in range(start, start - k, -1)]
            start -= k
            start += n if start < 0 else 0
        else:
            start = 0 if start is None else start
            for i in range(start, start + k // 2):
                picked += [i % (n // 2), n - 1 - i % (n // 2)]
            start += k // 2
            start -= n // 2 if start >= n // 2 else 0
        out.append(picked)
    return out


@pytest.mark.parametrize("order", ["ascending", "descending", "mirror"])
@pytest.mark.parametrize("n,k", [(7, 2), (8, 4), (5, 2), (6, 6)])
def test_block_orders_match_author_walk(order, n, k):
    assert [active_blocks(order, n, k, t) for t in range(9)] == author_walk(order, n, k, 9)


def test_block_order_end_to_end_and_random_is_seeded():
    shapes = [(3, 3)] * 4
    params, opt = make(shapes, proj_type="blockwise", density=0.5, update_gap=2, block_order="ascending")
    seen = []
    for call, gs in enumerate(fixed_grads(shapes, 6), start=1):
        drive(params, opt, [gs])
        if call % 2 == 1:
            seen.append([i for i, p in enumerate(params) if bool(opt.state[p]["active"])])
    assert seen == [[0, 1], [2, 3], [0, 1]]
    picks = [active_blocks("random", 10, 3, t, generator(5, t)) for t in range(4)]
    assert picks == [active_blocks("random", 10, 3, t, generator(5, t)) for t in range(4)]
    assert len({tuple(p) for p in picks}) > 1 and all(len(set(p)) == 3 for p in picks)


def test_inactive_block_gets_sign_sgd_only():
    shapes = [(3, 4), (3, 4)]
    params, opt = make(shapes, proj_type="blockwise", density=0.5, block_order="descending", weight_decay=0.0,
                       lr=0.1, inactive_lr_scale=0.5)
    w0 = params[0].detach().clone()
    g = fixed_grads(shapes, 1)
    drive(params, opt, g)
    assert not bool(opt.state[params[0]]["active"]) and bool(opt.state[params[1]]["active"])  # descending: last
    assert set(opt.state[params[0]]) == {"step", "seed", "refresh", "active"}
    torch.testing.assert_close(params[0].detach(), w0 - 0.05 * g[0][0].sign())


@pytest.mark.parametrize("proj_type", ["svd", "svd-randomized", "random", "columns", "rows", "randk", "blockwise"])
def test_state_dict_resume_is_exact_across_refresh(proj_type):
    shapes, regular, gap = [(12, 8), (6, 10), (9, 9), (5, 7)], [(8,)], 3
    kwargs = {"proj_type": proj_type.split("-")[0], "density": 0.5, "update_gap": gap, "lr": 1e-2,
              "block_order": "random", "seed": 11, "svd_method": "randomized" if "-" in proj_type else "full"}
    grads = fixed_grads(shapes + regular, 8)
    params, opt = make(shapes, regular_shapes=regular, **kwargs)
    for step, gs in enumerate(grads):
        if step == 2:
            buffer = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buffer)
        drive(params, opt, [gs])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params2, opt2 = make(shapes, regular_shapes=regular, **kwargs)
    with torch.no_grad():
        for p, s in zip(params2, saved["params"]):
            p.copy_(s)
    opt2.load_state_dict(saved["opt"])
    drive(params2, opt2, grads[2:])  # crosses the refreshes at calls 4 and 7
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
        assert opt.state[a].keys() == opt2.state[b].keys()
        assert all(torch.equal(v, opt2.state[b][k]) for k, v in opt.state[a].items())


@pytest.mark.parametrize("proj_type", ["svd", "random", "columns", "rows", "randk", "blockwise"])
def test_state_bytes_equals_allocated(proj_type):
    shapes = [(24, 16), (16, 40), (9, 9), (33, 5)]
    params, opt = make(shapes, regular_shapes=[(16,), (7, 3)], proj_type=proj_type, density=0.3, seed=3)
    for p in params:
        p.grad = torch.randn(p.shape)
    predicted = {id(p): opt.state_bytes(p, opt.group_of(p)) for p in params}
    opt.step()
    for p in params:
        assert predicted[id(p)] == allocated_state_bytes(opt, p) == opt.state_bytes(p, opt.group_of(p)), p.shape


def test_randomized_svd_subspace_keeps_the_top_singular_energy():
    """proj_type 'svd' with svd_method 'randomized': the projector keeps >= 0.999 of the top-r singular energy of a
    gradient whose spectrum decays as 1/i, like the full SVD it replaces, with far less planned scratch."""
    from slimtune.optimizers.projection import svd_scratch_bytes

    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(120, 80))
    v, _ = torch.linalg.qr(torch.randn(96, 80))
    grad = (u / torch.arange(1, 81)) @ v.T
    params, opt = make([(120, 96)], proj_type="svd", density=0.25, svd_method="randomized")
    params[0].grad = grad.clone()
    opt.step()
    ortho = opt.state[params[0]]["ortho"]
    low = grad @ ortho.T if ortho.shape[1] == 96 else ortho.T @ grad
    r = min(ortho.shape)
    assert float(low.pow(2).sum() / (torch.linalg.svdvals(grad)[:r] ** 2).sum()) >= 0.999
    assert opt.scratch_bytes(params[0], opt.group_of(params[0])) < svd_scratch_bytes((120, 96), torch.float32)


def test_invalid_arguments_are_rejected():
    p = torch.nn.Parameter(torch.randn(4, 4))
    for bad in ({"proj_type": "qr"}, {"density": 1.5}, {"inactive_update_rule": "adam"}, {"update_gap": 0},
                {"block_order": "zigzag"}):
        with pytest.raises(ValueError):
            FRUGAL([{"params": [p], "is_proj_params": True}], **bad)
    with pytest.raises(ValueError, match="mirror"):
        FRUGAL([{"params": [torch.nn.Parameter(torch.randn(2, 2)) for _ in range(4)], "is_proj_params": True}],
               proj_type="blockwise", block_order="mirror", density=0.25)
    with pytest.raises(ValueError, match="2-D"):
        FRUGAL([{"params": [torch.nn.Parameter(torch.randn(4))], "is_proj_params": True}], proj_type="svd")
