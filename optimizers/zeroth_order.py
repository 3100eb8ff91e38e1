"""MeZO: memory-efficient zeroth-order SGD (Malladi et al. 2023, arXiv 2305.17333, Algorithm 1).

Forward passes only: no backward, no ``.grad``, no activations kept, no optimizer moments. Each step estimates the
directional derivative along a random direction z (SPSA) and moves along z::

    z ~ N(0, I_d)   regenerated from a seed, never stored                                   (1)
    g = (L(θ + εz) - L(θ - εz)) / (2ε)          projected gradient, a scalar (paper Eq. 1)  (2)
    θ ← θ - η (g z + λ θ)                       λ only for decaying parameters (Alg. 1)     (3)

n-SPSA (``n_samples = n``, paper §2 and Definition 1): n independent (seed_k, g_k) pairs, all evaluated at the same θ,
averaged exactly like the official ``zo_torch_optim`` path (``p.grad += (g_k / n) z_k``, then one SGD step)::

    θ ← θ - η ((1/n) Σ_k g_k z_k + λ θ)                                                     (4)

without materialising the sum: sample 0 applies (3) with g_0/n and the decay term; samples k ≥ 1 apply (3) with
g_k/n and no decay (mathematically (4); only the floating-point summation order differs).

Protocol (matches the official ``large_models/trainer.py`` ``zo_step``/``zo_update``; reference/optimizers.md §4.1):
perturb +ε, ``loss1 = closure()``, perturb −2ε, ``loss2 = closure()``, perturb +ε (restore, not bit-exact in floating
point), then regenerate z from the same seed for the update. z is drawn per parameter, in param-group order (with one
group: the ``named_parameters()`` order of the official code) in the parameter's dtype, from one generator per device
seeded with the step seed — what ``torch.manual_seed(seed)`` + ``torch.normal`` does in the official code, so the
noise is bit-identical for the same seed; the perturbation ``p + (s z) ε`` and the update are bit-identical too when
λ = 0 (see the tests). ``step`` returns ``loss1`` = L(θ + εz) of the last sample, which is what the official code logs.
Anyone applying perturbations/updates block by block (offload) must draw z in this same order, per device, from
:func:`noise_generators` (or carry the generator across blocks); the per-tensor functions below are that API.

Deviations from the official code, and why:

* The per-step seeds come from a private ``torch.Generator`` (seeded with ``seed``) whose state is optimizer state,
  not from numpy's global RNG: a checkpoint then holds it and a resumed run continues the exact trajectory.
* Perturbation and update are in place: one transient z the size of the parameter, instead of the official
  ``p.data = p.data + …`` temporaries. The decay term is ``z.add_(p, alpha=λ)`` (may be fused, last-bit differences
  from the official ``λ * p``) to keep that single transient.
* The closure runs under ``torch.no_grad()`` rather than ``torch.inference_mode()``: inference tensors created inside
  (caches, buffers) would break a later autograd forward of the same model. The closure must be deterministic
  (``model.eval()``, as the official ``zo_forward`` does): two dropout masks would swamp the difference in (2).
* No-decay names: see :func:`mezo_param_groups`. Its two groups put decaying params first, so z is not drawn in
  ``named_parameters()`` order: same distribution, different z per tensor for a given seed (seeds differ anyway).
* ``load_state_dict`` keeps the counters' dtypes (torch would cast them to the parameters' floating dtype).

Optimizer state: no per-parameter bytes. Optimizer-wide: a step counter (8 B), the seed generator's state (5056 B),
and the last seeds and projected gradients (16 B per sample, for logging), kept in the state of the first parameter
(tensors only: ``torch.load(weights_only=True)`` reads it). Transient: one z the size of the largest parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# Official large_models: no decay for names containing "bias", "layer_norm", "layernorm". Extended by "norm" so that
# Llama's RMSNorm weights (``model.norm.weight``; the per-layer ones already contain "layernorm") do not decay.
MEZO_NO_DECAY_NAME_PARTS = ("bias", "layer_norm", "layernorm", "norm")
SEED_HIGH = 1_000_000_000  # official: np.random.randint(1000000000)


def mezo_param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay / no-decay groups by MeZO's name rule (trainable params only, empty groups dropped, order kept).

    Unlike :func:`slimtune.optimizers.param_groups.decays`, the rule is by name only, as in the official code:
    embeddings and 1-D tensors not named like a bias or a norm decay.
    """
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            lowered = name.lower()
            (no_decay if any(part in lowered for part in MEZO_NO_DECAY_NAME_PARTS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ---- pure per-tensor math (also used block by block by the offload engine) ------------------------------------

def noise_generators(seed: int) -> Callable[[torch.device], torch.Generator]:
    """A per-device generator factory, each seeded with ``seed`` (as ``torch.manual_seed`` seeds every device).

    Draw z for the parameters in the protocol order from the returned callable to regenerate the same noise.
    """
    gens: dict[torch.device, torch.Generator] = {}

    def for_device(device: torch.device) -> torch.Generator:
        if device not in gens:
            gens[device] = torch.Generator(device=device).manual_seed(int(seed))
        return gens[device]

    return for_device


def noise_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Eq. (1) for one tensor: z ~ N(0, 1) of ``p``'s shape, dtype and device (advances ``generator``)."""
    return torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)


@torch.no_grad()
def perturb_(p: torch.Tensor, noise: torch.Generator | int, scale: float) -> None:
    """p ← p + scale · z, in place, z drawn from ``noise`` (a generator continuing its stream, or an int seed for a
    fresh one-tensor stream). ``scale`` is ±ε or −2ε; ``z * scale`` rounds like the official ``(s * z) * ε``."""
    if isinstance(noise, int):
        noise = torch.Generator(device=p.device).manual_seed(noise)
    elif not isinstance(noise, torch.Generator):
        raise TypeError(f"noise must be a torch.Generator or an int seed, got {type(noise).__name__}")
    p.add_(noise_like(p, noise).mul_(scale))


def projected_gradient(loss1: torch.Tensor | float, loss2: torch.Tensor | float, eps: float) -> float:
    """Eq. (2), computed like the official ``((loss1 - loss2) / (2 * eps)).item()`` (in the losses' dtype)."""
    return float((loss1 - loss2) / (2 * eps))


@torch.no_grad()
def zo_update_(p: torch.Tensor, z: torch.Tensor, projected_grad: float, lr: float, weight_decay: float) -> None:
    """Eq. (3) in place: p ← p − lr · (g z + λ p). ``z`` is consumed as scratch space (overwritten)."""
    update = z.mul_(projected_grad)
    if weight_decay != 0.0:
        update.add_(p, alpha=weight_decay)
    p.sub_(update.mul_(lr))


# ---- the optimizer ---------------------------------------------------------------------------------------------

class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD; ``step(closure)`` needs a closure returning the loss (float or 0-dim tensor), no backward.

    Param-group keys: ``lr``, ``weight_decay`` (LR schedulers work). ``eps`` (perturbation scale), ``n_samples``
    (n-SPSA) and ``seed`` (of the per-step seed generator) are optimizer-wide.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, n_samples: int = 1,
                 seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps, self.n_samples = float(eps), n_samples
        self.state[self._anchor()].update(
            step=torch.zeros((), dtype=torch.int64),
            seed_rng=torch.Generator().manual_seed(seed).get_state(),
            seeds=torch.zeros(0, dtype=torch.int64),
            projected_grads=torch.zeros(0, dtype=torch.float64),
        )

    def _anchor(self) -> torch.Tensor:
        """The parameter whose state holds the optimizer-wide tensors (base.py's convention)."""
        return self.param_groups[0]["params"][0]

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the counters keep their dtype: torch casts every non-"step" state tensor of a
        floating-point parameter to the parameter's dtype (the generator state must stay uint8, seeds int64)."""
        saved = dict(state_dict["state"].get(0, {}))  # index 0 is the anchor: first param of the first group
        super().load_state_dict(state_dict)
        state = self.state[self._anchor()]
        for key in ("step", "seed_rng", "seeds", "projected_grads"):
            if key in saved:
                state[key] = saved[key].detach().to("cpu", copy=True)

    def _params(self):
        """(param, group) in the protocol order: groups in order, params in order within a group."""
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def _draw_seeds(self) -> list[int]:
        state = self.state[self._anchor()]
        gen = torch.Generator()
        gen.set_state(state["seed_rng"])
        seeds = torch.randint(0, SEED_HIGH, (self.n_samples,), generator=gen, dtype=torch.int64)
        state["seed_rng"] = gen.get_state()
        return seeds.tolist()

    def _perturb_all(self, seed: int, scale: float) -> None:
        gen = noise_generators(seed)
        for p, _ in self._params():
            perturb_(p, gen(p.device), scale)

    @staticmethod
    def _loss(value):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
            return value.detach().reshape(())
        if isinstance(value, (int, float)):
            return float(value)
        raise ValueError(f"the closure must return a float or a 0-dim tensor, got {type(value).__name__}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float] | None = None):
        """One MeZO step: 2 · n_samples closure calls (under no_grad), then the update (3)/(4). Returns loss1."""
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss of a forward pass (no backward); "
                             "e.g. optimizer.step(lambda: model(**batch).loss)")
        seeds, grads, loss1 = self._draw_seeds(), [], None
        for seed in seeds:  # all samples are evaluated at the same θ (up to the restore's rounding)
            self._perturb_all(seed, self.eps)
            loss1 = self._loss(closure())
            self._perturb_all(seed, -2.0 * self.eps)
            loss2 = self._loss(closure())
            self._perturb_all(seed, self.eps)
            grads.append(projected_gradient(loss1, loss2, self.eps))
        n = len(seeds)
        for k, (seed, g) in enumerate(zip(seeds, grads)):
            gen = noise_generators(seed)
            for p, group in self._params():
                z = noise_like(p, gen(p.device))
                zo_update_(p, z, g / n, group["lr"], group["weight_decay"] if k == 0 else 0.0)
        state = self.state[self._anchor()]
        state["step"] = state["step"] + 1
        state["seeds"] = torch.tensor(seeds, dtype=torch.int64)
        state["projected_grads"] = torch.tensor(grads, dtype=torch.float64)
        return loss1

    def state_bytes(self, p: torch.Tensor | None = None, group: dict | None = None) -> int:
        """Bytes of optimizer state: none per parameter; the counters (step, seed-generator state, last seeds and
        projected gradients) on the anchor parameter. ``p=None``: the total. No moments, no gradients, no
        activations; the transient z is :meth:`transient_bytes`, not state."""
        if p is not None and p is not self._anchor():
            return 0
        return 8 + torch.Generator().get_state().numel() + 16 * self.n_samples

    def transient_bytes(self) -> int:
        """Peak extra memory during a step: one z the size of the largest parameter."""
        return max((p.numel() * p.element_size() for p, _ in self._params()), default=0)
