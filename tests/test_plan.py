"""The offload planner: recipe fields, sizes without weights (checked against real models, real peft, real optimizer
state and a real forward), placement escalation, refusals with numbers, and ``slimtune plan``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from slimtune.cli.main import main
from slimtune.finetune.adapters import apply_adapter
from slimtune.finetune.errors import RecipeError, SlimtuneError
from slimtune.finetune.model import load_model
from slimtune.finetune.planning import plan_recipe as make_plan
from slimtune.finetune.recipe import recipe_from_dict
from slimtune.finetune.sizing import block_sizes
from slimtune.offload import PlanError, parse_bytes
from slimtune.offload.blocks import flat_layout, model_blocks
from slimtune.optimizers import allocated_state_bytes, build_optimizer

# Bandwidths passed in, so plans are deterministic and nothing is measured (bytes/s, FLOP/s).
BW = {"flops": 1e11, "memcpy": 1e10, "cpu->gpu": 2e10, "gpu->cpu": 2e10, "nvme->cpu": 2e9, "cpu->nvme": 1e9}


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory, tiny_tokenizer, tiny_arch):
    """A saved 4-layer tiny Llama: more than two layers, so the planner's two-layer shortcut is exercised."""
    from slimtune.finetune.model import build_base_model
    from slimtune.finetune.recipe import ModelConfig

    config = ModelConfig(architecture=tiny_arch(num_hidden_layers=4), tokenizer_vocab_size=320)
    return build_base_model(config, tiny_tokenizer, seed=0, save_dir=tmp_path_factory.mktemp("deep"))


def recipe_dict(model_dir, **sections) -> dict:
    d = {"model": {"name_or_path": str(model_dir)}, "adapter": {"type": "lora", "r": 4},
         "data": {"path": "unused.jsonl", "max_length": 16}, "offload": {"device": "cpu"},
         "training": {"per_device_train_batch_size": 2, "max_grad_norm": 0}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value}
    return d


def make_recipe(model_dir, **sections):
    return recipe_from_dict(recipe_dict(model_dir, **sections))


# --------------------------------------------------------------------------------------------------- recipe
@pytest.mark.parametrize("text,expected", [(8_000_000_000, 8_000_000_000), ("20GB", 20 * 10**9),
                                           ("20GiB", 20 * 2**30), ("512MiB", 512 * 2**20), ("1.5 GB", 1_500_000_000),
                                           ("23.5GiB", int(23.5 * 2**30)), ("4096", 4096), ("1e9", 10**9),
                                           ("7kb", 7000), (3.0, 3)])
def test_parse_bytes_accepts_decimal_and_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["20G", "lots", "-1GB", -5, True, "1.5", 2.5, None, "GB"])
def test_parse_bytes_refuses_with_the_accepted_forms(bad):
    with pytest.raises(ValueError, match="GiB"):
        parse_bytes(bad)


@pytest.mark.parametrize("offload,optimizer,key", [
    ({"gpu_memory": "20G"}, None, "offload.gpu_memory: '20G'"),
    ({"cpu_memory": "-3GB"}, None, "offload.cpu_memory"),
    ({"gradients": "nvme"}, None, "offload.gradients: nvme is not a place for gradients"),
    ({"params": "nvme"}, None, "offload.params nvme needs offload.nvme_dir"),
    ({"optimizer_state": "nvme"}, None, "offload.optimizer_state nvme needs offload.nvme_dir"),
    ({"prefetch": 0}, None, "offload.prefetch"),
    ({"params": "disk"}, None, "offload.params: 'disk' is not allowed"),
    ({"gradients": "cpu"}, {"name": "mezo"}, "offload.gradients cpu with optimizer mezo"),
    ({"gradients": "cpu", "optimizer_state": "gpu"}, None, "offload.gradients cpu with offload.optimizer_state gpu"),
    ({"gpu_memory": "2GB", "cpu_memory": "1GB"}, None, "offload.gpu_memory 2000000000 exceeds offload.cpu_memory"),
])
def test_offload_recipe_errors_name_the_key(tmp_path, offload, optimizer, key):
    sections = {"offload": offload} | ({"optimizer": optimizer} if optimizer else {})
    with pytest.raises(RecipeError) as info:
        make_recipe(tmp_path, **sections)
    assert key in str(info.value)


def test_offload_sizes_are_stored_in_bytes(tmp_path):
    r = make_recipe(tmp_path, offload={"gpu_memory": "20GiB", "cpu_memory": "auto", "prefetch": 2})
    assert (r.offload.gpu_memory, r.offload.cpu_memory, r.offload.prefetch) == (20 * 2**30, "auto", 2)


def test_validate_stays_free_of_torch():
    code = ("import sys; from slimtune.finetune.recipe import recipe_from_dict; "
            "recipe_from_dict({'model': {'name_or_path': 'x'}, 'data': {'path': 'd.jsonl'}, "
            "'offload': {'gpu_memory': '20GB', 'params': 'cpu'}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------- sizes
def real_model(r):
    model = load_model(r.model, r.model.name_or_path, torch.device("cpu"), r.quantized, False)
    return apply_adapter(model, r.adapter, r.quantized)


def stored_bytes(p) -> int:
    """A parameter's bytes as held in memory: bnb 4-bit adds its quant-state tensors (absmax, codes, nested)."""
    n = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        extra = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
        n += sum(t.numel() * t.element_size() for t in extra)
    return n


@pytest.mark.parametrize("adapter,dtype,extra", [
    ("lora", "float32", {}),
    ("none", "bfloat16", {}),
    ("qlora", "bfloat16", {}),
    ("qlora", "float32", {"target_modules": ["q_proj", "down_proj"], "modules_to_save": ["lm_head"]}),
])
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_block_sizes_match_the_materialized_model(deep_dir, adapter, dtype, extra):
    r = make_recipe(deep_dir, adapter={"type": adapter, "r": 4, **extra}, model={"dtype": dtype},
                    training={"bf16": dtype == "bfloat16"})
    sizes = block_sizes(r)
    model = real_model(r)
    for size, block in zip(sizes, model_blocks(model), strict=True):
        assert size.name == block.name
        frozen = [p for _, p in block.params if not p.requires_grad]
        base = [p for _, p in block.params if adapter == "none" or not p.requires_grad]
        assert size.param_bytes == sum(stored_bytes(p) for p in base), block.name
        assert size.trainable_count == sum(p.numel() for _, p in block.params if p.requires_grad), block.name
        assert size.adapter_bytes == (0 if adapter == "none" else
                                      sum(stored_bytes(p) for _, p in block.params if p.requires_grad))
        if adapter != "none" and frozen:  # what the streamer packs for a layer (offload/stream/streamer.py)
            assert size.stream_bytes == flat_layout(frozen)[1], block.name
    if adapter != "none":
        assert sum(s.trainable_count for s in sizes) == model.get_nb_trainable_parameters()[0]
    if r.quantized:
        assert all(s.quant_state_bytes > 0 for s in sizes[1:-1])


def saved_activation_bytes(model, r) -> int:
    """Distinct storages autograd saves in one real forward of a padded batch (weights and the batch excluded)."""
    model.train()
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return t

    b, s = r.training.per_device_train_batch_size, r.data.max_length
    ids = torch.randint(3, 300, (b, s))
    mask = torch.ones_like(ids)
    mask[0, s // 2:] = 0  # one padded row, as the collator makes
    skip |= {ids.untyped_storage().data_ptr(), mask.untyped_storage().data_ptr()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=r.training.bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), autocast:
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("adapter,bf16", [("lora", False), ("none", True)])
def test_activation_bytes_match_a_real_forward(deep_dir, adapter, bf16):
    r = make_recipe(deep_dir, adapter={"type": adapter, "r": 4, "dropout": 0.1}, training={"bf16": bf16},
                    data={"max_length": 32})
    sizes = block_sizes(r)
    assert sum(s.act_saved_bytes for s in sizes) == saved_activation_bytes(real_model(r), r)
    assert sizes[-1].act_largest_bytes >= 2 * 32 * 320 * 4  # the fp32 logits of the loss live in "head"


@pytest.mark.parametrize("adapter,optimizer", [("none", {"name": "adamw"}), ("lora", {"name": "galore", "rank": 2}),
                                               ("none", {"name": "spam", "density": 0.5}),
                                               ("none", {"name": "frugal", "proj_type": "blockwise"}),
                                               ("none", {"name": "mezo"})])
def test_optimizer_state_bytes_match_what_one_step_allocates(deep_dir, tiny_batch, adapter, optimizer):
    r = make_recipe(deep_dir, adapter={"type": adapter}, optimizer=optimizer)
    bf16 = make_recipe(deep_dir, adapter={"type": adapter}, optimizer=optimizer, model={"dtype": "bfloat16"})
    sizes, sizes16 = block_sizes(r), block_sizes(bf16)
    model = real_model(r)
    hparams = r.optimizer.model_dump(exclude={"name"})
    if r.optimizer.name in ("frugal", "spam", "mezo"):
        hparams["seed"] = r.training.seed
    opt = build_optimizer(r.optimizer.name, [(n, p) for n, p in model.named_parameters() if p.requires_grad],
                          lr=1e-3, weight_decay=0.0, **hparams)
    if r.optimizer.name == "mezo":
        opt.step(lambda: float(model(**tiny_batch).loss))
    else:
        model(**tiny_batch).loss.backward()
        opt.step()
    for size, size16, block in zip(sizes, sizes16, model_blocks(model), strict=True):
        real = sum(allocated_state_bytes(opt, p) for _, p in block.params if p.requires_grad)
        assert size.state_bytes == real, block.name
        # a bf16 model's offloaded update keeps fp32 masters, and its state is the fp32 model's
        assert size16.state_bytes_fp32 == real, block.name
        assert size16.master_bytes == 4 * size.trainable_count


def test_galore_plan_counts_the_svd_of_a_projector_refresh(deep_dir):
    """A refresh step's SVD (svd_scratch_bytes of the largest projected weight) is in the plan: whole for the
    in-memory update; on the offloaded one only what exceeds the gradients that step does not hold (its updates run
    one at a time), and for the fp32 masters it updates."""
    from slimtune.optimizers.projection import svd_scratch_bytes

    r = make_recipe(deep_dir, adapter={"type": "none"}, optimizer={"name": "galore", "rank": 2},
                    model={"dtype": "bfloat16"})
    model = real_model(r)
    opt = build_optimizer("galore", [(n, p) for n, p in model.named_parameters()], lr=1e-3, weight_decay=0.0,
                          **r.optimizer.model_dump(exclude={"name"}))
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    svd = max(svd_scratch_bytes(tuple(p.shape), p.dtype) for p in projected)
    svd32 = max(svd_scratch_bytes(tuple(p.shape), torch.float32) for p in projected)
    assert svd32 < svd  # a bf16 gradient is widened first
    adamw = make_plan(make_recipe(deep_dir, adapter={"type": "none"}, model={"dtype": "bfloat16"}),
                      bandwidths=BW, runtime_bytes=0)
    plan = make_plan(r, bandwidths=BW, runtime_bytes=0)
    assert placement(plan) == placement(adamw) == ("gpu", "gpu", "gpu")
    assert plan.breakdown["gpu"]["buffers"] == adamw.breakdown["gpu"]["buffers"] + svd
    off = {"optimizer_state": "cpu", "gradients": "cpu"}
    plan = make_plan(make_recipe(deep_dir, adapter={"type": "none"}, optimizer={"name": "galore", "rank": 2},
                                 model={"dtype": "bfloat16"}, offload=off), bandwidths=BW, runtime_bytes=0)
    grads = [b.grad_bytes for b in block_sizes(r)]
    three = max(sum(grads[i:i + 3]) for i in range(len(grads) - 2))
    assert placement(plan) == ("gpu", "cpu", "cpu")
    assert plan.breakdown["cpu"]["buffers"] == svd32 - (three - max(grads)) > 0


def test_inline_architecture_vocabulary_comes_from_the_saved_base(tmp_path, tiny_arch):
    arch = tiny_arch(hidden_size=32, intermediate_size=64).model_dump()
    r = recipe_from_dict(recipe_dict(tmp_path, model={"name_or_path": None, "architecture": arch,
                                                      "tokenizer_vocab_size": 400},
                                     output={"output_dir": str(tmp_path / "run")}))
    first = block_sizes(r)
    assert first[0].param_count == 400 * 32 and "upper bound" in " ".join(first.notes)
    (tmp_path / "run" / "base_model").mkdir(parents=True)
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=333, **{k: v for k, v in arch.items() if k != "type" and v is not None}).save_pretrained(
        tmp_path / "run" / "base_model")
    assert block_sizes(r)[0].param_count == 333 * 32


def test_uncached_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe_from_dict(recipe_dict(tmp_path, model={"name_or_path": "slimtune-tests/no-such-model"}))
    with pytest.raises(SlimtuneError) as info:
        block_sizes(r)
    assert "model.name_or_path" in str(info.value) and "config.json" in str(info.value)


# --------------------------------------------------------------------------------------------------- placement
@pytest.fixture(scope="module")
def wide_sizes(tmp_path_factory, tiny_arch):
    """A 6-layer inline model big enough (~1.6M params) that offloading beats its fixed buffers."""
    tmp = tmp_path_factory.mktemp("wide")
    arch = tiny_arch(hidden_size=128, intermediate_size=512, num_hidden_layers=6).model_dump()
    d = recipe_dict(tmp, model={"name_or_path": None, "architecture": arch, "tokenizer_vocab_size": 320},
                    adapter={"type": "none"}, output={"output_dir": str(tmp / "run")},
                    training={"per_device_train_batch_size": 1, "gradient_checkpointing": True})
    return d, block_sizes(recipe_from_dict(d))


def placement(plan) -> tuple[str, str, str]:
    b = plan.blocks[1]
    return b.params_tier, b.grads_tier, b.state_tier


def test_auto_placement_escalates_as_budgets_shrink(wide_sizes, tmp_path):
    d, sizes = wide_sizes
    d = {**d, "offload": {"device": "cpu", "nvme_dir": str(tmp_path)}}
    seen = []
    gpu = cpu = 10**12
    while True:  # shrink the device budget to just below what the last plan needed
        d["offload"].update(gpu_memory=gpu, cpu_memory=cpu)
        try:
            plan = make_plan(recipe_from_dict(d), sizes, bandwidths=BW, runtime_bytes=0)
        except PlanError:
            break
        assert plan.peak_bytes["gpu"] <= gpu and not plan.problems()
        seen.append(placement(plan))
        gpu = plan.peak_bytes["gpu"] - 1
    # state off the device means gradients off it too (the offloaded optimizer's hooks move each one as it is made)
    assert seen[:3] == [("gpu", "gpu", "gpu"), ("gpu", "cpu", "cpu"), ("cpu", "cpu", "cpu")]
    streamed = {**d["offload"], "params": "cpu", "gradients": "cpu", "optimizer_state": "cpu", "gpu_memory": 10**12}
    plan_gpu = make_plan(recipe_from_dict({**d, "offload": streamed}), sizes, bandwidths=BW,
                         runtime_bytes=0).peak_bytes["gpu"]
    d["offload"]["gpu_memory"] = plan_gpu  # only the fully streamed plans fit the device from here on
    seen = []
    while True:  # now host memory shrinks: state, then params go to NVMe
        d["offload"]["cpu_memory"] = cpu
        try:
            plan = make_plan(recipe_from_dict(d), sizes, bandwidths=BW, runtime_bytes=0)
        except PlanError as exc:
            assert "offload.cpu_memory" in str(exc)
            break
        assert plan.run_host_bytes <= cpu and plan.peak_bytes["gpu"] <= plan_gpu  # every phase: load, train, save
        seen.append(placement(plan))
        cpu = plan.run_host_bytes - 1
    assert seen[-2:] == [("cpu", "cpu", "nvme"), ("nvme", "cpu", "nvme")]
    nvme = plan.breakdown["nvme"]
    assert nvme["params"] == sum(s.stream_bytes for s in sizes[1:-1]) and nvme["state"] > 0


def test_explicit_placement_is_honoured_and_costed(wide_sizes, tmp_path):
    d, sizes = wide_sizes
    d = {**d, "offload": {"device": "cpu", "nvme_dir": str(tmp_path), "params": "cpu", "optimizer_state": "nvme"},
         "training": {**d["training"], "gradient_accumulation_steps": 2}}
    r = recipe_from_dict(d)
    plan = make_plan(r, sizes, bandwidths=BW, runtime_bytes=0)
    assert placement(plan)[0::2] == ("cpu", "nvme") and all(b.update_on == "cpu" for b in plan.blocks)
    layers = sizes[1:-1]
    stream = sum(s.stream_bytes for s in layers)
    # forward + backward fetch each layer per micro-batch; gradients go down per micro-batch (gradients auto -> the
    # first candidate with the state off the device keeps them on it, sent down once per step)
    grads = sum(s.grad_bytes for s in sizes)
    down = grads * (2 if placement(plan)[1] == "cpu" else 1)
    assert plan.link_bytes["cpu->gpu"] == 2 * 2 * stream + sum(s.trainable_bytes for s in (sizes[0], sizes[-1]))
    assert plan.link_bytes["gpu->cpu"] == down
    assert plan.link_bytes["nvme->cpu"] == plan.link_bytes["cpu->nvme"] > 12 * sum(s.trainable_count for s in sizes)
    compute = plan.flops_per_step / BW["flops"]
    assert plan.flops_per_step == 8 * sum(s.matmul_params for s in sizes) * 2 * 16
    nvme = plan.link_bytes["nvme->cpu"] / BW["nvme->cpu"] + plan.link_bytes["cpu->nvme"] / BW["cpu->nvme"]
    assert plan.step_time_lower_bound_s == pytest.approx(max(compute, nvme, plan.step_terms["gpu<->cpu"],
                                                             plan.step_terms["cpu update"]))
    text = plan.table()
    for needle in ("layers.0-5 x6", "nvme", "bytes per optimizer step", "step time >=", "TBW"):
        assert needle in text


def test_lora_streams_only_the_frozen_base(tiny_model_dir):
    r = make_recipe(tiny_model_dir, adapter={"type": "qlora", "r": 4}, model={"dtype": "bfloat16"},
                    offload={"params": "cpu", "prefetch": 2}, training={"gradient_accumulation_steps": 3})
    sizes = block_sizes(r)
    plan = make_plan(r, sizes, bandwidths=BW, runtime_bytes=0)
    layers = sizes[1:-1]
    assert all(b.grads_tier == b.state_tier == b.update_on == "gpu" for b in plan.blocks)
    assert plan.breakdown["gpu"]["buffers"] == 3 * max(s.stream_bytes for s in layers)  # prefetch + 1 slots
    assert plan.breakdown["cpu"]["params"] == sum(s.stream_bytes for s in layers)
    assert plan.breakdown["gpu"]["params"] == sizes[0].param_bytes + sizes[-1].param_bytes + sum(
        s.quant_state_bytes for s in layers)
    assert plan.link_bytes["cpu->gpu"] == 2 * 3 * sum(s.stream_bytes for s in layers)
    assert plan.link_bytes["gpu->cpu"] == plan.link_bytes["nvme->cpu"] == 0 and plan.checkpointing


def test_streamed_mezo_fetches_each_layer_once_and_writes_it_back(tiny_model_dir):
    r = make_recipe(tiny_model_dir, adapter={"type": "none"}, optimizer={"name": "mezo", "n_samples": 2},
                    offload={"params": "cpu"})
    sizes = block_sizes(r)
    plan = make_plan(r, sizes, bandwidths=BW, runtime_bytes=0)
    stream = sum(s.stream_bytes for s in sizes[1:-1])
    assert plan.link_bytes["cpu->gpu"] == plan.link_bytes["gpu->cpu"] == stream  # ZO2: one visit per step
    assert all(b.grad_bytes == 0 and b.update_on == "gpu" for b in plan.blocks) and not plan.checkpointing
    assert plan.breakdown["gpu"]["grads"] == 0 and plan.breakdown["gpu"]["state"] < 10_000  # seeds and counters
    assert plan.flops_per_step == 4 * 2 * sum(s.matmul_params for s in sizes) * 2 * 16  # 2 forwards x 2 samples


def test_cuda_placement_stages_nvme_reads_in_pinned_host_buffers(tiny_model_dir, monkeypatch):
    """CUDA semantics without a GPU (the device is only a name in the plan): NVMe -> pinned host -> card."""
    import slimtune.offload.plan as plan_module

    monkeypatch.setattr(plan_module, "_device", lambda name: "cuda")
    r = make_recipe(tiny_model_dir, adapter={"type": "qlora", "r": 4}, model={"dtype": "bfloat16"},
                    offload={"device": "cuda", "gpu_memory": "1GB", "cpu_memory": "1GB", "params": "nvme",
                             "nvme_dir": str(tiny_model_dir)})
    sizes = block_sizes(r)
    plan = make_plan(r, sizes, bandwidths=BW, runtime_bytes=123)
    slot, stream = max(s.stream_bytes for s in sizes[1:-1]), sum(s.stream_bytes for s in sizes[1:-1])
    assert plan.breakdown["cpu"]["buffers"] == plan.breakdown["gpu"]["buffers"] == 2 * slot  # prefetch 1 + 1
    assert plan.link_bytes["nvme->cpu"] == plan.link_bytes["cpu->gpu"] == 2 * stream
    assert plan.host_bytes == plan.peak_bytes["cpu"] + 123  # the card's memory is not host memory
    assert plan.step_terms["gpu<->cpu"] == pytest.approx(2 * stream / BW["cpu->gpu"])
    assert "host = cpu + runtime" in plan.table()


def test_impossible_budgets_raise_plan_error_with_numbers(wide_sizes):
    d, sizes = wide_sizes
    tiny = {**d, "offload": {"device": "cpu", "cpu_memory": "1MB"}}
    with pytest.raises(PlanError) as info:
        make_plan(recipe_from_dict(tiny), sizes, bandwidths=BW, runtime_bytes=0)
    msg = str(info.value)
    assert "offload.cpu_memory is 1 MB" in msg and "needs" in msg and "offload.nvme_dir" in msg
    assert info.value.plan is not None and info.value.plan.problems()
    small_gpu = {**d, "offload": {"device": "cpu", "gpu_memory": "100kB", "cpu_memory": "10GB"}}
    with pytest.raises(PlanError, match=r"offload\.gpu_memory is 100 kB.*per_device_train_batch_size"):
        make_plan(recipe_from_dict(small_gpu), sizes, bandwidths=BW, runtime_bytes=0)


def test_bad_nvme_dir_is_refused_before_planning(wide_sizes, tmp_path, monkeypatch):
    d, sizes = wide_sizes
    for bad in (tmp_path / "missing", tmp_path / "a-file"):
        if bad.name == "a-file":
            bad.write_text("x")
        r = recipe_from_dict({**d, "offload": {"device": "cpu", "nvme_dir": str(bad), "params": "nvme"}})
        with pytest.raises(PlanError, match="offload.nvme_dir: .* (does not exist|is not a directory)"):
            make_plan(r, sizes, bandwidths=BW, runtime_bytes=0)
    r = recipe_from_dict({**d, "offload": {"device": "cpu", "nvme_dir": str(tmp_path), "params": "nvme"}})
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((full.f_bsize, full.f_frsize, 10, 10, 10) + (
        full.f_files, full.f_ffree, full.f_favail, full.f_flag, full.f_namemax)))
    with pytest.raises(PlanError, match=r"needs .* in offload\.nvme_dir .* has 41 kB free"):
        make_plan(r, sizes, bandwidths=BW, runtime_bytes=0)


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_plan_prints_the_table_and_writes_a_png(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_model_dir, output={"output_dir": str(tmp_path / "run")})))
    assert main(["plan", str(path), "offload.params=cpu", "--png", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    for needle in ("block", "layers.0-1 x2", "tier", "peak", "budget", "step time >=", "fits every budget"):
        assert needle in out
    assert Path(tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", str(path), "offload.cpu_memory=10MB"]) == 2
    captured = capsys.readouterr()
    assert "slimtune plan: error: no placement fits" in captured.err and "offload.cpu_memory is 10 MB" in captured.err
    assert "Traceback" not in captured.err and "tier" in captured.out  # the closest plan is shown


def test_a_recipe_whose_load_would_not_fit_is_refused_with_the_load_phase(tiny_arch, tmp_path):
    """QLoRA streamed from NVMe on wide layers: training holds 4-bit layers in the ring, but the streamed load
    materializes one layer in model.dtype and reads its largest tensor in the checkpoint's dtype. A budget between
    the two phases is refused, naming the load; the plan table shows every phase."""
    model = {"name_or_path": None, "architecture": tiny_arch(hidden_size=512, intermediate_size=2048).model_dump(),
             "tokenizer_vocab_size": 320, "dtype": "bfloat16", "load_in_4bit": True}

    def recipe(budget):
        return make_recipe(tmp_path, model=model, adapter={"type": "qlora", "r": 4},
                           training={"per_device_train_batch_size": 1}, output={"output_dir": str(tmp_path / "r")},
                           offload={"device": "cpu", "params": "nvme", "nvme_dir": str(tmp_path),
                                    "cpu_memory": budget})

    r = recipe("100GB")
    plan = make_plan(r, bandwidths=BW, runtime_bytes=0)
    phases = plan.phase_host_bytes()
    assert phases["load"] > phases["train"] and plan.run_host_bytes == phases["load"]
    assert "host memory by phase: load" in plan.table()
    tight = (phases["load"] + phases["train"]) // 2
    with pytest.raises(PlanError, match="while it loads the base layer by layer"):
        make_plan(recipe(tight), bandwidths=BW, runtime_bytes=0)
