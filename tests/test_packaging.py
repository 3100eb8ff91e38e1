"""The four code folders install as one `slimtune` namespace, and nothing else lands in site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

import slimtune.cli
import slimtune.finetune
import slimtune.offload
import slimtune.optimizers

ROOT = Path(__file__).resolve().parents[1]


def test_namespace_maps_the_four_folders():
    for module, folder in ((slimtune.finetune, "finetune"), (slimtune.cli, "cli"), (slimtune.offload, "offload"),
                           (slimtune.optimizers, "optimizers")):
        assert Path(module.__file__).resolve().parent.name == folder


def test_wheel_holds_only_the_slimtune_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("slimtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"slimtune", next(t for t in top if t.endswith(".dist-info"))}
    for folder in ("finetune", "finetune/adapters", "offload", "optimizers", "cli"):
        assert f"slimtune/{folder}/__init__.py" in names
    assert not any(n.startswith("slimtune/__init__") for n in names)  # an implicit namespace package
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "slimtune = slimtune.cli.main:main" in entry_points


def test_console_script_runs():
    script = Path(sys.executable).parent / "slimtune"
    out = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "training.learning_rate" in out and "adapter.target_modules" in out


def test_imports_go_one_way():
    """cli -> finetune -> offload -> optimizers: a layer never imports one above it (no module of offload names
    finetune, none of optimizers names the other three), so each can be read and reused without the ones above."""
    import re

    above = {"offload": ("finetune", "cli"), "optimizers": ("finetune", "offload", "cli"), "finetune": ("cli",)}
    found = []
    for folder, names in above.items():
        alt = "|".join(names)
        pattern = re.compile(rf"^\s*(from|import)\s+(slimtune\.({alt})\b|\.\.({alt})\b)", re.M)
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}" for m in pattern.finditer(path.read_text())]
    assert not found, found
