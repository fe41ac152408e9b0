"""Every top-level script answers --help, and importing it has no side effects (docs/design.md)."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT
from support.flags import parse_config

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py")) + ["data/arithmetic.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("module", [s[:-3] for s in SCRIPTS if "/" not in s])
def test_import_writes_nothing(module, tmp_path):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {module}"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.json")))
def test_shipped_configs_name_only_known_fields(config):
    stage = importlib.import_module(config.split("_")[0])
    cfg = parse_config(stage.Config, ["--config", str(ROOT / "configs" / config)])
    tag = config[: -len(".json")].split("_")[1]
    if tag.startswith("sdar"):  # one run dir per model, shared by its three stages
        assert cfg.run == f"runs/{tag}"


def test_no_stage_imports_another_stage():
    """The stages talk through files: sft, rollout and dipo import attention and support/ only
    (rollout also eval's grader); eval, attention and the support modules import no stage but
    attention."""
    import ast

    stages = {"sft", "rollout", "dipo", "eval", "attention"}
    allowed = {"sft": {"attention"}, "rollout": {"attention", "eval"}, "dipo": {"attention"}}
    modules = {name: ROOT / f"{name}.py" for name in ("sft", "rollout", "dipo", "eval", "attention")}
    modules.update({f"support.{p.stem}": p for p in (ROOT / "support").glob("*.py")})
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        imported = {
            alias.name.split(".")[0] for node in top if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in top if isinstance(node, ast.ImportFrom) and node.module
        }
        may = allowed.get(name, {"attention"} if name.startswith("support.") else set())
        assert imported & stages <= may, (name, imported & stages)


def test_the_top_level_holds_the_five_stages_only():
    assert sorted(p.name for p in ROOT.glob("*.py")) == [
        "attention.py",
        "dipo.py",
        "eval.py",
        "rollout.py",
        "sft.py",
    ]
