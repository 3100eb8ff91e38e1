"""Byte sizes of a recipe's model, block by block, without materializing a single weight.

The model is built from its config with torch's ``FakeTensorMode`` (the shape-only tensors ``torch.compile`` and
``torch.export`` trace with: meta storage, a ``cpu`` device tag so autocast applies), the recipe's adapter is
applied with the trainer's own :func:`~slimtune.finetune.adapters.apply_adapter` (so peft decides which modules get
LoRA, exactly as in training), the recipe's optimizer is built over meta stand-ins of the trainable parameters and
asked for :meth:`state_bytes`, and one micro-batch runs forward on fake tensors to count what autograd saves.

Blocks are the engine's unit of placement (:func:`.blocks.model_blocks`): ``embed``, ``layers.0`` .. ``layers.{L-1}``,
``head``; a tied LM head weight belongs to ``embed``.

**4-bit bases** (QLoRA). Which linear layers bitsandbytes quantizes is transformers' own rule
(``get_keys_to_not_convert``: the LM head and tied weights stay in ``model.dtype``). A quantized weight of ``n``
values is stored as bitsandbytes 0.50 stores it (``functional.quantize_4bit``, blocksize 64; double quantization
re-quantizes the absmax with blocksize 256):

* packed codes: ``ceil(n / 2)`` uint8 (the ``Params4bit`` parameter; this is what the engine streams),
* absmax: ``ceil(n / 64)`` fp32, or with double quantization ``ceil(n / 64)`` uint8 + ``ceil(n / 64 / 256)`` fp32
  nested absmax + a 256-entry fp32 nested code + one fp32 offset,
* the 16-entry fp32 NF4/FP4 code.

The quant state stays resident on the compute device when the block streams (see ``offload/stream/streamer.py``).

**Activations** are counted, not modelled: the fake forward runs under ``saved_tensors_hooks`` and each distinct
storage autograd saves is attributed to the block running at the time (the loss and its fp32 logits belong to
``head``). For one micro-batch of ``B = per_device_train_batch_size`` rows of ``S = data.max_length`` tokens (the
collator pads to the longest row, so this is the worst case) the plan then uses

* without activation checkpointing: ``sum_b saved_b``,
* with per-block checkpointing (``training.gradient_checkpointing``, or any streamed block):
  ``saved_embed + saved_head + sum_layers input_l + max_layers saved_l`` (each layer keeps its inputs, the
  residual stream and the shared rotary/mask tensors once; backward recomputes one layer at a time),

plus, in both cases, the largest single saved tensor once more (its gradient exists next to it in backward).
Stand-ins: a 4-bit layer runs as a plain linear in ``model.dtype``; attention uses sdpa's CPU kernel (on CUDA,
flash/efficient kernels save a little less). Should the fake forward fail (e.g. data-dependent routing), the plan
says so and counts the base model's activations without the adapter.

**Vocabulary of an inline architecture.** The trainer sizes the inline model's vocabulary from the tokenizer it
trains on the data. ``<output_dir>/base_model/config.json`` (written by a previous run) is used when present;
otherwise ``model.tokenizer``'s length if one is set, else ``model.tokenizer_vocab_size``, an upper bound (a BPE
trained on little text stops early: the quickstart asks for 1024 and gets 602). Pass ``config=`` (the built model's
config) for exact numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimtune.offload.plan_inputs import BlockSize, ModelSizes
from slimtune.offload.units import format_size

from .errors import SlimtuneError, first_line
from .paths import is_local_model

if TYPE_CHECKING:
    from .recipe import Recipe

NF4_BLOCKSIZE = 64        # bitsandbytes 0.50 Params4bit / quantize_4bit default
NESTED_BLOCKSIZE = 256    # double quantization of the absmax (functional.quantize_4bit: quantize_blockwise(.., 256))
NF4_CODE_BYTES = 16 * 4   # the 16-value fp32 quant map
NESTED_CODE_BYTES = 256 * 4
DTYPES = ("float32", "bfloat16", "float16")


def nf4_bytes(n: int, double_quant: bool) -> tuple[int, int]:
    """(packed code bytes, quant-state bytes) of one 4-bit weight of ``n`` values, as bitsandbytes stores it."""
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    if double_quant:
        state = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + 4 + NF4_CODE_BYTES
    else:
        state = 4 * blocks + NF4_CODE_BYTES
    return (n + 1) // 2, state


# ------------------------------------------------------------------------------------------------- config
def model_config(recipe: Recipe, notes: list[str] | None = None):
    """The transformers config of the recipe's base model (no weights, no network unless the hub is reachable)."""
    from transformers import AutoConfig, LlamaConfig

    notes = notes if notes is not None else []
    m = recipe.model
    if m.architecture is not None:
        saved = Path(recipe.output.output_dir) / "base_model"
        if (saved / "config.json").is_file():
            notes.append(f"inline model: config (vocabulary) read from {saved / 'config.json'}")
            return AutoConfig.from_pretrained(str(saved))
        arch = m.architecture.model_dump(exclude={"type"})
        if arch["num_key_value_heads"] is None:
            arch.pop("num_key_value_heads")
        vocab = _tokenizer_length(m) if m.tokenizer else m.tokenizer_vocab_size
        if not m.tokenizer:
            notes.append(f"inline model: vocabulary {vocab} assumed (model.tokenizer_vocab_size, an upper bound: the "
                         "tokenizer trained on the data may stop earlier)")
        return LlamaConfig(vocab_size=vocab, **arch)
    kwargs: dict[str, Any] = {}
    if m.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if m.revision:
        kwargs["revision"] = m.revision
    source = m.name_or_path
    local = is_local_model(source)
    if local and not (Path(source).expanduser() / "config.json").is_file():
        raise SlimtuneError(f"model.name_or_path: {source} has no config.json (give a model directory written by "
                            "save_pretrained, or a hub id)")
    try:
        return AutoConfig.from_pretrained(str(Path(source).expanduser()) if local else source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SlimtuneError(
            f"model.name_or_path: cannot read the config of {source!r} ({first_line(exc)}). Planning needs only its "
            f"config.json: run once with network access (or `huggingface-cli download {source} config.json`), "
            "or point model.name_or_path at a local directory holding it") from None


def _tokenizer_length(m) -> int:
    from transformers import AutoTokenizer

    try:
        source = m.tokenizer
        return len(AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if is_local_model(source) else source))
    except (OSError, ValueError) as exc:
        raise SlimtuneError(f"model.tokenizer: cannot load {m.tokenizer!r} to size the vocabulary: {exc}") from None


# ------------------------------------------------------------------------------------------------- sizes
def block_sizes(recipe: Recipe, config=None) -> ModelSizes:
    """Per-block sizes of ``recipe``'s model (see the module docstring); ``config`` overrides the recipe's.

    Base weights are sized on the whole model (meta tensors: no time, no memory). The adapter, the optimizer's
    parameter list and the forward run on a two-layer copy when every decoder layer is alike (same parameters,
    same module types, one ``layer_types`` kind): peft's injection and a shape-only forward cost time per module,
    and layers 1..L-1 of such a stack are copies of layer 1 (layer 0 differs only in owning the tensors it shares
    with the rest). The optimizer is still built over every trainable parameter of the full model, so methods whose
    state depends on the whole list (FRUGAL blockwise) are exact.
    """
    import torch

    from slimtune.offload.blocks import decoder_layers, flat_layout, model_blocks
    from slimtune.offload.updates.offloaded_blocks import staging_groups
    from slimtune.optimizers import elementwise_params

    notes: list[str] = []
    if config is None:
        config = model_config(recipe, notes)
    m, t = recipe.model, recipe.training
    base = _build(config, m)
    n_layers = len(decoder_layers(base)[1])
    small = _two_layer_config(config, base) if n_layers > 2 else None
    quantized = _quantized_linears(base) if recipe.quantized else set()
    # the adapter on a fresh (small) copy, base stays bare; adapter none only marks every parameter trainable
    model = _adapt(_build(small or config, m), recipe)
    stands = ([[0], [1], list(range(2, n_layers + 1)), [n_layers + 1]] if small is not None
              else [[i] for i in range(n_layers + 2)])  # full-model blocks each of model's blocks stands for
    prefix = decoder_layers(model)[0]
    trainable: list[tuple[int, str, torch.Size, torch.dtype]] = []
    for block, targets in zip(model_blocks(model), stands):
        for j in targets:  # in the full model's parameter order (FRUGAL blockwise picks by position)
            trainable += [(j, name.replace(f"{prefix}.1.", f"{prefix}.{j - 1}.", 1) if j > 2 else name, p.shape,
                           p.dtype) for name, p in block.params if p.requires_grad]
    named = [(n, shape, dtype) for _, n, shape, dtype in trainable]
    state, state32, scratch, scratch32 = _optimizer_state(recipe, named)
    groups = staging_groups([[(n, shape.numel()) for j, n, shape, _ in trainable if j == i]
                             for i in range(n_layers + 2)])
    chunkable = elementwise_params(recipe.optimizer.name, [(n, torch.empty(shape, device="meta").requires_grad_())
                                                           for _, n, shape, _ in trainable],
                                   recipe.optimizer.model_dump())
    chunk = recipe.offload.staging_chunk // 4 if chunkable else None  # values of fp32 masters per unit
    units = _staging_units(recipe, groups, {n: (shape, dtype) for _, n, shape, dtype in trainable}, state32, chunk,
                           chunkable)
    small_acts = _activations(recipe, model, small or config, notes)
    acts = {j: a for a, targets in zip(small_acts, stands) for j in targets}
    tokens = t.per_device_train_batch_size * recipe.data.max_length
    base_blocks = model_blocks(base)
    owner = {id(p): name for name, mod in base.named_modules() for p in mod.parameters(recurse=False)}
    matmul = _matmul_params(base, decoder_layers(base)[0], n_layers)
    dq = m.quantization.double_quant
    out = []
    for i, block in enumerate(base_blocks):
        count = nbytes = qstate = 0
        streamed = []
        for name, p in block.params:
            count += p.numel()
            if owner.get(id(p)) in quantized and name.endswith("weight"):
                codes, qs = nf4_bytes(p.numel(), dq)
                nbytes, qstate = nbytes + codes + qs, qstate + qs
                streamed.append(torch.empty(codes, dtype=torch.uint8, device="meta"))
            else:
                nbytes += p.numel() * p.element_size()
                streamed.append(torch.empty(p.shape, dtype=p.dtype, device="meta"))
        mine = [(n, shape.numel() * _itemsize(dtype)) for j, n, shape, dtype in trainable if j == i]
        t_count = sum(shape.numel() for j, _, shape, _ in trainable if j == i)
        t_bytes = sum(size for _, size in mine)
        out.append(BlockSize(
            block.name, count, nbytes, flat_layout(streamed)[1] if streamed else 0, qstate,
            t_bytes if recipe.adapter.type != "none" else 0, t_count, t_bytes,
            sum(state[n] for n, _ in mine), sum(state32[n] for n, _ in mine), max((s for _, s in mine), default=0),
            matmul[i], *acts[i], tokens,
            tuple((count, unit_state) for b, count, unit_state in units if b == i),
            largest_count=max((p.numel() for _, p in block.params), default=0),
            scratch_bytes=max((scratch[n] for n, _ in mine), default=0),
            scratch_bytes_fp32=max((scratch32[n] for n, _ in mine), default=0)))
    total = sum(b.param_bytes + b.adapter_bytes for b in out)
    return ModelSizes(out, notes, source=f"{type(base).__name__}, {n_layers} layers, "
                                         f"{format_size(total)} of parameters")


def _staging_units(recipe, groups: list[tuple[int, list[str]]], tensors: dict, state32: dict[str, int],
                   chunk: int | None, chunkable: set[str]) -> list[tuple[int, int, int]]:
    """(block, values, fp32-master state bytes) per staging unit of the offloaded update, as the engine splits
    ``groups`` (``offloaded_blocks.staging_units``): with ``chunk`` (values per unit) large ``chunkable`` tensors
    (the optimizer's element-wise ones) become row chunks, whose state the optimizer's own ``state_bytes`` sizes on
    a chunk-shaped stand-in."""
    import math

    import torch

    from slimtune.offload.updates.offloaded_blocks import row_slice, staging_units

    pieces = []  # (block, [(name, rows, chunk shape)]) per unit
    for b, names in groups:
        for entries in staging_units([tensors[n][0] for n in names], chunk, [n in chunkable for n in names]):
            pieces.append((b, [(names[j], rows, row_slice(torch.empty(tensors[names[j]][0], device="meta"),
                                                          rows).shape) for j, rows in entries]))
    chunks = {f"{n}[{r.start}:{r.stop}]": (shape, tensors[n][1]) for _, unit in pieces for n, r, shape in unit
              if r is not None}
    chunk_state = _optimizer_state(recipe, [(k, shape, dtype) for k, (shape, dtype) in chunks.items()])[1]
    return [(b, sum(math.prod(shape) for _, _, shape in unit),
             sum(state32[n] if r is None else chunk_state[f"{n}[{r.start}:{r.stop}]"] for n, r, _ in unit))
            for b, unit in pieces]


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _two_layer_config(config, model):
    """A copy of ``config`` with two decoder layers when all of ``model``'s layers are alike, else None."""
    import copy

    from slimtune.offload.blocks import decoder_layers

    _, layers = decoder_layers(model)

    def signature(layer):
        return (tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()),
                tuple((n, type(mod).__name__) for n, mod in layer.named_modules()))

    first = signature(layers[1])
    kinds = getattr(config, "layer_types", None)
    if any(signature(layer) != first for layer in layers[2:]) or (kinds and len(set(kinds)) > 1) \
            or not hasattr(config, "num_hidden_layers"):
        return None
    small = copy.deepcopy(config)
    small.num_hidden_layers = 2
    if kinds:
        small.layer_types = list(kinds)[:2]
    return small


def _build(config, m):
    """The base model on the meta device (shapes and dtypes only), in training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": getattr(torch, m.dtype)}
    if m.trust_remote_code:
        kwargs["trust_remote_code"] = True
    # The attention the trainer's from_pretrained gets: the recipe's, else transformers' own default (sdpa where the
    # model supports it, else eager: Gemma2 refuses sdpa). flash_attention_2 cannot run on fake CPU tensors: sdpa's
    # CPU kernel stands in (it saves what flash saves: output + lse), or the default where sdpa is not supported.
    choices = {"flash_attention_2": ["sdpa", None]}.get(m.attn_implementation, [m.attn_implementation])
    for k, attn in enumerate(choices):
        if attn is not None:
            kwargs["attn_implementation"] = attn
        else:
            kwargs.pop("attn_implementation", None)
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
            break
        except (ValueError, ImportError, OSError) as exc:
            if k + 1 < len(choices):
                continue
            raise SlimtuneError(f"model: cannot build {type(config).__name__} as a causal LM for planning: "
                                f"{first_line(exc)}") from None
    model.train()
    return model


def _quantized_linears(model) -> set[str]:
    """Names of the linear layers transformers would replace by bitsandbytes ``Linear4bit`` (its own rule)."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = get_keys_to_not_convert(model)
    return {name for name, mod in model.named_modules()
            if type(mod) is nn.Linear and should_convert_module(name, skip)}


def _adapt(model, recipe):
    """The recipe's adapter on the fake model, through the trainer's own registry (peft for lora/qlora)."""
    import warnings

    from .adapters import apply_adapter

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        # quantized=False: the stand-in's linear layers are plain (LoRA shapes and dtypes are the same on Linear4bit)
        return apply_adapter(model, recipe.adapter, False)


def _optimizer_state(recipe, named: list) -> tuple[dict[str, int], ...]:
    """Optimizer-state bytes per trainable parameter name, over the parameters as they are and over fp32 masters;
    then the temporary bytes one update allocates beyond that state (``scratch_bytes``), the same two ways.

    ``named``: (name, shape, dtype) of every trainable parameter, in the model's order. The recipe's optimizer is
    built (as the trainer builds it) over meta stand-ins with those names, shapes and dtypes, so every method's own
    ``state_bytes(p, group)`` answers: GaLore's depends on rank and shape, FRUGAL's on the subspace, MeZO has none.
    """
    import torch

    from slimtune.optimizers import SEEDED, build_optimizer

    o, t = recipe.optimizer, recipe.training
    hparams = o.model_dump(exclude={"name"})
    if o.name in SEEDED:  # seeded like the trainer
        hparams["seed"] = t.seed
    result, scratch = [], []
    for as_fp32 in (False, True):
        stand = [(n, torch.nn.Parameter(torch.empty(shape, dtype=torch.float32 if as_fp32 else dtype,
                                                    device="meta"))) for n, shape, dtype in named]
        if not stand:
            result.append({})
            scratch.append({})
            continue
        opt = build_optimizer(o.name, stand, lr=t.learning_rate, weight_decay=t.weight_decay, **hparams)
        opt.state.clear()  # state drawn at construction (SPAM's masks) is meta here: predict from the settings
        by_id = {id(p): n for n, p in stand}
        sizes, temporary = {}, {}
        for group in opt.param_groups:
            for p in group["params"]:
                sizes[by_id[id(p)]] = (opt.state_bytes(p, group) if hasattr(opt, "state_bytes")
                                       else 2 * p.numel() * p.element_size() + 4)  # torch.optim.AdamW
                temporary[by_id[id(p)]] = opt.scratch_bytes(p, group) if hasattr(opt, "scratch_bytes") else 0
        result.append(sizes)
        scratch.append(temporary)
    return result[0], result[1], scratch[0], scratch[1]


def _matmul_params(model, prefix: str, n_layers: int) -> list[int]:
    """Weights of linear layers per block (embed, layers..., head): 2 FLOPs per weight per token forward."""
    from torch import nn

    out = [0] * (n_layers + 2)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and type(mod).__module__.startswith("torch"):
            if name.startswith(prefix + "."):
                out[1 + int(name[len(prefix) + 1:].split(".", 1)[0])] += mod.weight.numel()
            else:
                out[-1] += mod.weight.numel()
    return out


def _activations(recipe, model, config, notes) -> list[tuple[int, int, int]]:
    """Per block of ``model``: (saved bytes, checkpoint-input bytes, largest saved storage) for one micro-batch."""
    from slimtune.offload.blocks import model_blocks

    try:
        return _count_saved(recipe, model, model_blocks(model))
    except Exception as exc:  # noqa: BLE001 - any failure of a stand-in forward: fall back, and say so
        notes.append(f"activations: the adapter's forward could not run on shape-only tensors "
                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); the base model's are counted")
        base = _build(config, recipe.model)
        return _count_saved(recipe, base, model_blocks(base))


def _fake(model):
    """Swap the meta model's parameters and buffers for fake CPU tensors in place (ties kept); return the mode.

    Fake tensors carry a device, so CPU autocast applies to them as in training; ``Module.to`` cannot do this swap
    (it refuses fake parameters), hence the direct assignment.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    convert = mode.fake_tensor_converter.from_meta_and_device
    cpu, done = torch.device("cpu"), {}
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(convert(mode, p.data, cpu), requires_grad=p.requires_grad)
                mod._parameters[key] = done[id(p)]
        for key, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "meta":
                mod._buffers[key] = convert(mode, b, cpu)
    return mode


def _count_saved(recipe, model, blocks) -> dict[str, tuple[int, int, int]]:
    import contextlib

    import torch

    mode = _fake(model)
    t, d = recipe.training, recipe.data
    names = [b.name for b in blocks]
    saved = {n: 0 for n in names}
    inputs = {n: 0 for n in names}
    largest = {n: 0 for n in names}
    # Weights are not activations: their storages are excluded (an autocast copy of a weight is a new storage and
    # does count: it is held until backward).
    weights = {x.untyped_storage()._cdata for x in list(model.parameters()) + list(model.buffers())}
    seen_saved, seen_inputs = set(weights), set(weights)
    current = ["embed"]

    def account(tensor, table, seen) -> int:
        st = tensor.untyped_storage()
        if st._cdata in seen:
            return 0
        seen.add(st._cdata)
        table[current[0]] += st.nbytes()
        return st.nbytes()

    def pack(tensor):
        n = account(tensor, saved, seen_saved)
        largest[current[0]] = max(largest[current[0]], n)
        return tensor

    def pre_hook(index):
        def hook(module, args, kwargs):
            current[0] = f"layers.{index}"
            for value in list(args) + list(kwargs.values()):
                for x in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(x, torch.Tensor):
                        account(x, inputs, seen_inputs)
        return hook

    def post_hook(module, args, output):
        current[0] = "head"

    layers = [b.module for b in blocks[1:-1]]
    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post_hook))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if t.bf16 else contextlib.nullcontext()
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast:
            ids = torch.zeros(t.per_device_train_batch_size, d.max_length, dtype=torch.long)
            mask = torch.ones_like(ids)
            for x in (ids, mask):  # the batch itself belongs to the data pipeline, not to the model
                seen_saved.add(x.untyped_storage()._cdata)
                seen_inputs.add(x.untyped_storage()._cdata)
            model(input_ids=ids, attention_mask=mask, labels=ids)
    finally:
        for h in handles:
            h.remove()
    return [(saved[n], inputs[n], largest[n]) for n in names]

