"""Learning curves: the loop's wall time per policy step (loop_minutes), and a plot of
training reward and held-out accuracy against DiPO step and loop minutes, one line per run,
from the runs' metrics.jsonl. With --control, the comparison `TASK=teacher bash demo.sh`
runs instead: SFT's held-out curve to its plateau and on through the control's more SFT, and
held-out avg@k of the loop and of the control against minutes after the plateau (each RUN
beside its RUN_control). Analysis, not a stage: matplotlib is needed here only.

    python benchmarks/curves.py OUT.png runs/seed0 runs/seed1 [--steps N]
    python benchmarks/curves.py --control OUT.png runs/teacher runs/t1 runs/t2
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.rundir import read_metrics  # noqa: E402


def loop_minutes(lines):
    """{policy step: loop minutes to produce it} from a run's metrics.jsonl lines: the wall
    time of rollout.py and dipo.py only. Step k runs from the last line written before its
    rollout's start line (so Python's start-up counts) to dipo's line for k; held-out
    evaluations write their lines before that point and are left out. A gap before a rollout
    longer than twice the median one (a loop stopped and started again later) counts as
    twice the median."""
    steps, before, start = [], lines[0]["time"] if lines else 0.0, None
    for r in lines:
        if r.get("stage") == "rollout" and r.get("event") == "start":
            start = (before, r["time"])
        elif r.get("stage") == "dipo" and "step" in r and "event" not in r and start:
            steps.append((r["step"], start[1] - start[0], r["time"] - start[1]))
            start = None
        before = r["time"]
    if not steps:
        return {0: 0.0}
    cap = 2 * sorted(gap for _, gap, _ in steps)[len(steps) // 2]
    minutes, total = {0: 0.0}, 0.0
    for step, gap, work in steps:
        total += min(gap, cap) + work
        minutes[step] = total / 60
    return minutes


def avg_key(record):
    """The name of a held-out line's avg@k field ("avg@8"), or None."""
    return next((key for key in record if key.startswith("avg@")), None)


def comparison_curves(lines, control_lines):
    """One seed of the loop-against-control comparison, as (x, y) lists, from the metrics.jsonl
    lines of the run (SFT to the plateau, then the loop) and of its control (more SFT from the
    plateau policy, for the loop's minutes):
      plateau  the last SFT step before the loop (where the control starts)
      sft      [(SFT step, held-out masked-token accuracy)], the control's steps continuing it
      loop     [(loop minutes, held-out avg@k)] at each evaluated policy step
      control  [(0, the plateau's avg@k), (the control's minutes, its avg@k)]"""

    def held_out_acc(records, offset):
        return [(offset + r["step"], r["held_out_acc"]) for r in records if "held_out_acc" in r]

    sft = held_out_acc(lines, 0)
    minutes = loop_minutes(lines)
    loop = sorted(
        (minutes[r["step"]], r[avg_key(r)])
        for r in lines
        if r.get("stage") == "eval" and r["step"] in minutes and avg_key(r)
    )
    control_minutes = next(
        r["config"]["minutes"] for r in control_lines if r.get("event") == "start" and r["stage"] == "sft"
    )
    control_avg = [r[avg_key(r)] for r in control_lines if r.get("stage") == "eval" and avg_key(r)]
    if not sft or not loop or not control_avg:
        raise ValueError("a run needs SFT's held-out curve, a held-out evaluation and its control's")
    return {
        "plateau": sft[-1][0],
        "sft": sft + held_out_acc(control_lines, sft[-1][0]),
        "loop": loop,
        "control": [loop[0], (control_minutes, control_avg[-1])],
    }


def two_panels():
    """A figure of two plots side by side (matplotlib imported here: only plots need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4))


def save_png(fig, out):
    fig.tight_layout()
    tmp = f"{out}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def plot_comparison(runs, out):
    """Left: SFT's held-out masked-token accuracy against SFT step, to the plateau and on
    through the control. Right: held-out avg@k against minutes after the plateau, the loop
    (solid) and the control (dashed). One colour per run, to a PNG."""
    fig, (left, right) = two_panels()
    for run in runs:
        name = Path(run).name
        curves = comparison_curves(read_metrics(run), read_metrics(f"{run}_control"))
        line = left.plot(*zip(*curves["sft"]), label=f"{name}: SFT, then the control's more SFT")
        colour = line[0].get_color()
        left.axvline(curves["plateau"], color=colour, linestyle=":", alpha=0.5)
        right.plot(*zip(*curves["loop"]), "o-", color=colour, label=f"{name}: the loop")
        right.plot(*zip(*curves["control"]), "s--", color=colour, label=f"{name}: more SFT (control)")
    left.set_xlabel("SFT step")
    left.set_ylabel("held-out masked-token accuracy")
    right.set_xlabel("minutes after the plateau (the loop's rollout.py + dipo.py)")
    right.set_ylabel("held-out avg@k")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    save_png(fig, out)


def plot_runs(runs, out, max_step=0):
    """Training reward and held-out avg@k against DiPO step and against loop minutes
    (loop_minutes), one line per run, to a PNG."""
    fig, axes = two_panels()
    for run in runs:
        lines = read_metrics(run)
        lines = [r for r in lines if not max_step or r.get("step", 0) <= max_step]
        loop = [r for r in lines if r.get("stage") == "rollout" and "reward" in r]
        if not loop:
            raise ValueError(f"{run}: no rollout lines in metrics.jsonl")
        minutes = loop_minutes(lines)
        held_out = sorted(
            (r for r in lines if r.get("stage") == "eval" and r["step"] in minutes), key=lambda r: r["step"]
        )
        k = avg_key(held_out[0]) if held_out else None
        smooth = [
            sum(r["reward"] for r in loop[max(0, i - 4) : i + 1]) / min(i + 1, 5) for i in range(len(loop))
        ]
        for ax, x in zip(axes, ("step", "minutes")):  # a policy's minute is when dipo wrote it
            at = (lambda step: step) if x == "step" else (lambda step: minutes.get(step, 0.0))
            name = Path(run).name
            trained = ax.plot(
                [at(r["step"]) for r in loop],
                smooth,
                alpha=0.5,
                label=f"{name}: training reward (mean of 5 steps)",
            )
            if k:
                held = ([at(r["step"]) for r in held_out], [r[k] for r in held_out])
                ax.plot(*held, "o-", color=trained[0].get_color(), label=f"{name}: held-out {k}")
            ax.set_xlabel(
                "DiPO step" if x == "step" else "loop minutes (rollout.py + dipo.py; evaluations left out)"
            )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    save_png(fig, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="the PNG to write")
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--steps", type=int, default=0, help="only DiPO steps up to N (default: 0 = all)")
    parser.add_argument(
        "--control", action="store_true", help="plot each run against its RUN_control (TASK=teacher|scarce)"
    )
    args = parser.parse_args()
    try:
        if args.control:
            plot_comparison(args.runs, args.out)
        else:
            plot_runs(args.runs, args.out, args.steps)
    except ImportError:
        sys.exit("error: the plot needs matplotlib (pip install matplotlib)")
    except (OSError, ValueError, KeyError, StopIteration) as e:
        sys.exit(f"error: {e!r}")
    print(f"wrote {args.out}")
