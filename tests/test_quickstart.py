"""The shipped quickstart recipe, run exactly as `make quickstart` runs it: the task metric must visibly rise.

This is the suite's one long test (~2 min on 2 CPU cores). The README's quickstart numbers come from this recipe.
"""

import json
from pathlib import Path

from slimtune.cli.main import main

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_quickstart_learns_the_task(tmp_path, capsys):
    assert main(["train", str(QUICKSTART), "--no-progress", f"output.output_dir={tmp_path / 'run'}"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["eval_exact_match"] <= 0.05 and after["eval_exact_match"] >= 0.9, (before, after)
    assert after["eval_loss"] < 0.2 * before["eval_loss"]
    out = capsys.readouterr().out
    assert "exact match" in out and "sample" in out and "adapter" in out
