"""MixLoRA: every FFN becomes a sparse mixture of LoRA experts that share its frozen weights (Li et al. 2024,
arXiv 2404.15159; official code TUDB-Labs/MixLoRA and MoE-PEFT).

Per decoder layer, without touching model code:

* attention projections get ordinary, independent LoRA through peft (``adapter.r/alpha/dropout/target_modules``);
* the MLP is wrapped by :class:`MixLoraFFN` (peft's base-layer pattern: it holds the frozen MLP as ``base_layer``
  and calls its projections). Expert ``e`` is the frozen FFN with its own LoRA on gate_proj, up_proj and down_proj
  (``adapter.expert_lora``; Phi-3 fuses gate and up into one ``gate_up_proj`` whose output is chunked into g and u,
  and its experts put one LoRA on that, as the official code's ``_phi3_forward``; Phi-1/2's plain MLP gets LoRA on
  fc1 and fc2, as its ``_phi_forward``)::

      g_e = W_gate x + s B_g^e A_g^e drop(x)      u_e = W_up x + s B_u^e A_u^e drop(x)      a_e = act(g_e) * u_e
      out_e = W_down a_e + s B_d^e A_d^e drop(a_e)                                         (s = alpha / r)

* a bias-free fp32 router ``W_r`` (``moe_gate``, init N(0, router_init_range)): ``p = softmax(W_r x)``, the top-k
  experts are kept and their weights renormalised to sum to 1 (official ``model.py:210-217``), and
  ``y = sum_{e in topk(x)} w_e(x) out_e(x)``.

**Shared computation.** ``W_gate x`` and ``W_up x`` run once for all tokens and are shared by every expert (the
paper's high-throughput trick). We go one step further for ``W_down``: it is one frozen linear map shared by every
expert, so ``sum_e w_e W_down a_e = W_down (sum_e w_e a_e)`` and it runs once on all tokens too, on the
routing-weighted mix of the expert activations, instead of once per expert (the official code runs it top_k times per
token). The mix is accumulated around the first slot's activation (:func:`mix_slots`), so while every B is zero the
layer computes exactly what the base MLP computes: identity at init holds bit for bit, not just up to rounding.

**Batched experts.** No per-expert kernels and no host sync: the experts' LoRA matrices on one projection run as two
matmuls for all (slot, token) assignments. The stacked ``[A^1; ...; A^E] x`` gives every expert's r-dimensional
code; a one-hot mask of the router's choice (times the scale) keeps each assignment's own block and zeroes the rest;
``[B^1 ... B^E]`` on the masked codes is then exactly ``B^e A^e x`` for the chosen e (the block-diagonal form of the
per-expert products). Assignments are laid out slot-major, (top_k, tokens, features), so the frozen ``W_gate x``
broadcasts over the slots into the second product's accumulator (``baddbmm``), and the routing-weighted sum over
slots is element-wise over whole slots. The masked products cost E/top_k times the useful LoRA flops, a few
percent of the frozen FFN's at real widths (r E << hidden), for far fewer kernels: measured on the quickstart model,
the step went from 2.6x to about 1.4x LoRA's (bench/mixlora.py). No base layer ever sees an empty input: a
bitsandbytes 4-bit layer on CPU kills the process on one (a SIGFPE, seen with the official package's generate).

**dtypes** (MoE-PEFT's choices): router weights, routing and every LoRA matrix in fp32 whatever the base dtype; the
LoRA input is cast to fp32 and its output back to the base activation dtype; the router runs with autocast off.

**Load-balance loss** (:func:`aux_loss`): the HF-Mixtral formula MoE-PEFT uses
(``_mixtral_load_balancing_loss_func``), over the router logits of *all* layers concatenated along the token axis,
padding excluded, times ``router_aux_loss_coef``; the trainer adds it to each micro-batch's LM loss before the
gradient-accumulation weighting. It also tallies the router load that :func:`router_load` reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimtuneError
from ..recipe import MIXLORA_EXPERT_PROJECTIONS, MIXLORA_FUSED_PROJECTIONS, MIXLORA_PLAIN_PROJECTIONS, AdapterConfig

# The MLP layouts of the official code (MixLoRA package: _llama_forward, _phi3_forward, _phi_forward), by the
# projections each expert can adapt; the last one is the output projection.
LAYOUTS = {MIXLORA_EXPERT_PROJECTIONS: "gated", MIXLORA_FUSED_PROJECTIONS: "fused", MIXLORA_PLAIN_PROJECTIONS: "plain"}
SUPPORTED = ("Llama, Mistral, Qwen2/Qwen3, Gemma/Gemma2 (gate_proj, up_proj, down_proj), Phi-3 (gate_up_proj, "
             "down_proj) and Phi-1/2 (fc1, fc2), with the MLP at model.model.layers[i].mlp")


@dataclass(frozen=True)
class MixLoraSettings:
    """Everything that defines a MixLoRA adapter once it is resolved against a model (kept on the model as
    ``model.mixlora_settings``; saving writes it out, loading rebuilds the same adapter from it)."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    attention_targets: tuple[str, ...]  # leaf names inside self_attn that get plain LoRA (peft)
    expert_targets: tuple[str, ...]  # subset of the MLP's projections (mlp_projections) with per-expert LoRA
    num_experts: int
    top_k: int
    router_aux_loss_coef: float
    router_init_range: float
    jitter_noise: float
    expert_r: int
    expert_alpha: float
    expert_dropout: float
    act_fn: str


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """peft's (and the official code's) LoRA scale: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoraPair(nn.Module):
    """One expert's LoRA on one projection: ``s * B A drop(x)`` in fp32 (peft's conventions: kaiming-uniform A with
    a = sqrt(5), zero B, dropout on the input of A). Returns only the delta; the caller adds the frozen path."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool,
                 device: torch.device | None = None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = lora_scaling(alpha, r, use_rslora)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, experts), each (tokens, top_k): softmax in fp32, the top-k, renormalised to sum to 1."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


class MixLoraFFN(nn.Module):
    """A decoder MLP turned into a MixLoRA mixture of experts. Three layouts (:data:`LAYOUTS`): gated (gate_proj,
    up_proj, down_proj), Phi-3's fused gated (gate_up_proj chunked into g and u, down_proj) and Phi-1/2's plain
    ``fc2(act(fc1 x))``, where expert e is ``a_e = act(W_1 x + s B_1^e A_1^e x)``,
    ``out_e = W_2 a_e + s B_2^e A_2^e a_e``.

    ``router_logits`` holds the last forward's (tokens, experts) fp32 logits for :func:`aux_loss`; ``load_counts``
    (not saved) counts, per expert, the non-padding tokens routed to it since the last :func:`router_load`.
    """

    def __init__(self, base_layer: nn.Module, settings: MixLoraSettings, act_fn: nn.Module):
        super().__init__()
        projections = mlp_projections(base_layer)
        if projections is None:
            raise SlimtuneError(f"adapter.type mixlora supports the MLPs of {SUPPORTED}; {type(base_layer).__name__} "
                                "is none of them")
        self.layout, self.out_proj = LAYOUTS[projections], projections[-1]
        self.base_layer = base_layer
        self.act_fn = act_fn
        self.num_experts, self.top_k, self.jitter_noise = settings.num_experts, settings.top_k, settings.jitter_noise
        self.router_aux_loss_coef = settings.router_aux_loss_coef
        self.expert_targets = settings.expert_targets
        first = getattr(base_layer, projections[0])
        device = _weight_device(first)
        hidden, inner = first.in_features, first.out_features // (2 if self.layout == "fused" else 1)
        self.moe_gate = nn.Linear(hidden, settings.num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.moe_gate.weight, mean=0.0, std=settings.router_init_range)
        out_features = getattr(base_layer, self.out_proj).out_features
        shapes = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "gate_up_proj": (hidden, 2 * inner),
                  "fc1": (hidden, inner), "down_proj": (inner, out_features), "fc2": (inner, out_features)}
        self.experts = nn.ModuleList(
            nn.ModuleDict({proj: LoraPair(*shapes[proj], settings.expert_r, settings.expert_alpha,
                                          settings.expert_dropout, settings.use_rslora, device)
                           for proj in settings.expert_targets})
            for _ in range(settings.num_experts))
        self.register_buffer("load_counts", torch.zeros(settings.num_experts, dtype=torch.float64, device=device),
                             persistent=False)
        self.router_logits: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        base = self.base_layer
        if self.training and self.jitter_noise > 0:  # MoE-PEFT: training only (the package also jitters inference)
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.moe_gate.weight)
        self.router_logits = logits
        n_tokens = x.shape[0]
        if n_tokens == 0:  # nothing to route; a 4-bit base layer must not see an empty input
            return hidden_states.new_zeros(*shape[:-1], getattr(base, self.out_proj).out_features)
        weights, experts = route(logits, self.top_k)

        # the frozen projections run once for all tokens, shared by every expert
        if self.layout == "fused":  # Phi-3: one projection, chunked (Phi3MLP.forward)
            gate_up = base.gate_up_proj(x)
            gate, up = gate_up.chunk(2, dim=-1)
        elif self.layout == "gated":
            gate, up = base.gate_proj(x), base.up_proj(x)
        else:
            h = base.fc1(x)
        # Every expert's LoRA in one matmul per factor (see the module docstring), slot-major: (slot, token, ...)
        # lets the frozen output broadcast over the slots into the product's accumulator (baddbmm).
        chosen = F.one_hot(experts.t(), self.num_experts).to(torch.float32)  # (slot, token, expert)
        if self.layout == "plain":
            hs = h.unsqueeze(0)
            if "fc1" in self.expert_targets:
                hs = self._lora("fc1", x, chosen, base=h)
            a = self.act_fn(hs)  # a_e of every assignment, (slot, token, inner)
        else:
            if self.layout == "fused":
                gu = self._lora("gate_up_proj", x, chosen, base=gate_up) if "gate_up_proj" in self.expert_targets \
                    else gate_up.unsqueeze(0)
                g, u = gu.chunk(2, dim=-1)
            else:
                g, u = gate.unsqueeze(0), up.unsqueeze(0)
            if "gate_proj" in self.expert_targets:
                g = self._lora("gate_proj", x, chosen, base=gate)
            if "up_proj" in self.expert_targets:
                u = self._lora("up_proj", x, chosen, base=up)
            a = self.act_fn(g) * u  # a_e of every assignment, (slot or 1, token, inner)
        a = a.expand(self.top_k, n_tokens, a.shape[-1])
        # W_out (sum_e w_e a_e): once, for all tokens (its bias once: the weights sum to 1)
        out = getattr(base, self.out_proj)(mix_slots(a, weights))
        if self.out_proj in self.expert_targets:  # sum_e w_e s B^e A^e a_e, the slots' weights folded into the mask
            down = self._lora(self.out_proj, a, chosen * weights.t().unsqueeze(-1))
            out = out + down.to(out.dtype)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _lora(self, proj: str, inputs: torch.Tensor, mask: torch.Tensor, base: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The experts' LoRA on ``proj``, batched over experts and slots. ``mask`` (slot, token, expert) is the
        one-hot choice of expert e per (slot, token), times the routing weights for the output projection.

        * with ``base`` (token, out), the frozen projection's output, for the inputs shared by every slot (``inputs``
          is x, (token, in)): ``base + s B^e A^e drop(x)`` per assignment, as (slot, token, out);
        * without, for per-slot ``inputs`` (slot, token, in): ``sum_slot mask * s B^e A^e drop(input)``, as
          (token, out).

        All experts' A matrices stacked run as one matmul, the mask keeps each assignment's own r columns (zeroing
        the others) and the B matrices side by side run as a second: the block-diagonal form of the per-expert
        products, exact, with no host sync and no per-expert kernels. Dropout draws an independent mask for every
        assignment, as per-expert calls do."""
        pairs = [loras[proj] for loras in self.experts]
        a_stack = torch.cat([pair.lora_A.weight for pair in pairs])  # (E * r, in)
        b_side = torch.cat([pair.lora_B.weight for pair in pairs], dim=1)  # (out, E * r)
        x = inputs.to(a_stack.dtype)
        dropout = pairs[0].dropout
        if dropout.training and isinstance(dropout, nn.Dropout):  # in eval mode, one path whatever the rate
            x = dropout(x.expand(mask.shape[0], *x.shape) if x.dim() == 2 else x)  # every slot its own mask
        z = F.linear(x, a_stack)  # ([slot,] token, E * r)
        slots, n_tokens, n_experts = mask.shape
        mask = (mask * pairs[0].scaling).unsqueeze(-1)  # the scale on the small side of the product
        z = (z.view(-1, n_tokens, n_experts, z.shape[-1] // n_experts) * mask).flatten(2)  # (slot, token, E * r)
        if base is None:
            return F.linear(z.sum(0), b_side)
        if base.dtype == z.dtype:  # base + z B^T in the product's accumulator, broadcast over the slots
            return torch.baddbmm(base.unsqueeze(0), z, b_side.t().unsqueeze(0).expand(slots, -1, -1))
        return base.unsqueeze(0) + F.linear(z, b_side).to(base.dtype)  # a bf16 base: the LoRA cast, as peft does


def mix_slots(a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_s w_s a_s`` over the top-k slots of ``a`` (slot, token, inner), ``weights`` (token, slot) summing to 1,
    as ``a_0 + sum_{s>=1} w_s (a_s - a_0)`` in fp32, cast back to ``a``'s dtype.

    The same function of the router's probabilities (``w_0 = 1 - sum_{s>=1} w_s`` holds identically after the
    renormalisation, so values and gradients agree in exact arithmetic), and exact where it matters: while every B
    is zero all slots hold the base MLP's activation and the mix is that activation bit for bit (the official
    weighted sum of identical expert outputs is off by an ulp, since the renormalised weights need not sum to
    exactly 1.0 in floating point). Each slot after the first is one subtraction and one fused multiply-add."""
    slots = a.unbind(0)  # one stack in backward, where indexing would scatter each slot into a zeroed copy of a
    if len(slots) == 1:
        return slots[0]
    first, w = slots[0].float(), weights.to(torch.float32)
    mix = torch.addcmul(first, slots[1].float() - first, w[:, 1:2])
    for s in range(2, len(slots)):
        mix = torch.addcmul(mix, slots[s].float() - first, w[:, s:s + 1])
    return mix.to(a.dtype)


def _weight_device(layer: nn.Module) -> torch.device:
    return layer.weight.device


def mlp_projections(mlp: nn.Module) -> tuple[str, ...] | None:
    """The MLP's projection names MixLoRA's experts can adapt (a key of :data:`LAYOUTS`), or None for a layout the
    official code does not serve (GPT-2's Conv1D c_fc/c_proj, GPT-NeoX's dense_h_to_4h/dense_4h_to_h)."""
    if isinstance(mlp, MixLoraFFN):  # already adapted: the MLP it wraps
        mlp = mlp.base_layer
    for names in LAYOUTS:
        if all(isinstance(getattr(mlp, name, None), nn.Linear) for name in names):
            return names
    return None


# --------------------------------------------------------------------------------------------------- build
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, found as the offload engine finds them (:func:`slimtune.offload.blocks.decoder_layers`),
    which MixLoRA also needs at ``model.model.layers`` with ``self_attn`` and a supported ``mlp`` in each: the
    official format's keys (``mixlora.layers.{L}...``) and loader address them there."""
    from slimtune.offload.blocks import decoder_layers as find_layers
    from slimtune.offload.errors import UnsupportedModel

    try:
        prefix, layers = find_layers(model)
    except UnsupportedModel:
        prefix, layers = "", []
    if prefix != "model.layers" or not all(hasattr(layer, "mlp") and hasattr(layer, "self_attn")
                                           and mlp_projections(layer.mlp) for layer in layers):
        raise SlimtuneError(f"adapter.type mixlora supports the decoder MLPs of {SUPPORTED}; "
                            f"{type(model).__name__}'s is none of them; use adapter.type lora or qlora for it")
    return layers


def resolve_settings(model: nn.Module, cfg: AdapterConfig) -> MixLoraSettings:
    """``cfg`` (a recipe's ``adapter`` section with type mixlora) resolved against ``model``: which attention
    projections get LoRA, which MLP projections the experts adapt, the activation name."""
    from transformers.activations import ACT2FN

    if cfg.type != "mixlora":
        raise ValueError(f"resolve_settings needs adapter.type mixlora, got {cfg.type!r}")
    layer = decoder_layers(model)[0]
    attention = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in layer.self_attn.named_modules()
                                   if n and isinstance(m, nn.Linear)))  # model order: q, k, v, o
    mlp = mlp_projections(layer.mlp)
    if cfg.target_modules == "all-linear":
        attn_targets, expert_targets = tuple(attention), mlp
    else:
        names = list(cfg.target_modules)
        unknown = [n for n in names if n not in attention and n not in mlp]
        if unknown:
            raise SlimtuneError(f"adapter.target_modules: {', '.join(map(repr, unknown))} with adapter.type mixlora "
                                f"match no attention projection or MLP projection of this model; valid: "
                                f"{', '.join(attention + list(mlp))} (or all-linear)")
        attn_targets = tuple(n for n in attention if n in names)
        expert_targets = tuple(n for n in mlp if n in names)
        if not expert_targets:
            raise SlimtuneError("adapter.target_modules with adapter.type mixlora must name at least one of "
                                f"{', '.join(mlp)} (else every expert is the same frozen FFN)")
    act = cfg.act_fn or base_activation(model)
    if act not in ACT2FN:
        raise SlimtuneError(f"adapter.act_fn {act!r} is not a transformers activation; use one of "
                            f"{', '.join(sorted(ACT2FN))} (or null for the base model's)")
    if cfg.top_k > cfg.num_experts:
        raise SlimtuneError(f"adapter.top_k {cfg.top_k} exceeds adapter.num_experts {cfg.num_experts}")
    e = cfg.expert_lora
    return MixLoraSettings(
        r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_rslora=cfg.use_rslora, attention_targets=attn_targets,
        expert_targets=expert_targets, num_experts=cfg.num_experts, top_k=cfg.top_k,
        router_aux_loss_coef=cfg.router_aux_loss_coef, router_init_range=cfg.router_init_range,
        jitter_noise=cfg.jitter_noise, expert_r=e.r if e.r is not None else cfg.r,
        expert_alpha=e.alpha if e.alpha is not None else cfg.alpha,
        expert_dropout=e.dropout if e.dropout is not None else cfg.dropout, act_fn=act)


def base_activation(model: nn.Module) -> str:
    """The base model's MLP activation name (Gemma keeps it in ``hidden_activation``, the others in
    ``hidden_act``); MoE-PEFT fills a missing ``act_fn`` with it (``moe_peft/model.py:589-591``)."""
    config = model.config
    return getattr(config, "hidden_activation", None) or config.hidden_act


def apply_mixlora(model: nn.Module, cfg: AdapterConfig, quantized: bool) -> nn.Module:
    """Turn ``model`` (a Llama-family causal LM, fp32/bf16 or bitsandbytes 4-bit) into a MixLoRA model to train.

    The model is changed in place and returned (not wrapped): the base is frozen, the attention LoRA is injected by
    peft (``inject_adapter_in_model``), every ``layers[i].mlp`` is replaced by a :class:`MixLoraFFN` around it.
    Only the LoRA matrices and routers train, all in fp32.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if quantized and not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise ValueError("apply_mixlora(quantized=True) on a model without 4-bit layers; load it with quantized=True")
    if is_mixlora(model):
        raise ValueError("apply_mixlora: the model already has a MixLoRA adapter")
    settings = resolve_settings(model, cfg)
    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.attention_targets:
        prefix = _module_name(model, layers)
        names = [f"{prefix}.{i}.self_attn.{proj}" for i in range(len(layers)) for proj in settings.attention_targets]
        lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names,
                          use_rslora=settings.use_rslora, bias="none")
        inject_adapter_in_model(lora, model)
        for layer in layers:  # LoRA in fp32 whatever the base dtype (peft's autocast_adapter_dtype, MoE-PEFT)
            for name, p in layer.self_attn.named_parameters():
                if "lora_" in name:
                    p.data = p.data.float()
                    p.requires_grad_(True)
    act_fn = _activation(settings.act_fn)
    for layer in layers:
        layer.mlp = MixLoraFFN(layer.mlp, settings, act_fn)
    model.mixlora_settings = settings
    return model


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is target)


# --------------------------------------------------------------------------------------------------- training
def is_mixlora(model: nn.Module) -> bool:
    """Whether ``model`` carries a MixLoRA adapter (``apply_mixlora`` set its settings)."""
    return isinstance(getattr(model, "mixlora_settings", None), MixLoraSettings)


def mixlora_layers(model: nn.Module) -> list[MixLoraFFN]:
    """Every MixLoRA FFN of ``model`` in layer order ([] for a model without MixLoRA)."""
    return [m for m in model.modules() if isinstance(m, MixLoraFFN)]


def load_balancing_loss(router_logits: torch.Tensor, num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """HF-Mixtral load-balance loss as MoE-PEFT computes it (``_mixtral_load_balancing_loss_func``), without the
    coefficient: ``E * sum_{slot,e} f[slot,e] * P[e]``.

    ``router_logits`` is (layers * batch * seq, E): every layer's logits concatenated along the token axis.
    ``f[slot, e]`` is the fraction of tokens whose ``slot``-th choice is ``e``, ``P[e]`` the mean router
    probability of ``e``; both average over non-padding tokens when ``attention_mask`` (batch, seq; 1 = token) is
    given. Perfect balance gives ``top_k``.
    """
    probs = F.softmax(router_logits.float(), dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    chosen = F.one_hot(selected, num_experts).float()  # (tokens, top_k, E)
    if attention_mask is None:
        return num_experts * (chosen.mean(0) * probs.mean(0).unsqueeze(0)).sum()
    mask = attention_mask.reshape(-1).to(device=probs.device, dtype=probs.dtype)
    if router_logits.shape[0] % mask.numel():
        raise ValueError(f"router logits for {router_logits.shape[0]} tokens do not tile an attention mask of "
                         f"{mask.numel()} tokens")
    mask = mask.repeat(router_logits.shape[0] // mask.numel())  # the same mask for every layer
    denom = mask.sum()
    f = (chosen * mask[:, None, None]).sum(0) / denom
    p = (probs * mask[:, None]).sum(0) / denom
    return num_experts * (f * p.unsqueeze(0)).sum()


def aux_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor | float:
    """``router_aux_loss_coef`` x the load-balance loss of the last forward, over all MixLoRA layers (0.0 for a
    model without MixLoRA, so the trainer calls it unconditionally). Also tallies the router load (non-padding
    tokens per expert) that :func:`router_load` reports."""
    layers = mixlora_layers(model)
    if not layers:
        return 0.0
    if any(layer.router_logits is None for layer in layers):
        raise ValueError("aux_loss: run a forward pass of the model first")
    num_experts, top_k, coef = layers[0].num_experts, layers[0].top_k, layers[0].router_aux_loss_coef
    logits = torch.cat([layer.router_logits for layer in layers], dim=0)
    with torch.no_grad():
        n = layers[0].router_logits.shape[0]
        keep = None if attention_mask is None else attention_mask.reshape(-1).to(logits.device).bool()
        if keep is not None and keep.numel() != n:
            raise ValueError(f"aux_loss: attention mask of {keep.numel()} tokens for router logits of {n} tokens")
        for layer in layers:
            _, selected = torch.topk(layer.router_logits.detach(), layer.top_k, dim=-1)  # softmax keeps the order
            if keep is not None:
                selected = selected[keep]
            layer.load_counts += torch.bincount(selected.reshape(-1), minlength=layer.num_experts).to(
                layer.load_counts)
    if coef == 0:
        return 0.0
    return coef * load_balancing_loss(logits, num_experts, top_k, attention_mask)


def router_load(model: nn.Module, reset: bool = True) -> dict[str, list]:
    """Router load since the last call: for each expert, its share of the top-k assignments of non-padding
    training tokens. Each layer's shares sum to 1: perfect balance is 1/num_experts for every expert, and a
    collapsed router shows top_k experts near 1/top_k and the rest near 0. ``router_load`` averages the layers,
    ``router_load_per_layer`` lists them. {} without MixLoRA, or when nothing was tallied since the last call."""
    layers = mixlora_layers(model)
    if not layers or not all(float(layer.load_counts.sum()) > 0 for layer in layers):
        return {}
    per_layer = [(layer.load_counts / layer.load_counts.sum()).tolist() for layer in layers]
    if reset:
        for layer in layers:
            layer.load_counts.zero_()
    mean = [sum(col) / len(per_layer) for col in zip(*per_layer)]
    return {"router_load": [round(v, 5) for v in mean],
            "router_load_per_layer": [[round(v, 5) for v in row] for row in per_layer]}
