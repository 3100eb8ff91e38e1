"""``slimtune`` command line: a dispatch dict of thin functions. No training logic lives here.

    slimtune train RECIPE [section.key=value ...]     fine-tune; ends with a before/after summary
    slimtune validate RECIPE [section.key=value ...]  check a recipe without loading anything heavy
    slimtune recipe-docs                              every recipe field with its type, default and doc
    slimtune generate RUN_OR_ADAPTER --prompt TEXT    quick look at a fine-tuned model
    slimtune merge ADAPTER OUT_DIR                    write a merged Hugging Face model
    slimtune plan RECIPE [key=value ...] [--png PATH] where params/grads/optimizer state live, peaks, step bound

User errors (bad recipe, file, dataset row, checkpoint) print a message naming the key/file/line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from slimtune.finetune.errors import RecipeError, SlimtuneError
from slimtune.offload.errors import OffloadError

from .plan import add_parser as add_plan_parser
from .plan import cmd_plan


def _recipe_docs() -> str:
    from slimtune.finetune.recipe import recipe_docs

    return recipe_docs()


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe (schema, combinations, local files) without loading anything heavy."""
    from slimtune.finetune.recipe import check_local_files, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    problems = check_local_files(recipe)
    if problems:
        raise RecipeError(problems, source=args.recipe)
    a = recipe.adapter
    model = recipe.model.name_or_path or f"inline {recipe.model.architecture.type}"
    quant = " (4-bit base)" if recipe.quantized else ""
    print(f"ok: {args.recipe}: {model}{quant}, adapter {a.type}, optimizer {recipe.optimizer.name}, "
          f"data {recipe.data.describe()}, output {recipe.output.output_dir}")
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    """Print every recipe field with its type, default and doc."""
    print(_recipe_docs())
    return 0


def _quiet_libraries() -> None:
    """Our progress bar and summary are the output; hide transformers' per-file loading/saving bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe: build, print the header, run the loop, print the summary."""
    from slimtune.finetune.build import prepare
    from slimtune.finetune.recipe import load_recipe
    from slimtune.finetune.trainer import Trainer

    from .summary import format_header, format_summary

    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_libraries()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args, recipe)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun / accelerate launch
        return train_processes(recipe, progress=not args.no_progress)
    prepared = prepare(recipe)
    trainer = Trainer(recipe, prepared, progress=not args.no_progress)
    print(format_header(recipe, prepared, trainer.steps, trainer.optimizer), flush=True)
    try:
        result = trainer.train()
    except KeyboardInterrupt:
        print(f"\ninterrupted: the latest complete checkpoint in {prepared.run_dir / 'checkpoints'} is intact; "
              "continue with training.resume_from_checkpoint=true", file=sys.stderr)
        return 130
    print(format_summary(result), flush=True)
    return 0


def launch_processes(args: argparse.Namespace, recipe) -> int:
    """``slimtune train --nproc N``: what several processes cannot run is refused here, before anything starts;
    then torchrun starts N copies of this command on a free port."""
    import subprocess

    from slimtune.finetune.hf import problems_under_processes

    problems = problems_under_processes(recipe)
    if problems:
        raise RecipeError(problems)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "slimtune.cli", "train", args.recipe, *args.overrides]
    return subprocess.call(command + (["--no-progress"] if args.no_progress else []))


def train_processes(recipe, progress: bool) -> int:
    """One process of several (``torchrun --nproc_per_node N -m slimtune.cli train recipe.yaml``, or accelerate
    launch): the recipe through the Hugging Face route, DDP underneath; the first process prints the summary."""
    from slimtune.finetune.hf import train_on_processes

    from .summary import format_summary

    result = train_on_processes(recipe, progress)
    if result is not None:
        world = os.environ["WORLD_SIZE"]
        print(format_summary(result).replace("done:", f"done on {world} processes:", 1), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a run directory, an adapter directory or a merged model."""
    import torch

    from slimtune.finetune.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
    from slimtune.finetune.export import generate, load_for_inference
    from slimtune.finetune.model import resolve_device

    path = Path(args.path)
    if (path / "adapter").is_dir():
        path = path / "adapter"  # a run directory: use its final adapter
    if args.instruction is not None:
        template = ALPACA_PROMPT if args.input else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=args.instruction, input=args.input or "")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise SlimtuneError("give --prompt TEXT (used as is) or --instruction TEXT [--input TEXT] (formatted with "
                            "the alpaca template used in training)")
    _quiet_libraries()
    model, tokenizer = load_for_inference(path, resolve_device(args.device), base=args.base)
    torch.manual_seed(args.seed)
    text = generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge a LoRA/QLoRA adapter into its base and save a Hugging Face model."""
    from slimtune.finetune.export import merge_adapter

    path = Path(args.adapter)
    if (path / "adapter").is_dir():
        path = path / "adapter"
    _quiet_libraries()
    out = merge_adapter(path, Path(args.out_dir), dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "validate": cmd_validate,
    "recipe-docs": cmd_docs,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "plan": cmd_plan,
}


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (``train --help`` ends with the recipe reference)."""
    parser = argparse.ArgumentParser(prog="slimtune", description="Fine-tune LLMs that do not fit on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="fine-tune from a recipe", formatter_class=raw, epilog=_recipe_docs())
    p.add_argument("recipe", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.max_steps=50 adapter.r=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N processes of this machine (DDP through torchrun: one per GPU, or CPU processes "
                        "with gloo); training.per_device_train_batch_size is per process")

    p = sub.add_parser("validate", help="check a recipe without loading models or data")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")

    sub.add_parser("recipe-docs", help="print every recipe field with its type, default and doc")

    p = sub.add_parser("generate", help="generate with a fine-tuned model (run dir, adapter dir or model dir)")
    p.add_argument("path", help="run directory (uses its adapter/), adapter directory or merged model directory")
    p.add_argument("--prompt", help="raw prompt text")
    p.add_argument("--instruction", help="instruction, formatted with the alpaca template used in training")
    p.add_argument("--input", help="optional input for --instruction")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--base", help="base model to load the adapter on (default: the one recorded in the adapter)")

    p = sub.add_parser("merge", help="merge a LoRA/QLoRA adapter into its base and save a Hugging Face model")
    p.add_argument("adapter", help="adapter directory (or run directory)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    add_plan_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``slimtune`` console script; returns the exit code."""
    # peft 0.21 reads transformers 5's deprecated is_gradient_checkpointing on every model it wraps or loads
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if argv and argv[0] in ("train", "validate", "plan"):
        # section.key=value overrides may come before or after flags such as --no-progress
        overrides = [a for a in argv[2:] if "=" in a and not a.startswith("-")]
        argv = argv[:2] + [a for a in argv[2:] if a not in overrides]
    args = build_parser().parse_args(argv)
    if overrides:
        args.overrides = list(args.overrides) + overrides
    try:
        return COMMANDS[args.command](args)
    except (SlimtuneError, OffloadError) as exc:
        print(f"slimtune {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `slimtune recipe-docs | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
