"""Recipe schema: strict errors that name the dotted key, overrides, aliases, docs, and every shipped config."""

from pathlib import Path

import pytest
import yaml

from slimtune.cli.main import main
from slimtune.finetune.recipe import Recipe, RecipeError, apply_overrides, load_recipe, recipe_docs, recipe_from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def base() -> dict:
    return {"model": {"architecture": {"hidden_size": 32, "num_attention_heads": 4}},
            "data": {"path": "train.jsonl", "val_size": 0.1}}


def with_(path: str, value) -> dict:
    data = base()
    return apply_overrides(data, [f"{path}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    return info.value.problems


# (recipe, text every problem list must contain): ten+ distinct ways to get a recipe wrong.
BAD = [
    pytest.param(with_("adapter.dropuot", 0.1), ["adapter.dropuot", "did you mean adapter.dropout"], id="typo"),
    pytest.param(with_("training.lr", 1e-4), ["training.lr", "did you mean training.learning_rate"],
                 id="alias-from-other-tool"),
    pytest.param(with_("training.learning_rate", -1), ["training.learning_rate", "greater than 0", "-1"],
                 id="out-of-range"),
    pytest.param(with_("training.max_steps", "ten"), ["training.max_steps", "integer", "'ten'"], id="wrong-type"),
    pytest.param(with_("training.lr_scheduler_type", "cosin"), ["training.lr_scheduler_type", "'cosin'", "'cosine'"],
                 id="bad-choice"),
    pytest.param(with_("adapter.type", "dora"), ["adapter.type", "'dora'", "'lora'", "'qlora'", "'none'"],
                 id="unknown-adapter"),
    pytest.param(with_("model.dtype", "int8"), ["model.dtype", "'int8'", "'bfloat16'"], id="bad-dtype"),
    pytest.param(with_("adapter.dropout", 1.5), ["adapter.dropout", "less than 1", "1.5"], id="dropout-range"),
    pytest.param(with_("output.report_to", ["tensorbord"]), ["output.report_to", "'tensorbord'", "'tensorboard'"],
                 id="bad-reporter"),
    pytest.param(with_("model.name_or_path", "meta-llama/Meta-Llama-3-8B"),
                 ["exactly one of model.name_or_path", "model.architecture"], id="two-model-sources"),
    pytest.param({"model": {"name_or_path": "x"}}, ["data: required key is missing"], id="missing-section"),
    pytest.param(apply_overrides(base(), ["adapter.type=none", "model.load_in_4bit=true"]),
                 ["4-bit base cannot be fine-tuned in full", "adapter.type qlora"], id="4bit-full-finetune"),
    pytest.param(apply_overrides(base(), ["data.val_size=0", "training.eval_steps=10"]),
                 ["training.eval_steps", "data.val_size"], id="eval-without-data"),
    pytest.param(apply_overrides(base(), ["training.warmup_steps=10", "training.warmup_ratio=0.1"]),
                 ["training.warmup_steps or training.warmup_ratio"], id="two-warmups"),
    pytest.param(apply_overrides(base(), ["data.format=text", "data.metric=exact_match"]),
                 ["data.metric", "instruction format"], id="metric-on-text"),
    pytest.param(with_("model.architecture.num_attention_heads", 5),
                 ["hidden_size (32)", "num_attention_heads (5)"], id="heads-do-not-divide"),
    pytest.param(with_("optimizer.betas", [0.9, 1.5]), ["optimizer.betas", "[0, 1)"], id="betas"),
    pytest.param(apply_overrides(base(), ["data.max_length=4096"]),
                 ["data.max_length 4096", "max_position_embeddings 512"], id="length-beyond-model"),
]


@pytest.mark.parametrize("data, expected", BAD)
def test_bad_recipe_names_the_key(data, expected):
    text = "\n".join(problems_of(data))
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_all_problems_reported_at_once():
    data = apply_overrides(base(), ["training.lr=1", "adapter.r=0", "model.dtype=int4", "foo.bar=1",
                                    "adapter.type=none", "model.load_in_4bit=true"])
    problems = problems_of(data)
    keys = ["training.lr", "adapter.r", "model.dtype", "foo", "4-bit base cannot be fine-tuned"]
    for key in keys:
        assert any(key in p for p in problems), (key, problems)
    assert len(problems) == len(keys)


def test_valid_recipe_fills_defaults_and_maps_warmup_ratio():
    recipe = recipe_from_dict(apply_overrides(base(), ["training.warmup_ratio=0.03", "model.dtype=bf16"]))
    assert isinstance(recipe, Recipe)
    assert recipe.training.warmup_steps == pytest.approx(0.03)  # transformers 5: a float < 1 is a ratio
    assert recipe.training.warmup_ratio is None
    assert recipe.model.dtype == "bfloat16"
    assert recipe.adapter.target_modules == "all-linear"  # not peft's q_proj/v_proj default
    assert not recipe.quantized
    qlora = recipe_from_dict(apply_overrides(base(), ["adapter.type=qlora"]))
    assert qlora.quantized and qlora.model.quantization.quant_type == "nf4"
    assert qlora.model.quantization.double_quant and qlora.model.quantization.compute_dtype == "bfloat16"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    (tmp_path / "train.jsonl").write_text("")
    recipe = load_recipe(path, ["training.max_steps=50", "adapter.r=16", "adapter.target_modules=[q_proj,v_proj]",
                                "training.bf16=true", "training.resume_from_checkpoint=null"])
    assert recipe.training.max_steps == 50 and recipe.adapter.r == 16 and recipe.training.bf16 is True
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.path == str(tmp_path / "train.jsonl")  # relative data paths resolve against the recipe


def test_override_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base()))
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(path, ["training.max_steps"])
    with pytest.raises(RecipeError, match="training.max_steps is a value, not a section"):
        load_recipe(path, ["training.max_steps=3", "training.max_steps.x=1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name_or_path: x\ndata:\n  path: [unclosed\ntraining: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and "line" in message and "invalid YAML" in message


def test_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  name_or_path: a\ndata:\n  path: x.jsonl\ntraining:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(RecipeError, match=r"line 7.*duplicate key 'seed'"):
        load_recipe(path)


def test_recipe_docs_cover_every_field():
    docs = recipe_docs()

    from slimtune.finetune.recipe_io import section_type, union_members

    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            if union_members(field.annotation):
                for member in union_members(field.annotation).values():
                    yield from fields(member, f"{prefix}{name}.")
                continue
            target = section_type(field.annotation)  # a section, X | None, or a list of sections
            if target is not None:
                yield from fields(target, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [f for f in fields(Recipe) if f" {f} (" not in docs]
    assert not missing
    assert "training.learning_rate (float; default 0.0002)  Peak learning rate." in docs


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_shipped_configs_exist():
    found = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
    assert "quickstart.yaml" in found and any(p.startswith("gpu-24gb/") for p in found)


def test_cli_validate_reports_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(base(), ["training.lr=1"])))
    assert main(["validate", str(path), "adapter.r=-2"]) == 2
    err = capsys.readouterr().err
    assert "training.lr" in err and "adapter.r" in err and "Traceback" not in err


def test_cli_validate_checks_local_files(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(base(), ["data.path=./missing.jsonl"])))
    assert main(["validate", str(path)]) == 2
    assert "data.path: ./missing.jsonl does not exist" in capsys.readouterr().err
