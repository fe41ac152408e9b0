"""How far a reader walks: for each entry point of the README's reading order, the project
definitions it reaches by name (calls, classes, methods of classes reached), and their lines.
A static count: a name is followed when it matches a top-level function or class of the
project's modules, or a method of a class reached; a class counts its own lines (docstring,
fields) and the methods reached.

    python benchmarks/reading.py     (run from the repository root, at any commit)
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRIES = {  # where a reader starts; denoise_step`s cache.step is RowCache.step, its live rows LiveRows
    "the mask": ["block_diffusion_mask_mod"],
    "the SFT loss": ["run_micro_batch"],
    "one denoising step": ["denoise_step", "RowCache.step", "LiveRows"],
    "the DiPO loss": ["dipo_loss"],
}


def definitions():
    """name -> (file, node) for top-level functions and classes; 'Class.method' for methods."""
    found = {}
    files = [p for p in ROOT.glob("*.py")] + sorted((ROOT / "support").glob("*.py"))
    for path in files:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                found.setdefault(node.name, (path.name, node))
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                        found.setdefault(f"{node.name}.{item.name}", (path.name, item))
    return found


def names_in(node):
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            out.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            out.add(sub.attr)
    return out


def walk(entry, found):
    if entry[0] not in found:  # before denoise_step existed, the step was the body of generate
        entry = ["generate"]
    reached, todo = set(), list(entry)
    while todo:
        name = todo.pop()
        if name in reached or name not in found:
            continue
        reached.add(name)
        used = names_in(found[name][1])
        todo += [n for n in used if n in found]
        classes = {n for n in reached | set(todo) if n in found and isinstance(found[n][1], ast.ClassDef)}
        todo += [f"{c}.{m}" for c in classes for m in used]  # methods of the classes reached
        if "." in name:
            todo.append(name.split(".")[0])  # a method's class (its docstring and fields)
    # a class counts its own lines (docstring, fields) and the methods reached, not the others
    lines = 0
    for n in reached:
        node = found[n][1]
        lines += node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            methods = [m for m in node.body if isinstance(m, ast.FunctionDef)]
            lines -= sum(m.end_lineno - m.lineno + 1 for m in methods if not m.name.startswith("__"))
    return sorted(reached), lines


if __name__ == "__main__":
    found = definitions()
    for what, entry in ENTRIES.items():
        names, lines = walk(entry, found)
        print(f"{what:20s} {len(names):3d} definitions {lines:5d} lines  {', '.join(names)}")
    sys.exit(0)
