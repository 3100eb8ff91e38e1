"""``slimtune plan RECIPE [key=value ...] [--png PATH]``: where every block's tensors will live, before training.

Prints the placement table, the predicted peak per tier against its budget, bytes per link per step and the
step-time lower bound; writes the same as a bar chart to ``--png`` (default ``<output.output_dir>/plan.png``, next
to the run's other plots, so the recipe's folder stays clean; ``--png none`` skips it). No weights are materialized
(shape-only tensors), so it runs in seconds for any model size. An impossible configuration exits 2 with the
numbers and a suggestion, after printing the closest plan it tried.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register ``slimtune plan`` on the CLI's subparsers."""
    p = sub.add_parser("plan", help="show where params, gradients and optimizer state will live (no training)")
    p.add_argument("recipe", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. offload.cpu_memory=24GB")
    p.add_argument("--png", help="bar chart path (default: <output.output_dir>/plan.png; 'none' to skip)")


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the plan of a recipe (and write its bar chart); exit 2 with the closest plan when none fits."""
    from slimtune.finetune.planning import plan_recipe
    from slimtune.finetune.recipe import load_recipe
    from slimtune.offload.plan import PlanError

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        plan = plan_recipe(recipe)
    except PlanError as exc:
        if exc.plan is not None:
            print(exc.plan.table(), flush=True)
        raise
    print(plan.table())
    if (args.png or "").lower() != "none":
        path = Path(args.png) if args.png else Path(recipe.output.output_dir) / "plan.png"
        print(f"chart: {plan.plot(path)}")
    return 0
