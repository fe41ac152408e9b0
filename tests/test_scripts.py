"""Every top-level script answers --help, and importing it has no side effects (docs/design.md)."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT
from support.flags import parse_config, run_stage

SCRIPTS = sorted(p.name for p in ROOT.glob("*.py")) + ["data/arithmetic.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_and_writes_nothing(script, tmp_path):
    """`python X.py --help` from an empty folder: the module's body runs (its imports, its
    Config), the usage is printed, and no file appears (one process per script: start-up is
    most of its cost)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    assert list(tmp_path.iterdir()) == []


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


REFUSED = [  # stage, flags, config file text or None, what the one error line says
    ("dipo", ["--lr", "-1"], None, "--lr -1.0: must be more than 0"),
    ("dipo", [], '{"lr": NaN}', "NaN is not JSON"),
    ("dipo", [], "5", "5 is not a JSON object"),
    ("dipo", [], '[{"lr": 1}]', '[{"lr": 1}] is not a JSON object'),
    ("dipo", [], '{"lr": "fast"}', "lr: 'fast' is not a number"),
    ("dipo", [], '{"minibatches": {"a": 1}}', "minibatches: {'a': 1} is not an integer"),
    ("dipo", [], '{"dapo_filter": 1}', "dapo_filter: 1 is not true or false"),
    ("dipo", ["--ppo-epochs", "0"], None, "--ppo-epochs 0: must be at least 1"),
    ("dipo", ["--minibatches", "0"], None, "--minibatches 0: must be at least 1"),
    ("dipo", ["--micro-batch-size", "0"], None, "--micro-batch-size 0: must be at least 1"),
    ("dipo", ["--estimator", "bogus"], None, "--estimator 'bogus': choose from dipo, exact"),
    ("rollout", ["--group-size", "0"], None, "--group-size 0: must be at least 1"),
    ("rollout", [], '{"group_size": "8"}', "group_size: '8' is not an integer"),
    (
        "rollout",
        ["--strategy", "low_confidence_static", "--denoising-steps", "0"],
        None,
        "--denoising-steps 0",
    ),
    ("rollout", ["--batch-size", "-1"], None, "--batch-size -1: must be at least 0"),
    ("rollout", ["--temperature", "nan"], None, "--temperature nan: not a finite number"),
    ("rollout", ["--temperature", "-1"], None, "--temperature -1.0: must be at least 0"),
    ("rollout", ["--top-p", "0"], None, "--top-p 0.0: must be more than 0"),
    ("rollout", ["--max-new-tokens", "0"], None, "--max-new-tokens 0: must be at least 1"),
    ("rollout", ["--dynamic-sampling", "--max-sample-rounds", "0"], None, "--max-sample-rounds 0"),
    ("sft", ["--batch-size", "0"], None, "--batch-size 0: must be at least 1"),
    ("sft", ["--grad-accum", "0"], None, "--grad-accum 0: must be at least 1"),
    ("sft", ["--steps", "-5"], None, "--steps -5: must be at least 1"),
    ("eval", ["x.jsonl", "--timeout", "0"], None, "--timeout 0.0: must be more than 0"),
]


def call_stage(stage, argv, config, tmp_path):
    """run_stage with the stage's Config and a main that only records that it ran."""
    if config is not None:
        (tmp_path / "c.json").write_text(config)
        argv = argv + ["--config", str(tmp_path / "c.json")]
    ran = []
    with pytest.raises(SystemExit) as exit:
        run_stage(ran.append, importlib.import_module(stage).Config, "", argv)
    return exit.value.code, ran


@pytest.mark.parametrize("stage, argv, config, message", REFUSED)
def test_bad_values_are_refused_in_one_line_before_the_stage_runs(stage, argv, config, message, tmp_path):
    code, ran = call_stage(stage, argv, config, tmp_path)
    assert not ran and code.startswith("error: ") and message in code and "\n" not in code, code


@pytest.mark.parametrize(
    "stage, argv, config",
    [
        ("rollout", ["--denoising-steps", "0"], None),  # the dynamic strategy never uses it
        ("rollout", ["--strategy", "sequential", "--threshold", "5"], None),
        ("rollout", ["--max-sample-rounds", "0"], None),  # without --dynamic-sampling
        ("sft", ["--steps", "0", "--epochs", "1"], None),
        ("dipo", [], '{"lr": 1, "dapo_filter": false}'),  # an integer where a float is declared
    ],
)
def test_values_that_do_not_apply_are_not_checked(stage, argv, config, tmp_path):
    code, ran = call_stage(stage, argv, config, tmp_path)
    assert code == 0 and len(ran) == 1


def test_a_refused_flag_writes_nothing(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(ROOT / "dipo.py"), "--run", str(run), "--lr", "-1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: --lr -1.0: must be more than 0"
    ]
    assert not run.exists()
