"""Whether a change to the Triton kernels changes the code they compile to, without a GPU.

    python bench/ptx_diff.py [REV]        # REV (default HEAD) against the working tree
    python bench/ptx_diff.py --new NAME=1 # a constexpr the tree's kernels added, at REV's code

A refactor of kernel bodies (a shared @triton.jit helper, a moved launch) should leave the
GPU code as it was; when it does, the timings in RESULTS.md still hold and need no device
time. This records the launches of one MLA forward and backward at the shapes of
tests/test_triton_compile.py (under the interpreter, with the GPU's tiles), compiles each
distinct kernel signature for sm_90 at REV (a temporary git worktree) and in the working tree,
and compares the PTX without its debug information and line locations. Prints each kernel
variant that differs and exits 1 if any does. A kernel that gained a constexpr switch (an
opt-in path, its default the code it replaces) launches with one parameter more; `--new
NAME=VALUE` matches its variants to REV's without that parameter where it has that value
(on both sides, so that kernels of REV that already take NAME still match theirs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECORD = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import test_triton_compile as t
class Patch:  # stands in for pytest's monkeypatch: this process ends after recording
    def setattr(self, obj, name, value):
        setattr(obj, name, value)
launches = t.record_launches(Patch())
json.dump(list({json.dumps(x, sort_keys=True): x for x in launches}.values()), open(sys.argv[2], "w"))
"""

COMPILE = r"""
import hashlib, importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
new = json.loads(sys.argv[3])  # constexprs left out of a variant's key at these values
out = {}
for rec in json.load(open(sys.argv[1])):
    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    names = list(rec["params"])
    signature = {n: rec["params"][n].get("type", "constexpr") for n in names}
    constexprs = {(names.index(n),): p["constexpr"] for n, p in rec["params"].items() if "constexpr" in p}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=rec["options"])
    params = {n: p for n, p in rec["params"].items() if n not in new or p != {"constexpr": new[n]}}
    key = json.dumps({"kernel": rec["kernel"], "params": params, "options": rec["options"]},
                     sort_keys=True)
    out[rec["kernel"] + "-" + hashlib.sha1(key.encode()).hexdigest()[:8]] = compiled.asm["ptx"]
json.dump(out, open(sys.argv[2], "w"))
"""


def code(ptx: str) -> list[str]:
    """The PTX's instructions: up to the debug sections, without line locations and labels
    of the debug info (which name the source files)."""
    lines = []
    for line in ptx.splitlines():
        if re.match(r"\s*\.section\s+\.debug", line):
            break
        if re.match(r"\s*\.(loc|file)\b", line) or "$L__tmp" in line:
            continue
        lines.append(line)
    return lines


def compile_tree(
    tree: Path, pythonpath: Path, work: Path, name: str, new: dict | None = None
) -> dict[str, str]:
    """PTX of each kernel variant launched by the tree's kernels, compiled from its sources;
    `new`: constexprs left out of the variants' keys where they have these values."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    launches, ptx = work / f"{name}-launches.json", work / f"{name}-ptx.json"
    (work / "record.py").write_text(RECORD)
    (work / "compile.py").write_text(COMPILE)
    subprocess.run([sys.executable, work / "record.py", tree, launches], env=env, check=True)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(work / f"{name}-cache")
    compile_args = [work / "compile.py", launches, ptx, json.dumps(new or {})]
    subprocess.run([sys.executable, *compile_args], env=env, check=True)
    return json.loads(ptx.read_text())


def _name_value(text: str) -> tuple[str, int]:
    """NAME=VALUE with an integer VALUE, for --new."""
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=INTEGER") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="HEAD", help="the revision to compare against")
    ap.add_argument(
        "--new", nargs="*", default=[], metavar="NAME=VALUE", type=_name_value,
        help="a constexpr the working tree's kernels take and REV's do not, at the value that "
        "keeps REV's code (an integer; 0 or 1 for a flag)",
    )  # fmt: skip
    args = ap.parse_args()
    new = dict(args.new)
    with tempfile.TemporaryDirectory(prefix="ptx-diff-") as tmp:
        work = Path(tmp)
        base = work / "base"
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", base, args.rev],
                       check=True)  # fmt: skip
        try:
            # the package is the repository root: a folder named automla that points at the
            # base tree puts its sources first on the path
            (work / "pkg").mkdir()
            (work / "pkg" / "automla").symlink_to(base)
            # left out of both sides' keys: a kernel of REV that already takes NAME keeps
            # matching its counterpart
            before = compile_tree(base, work / "pkg", work, "base", new)
            after = compile_tree(ROOT, ROOT, work, "tree", new)
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], check=True)
    changed = sorted(k for k in before.keys() & after.keys() if code(before[k]) != code(after[k]))
    only = sorted(before.keys() ^ after.keys())
    for k in changed:
        print(f"changed: {k}")
    for k in only:
        print(f"launched in one tree only: {k}")
    digest = hashlib.sha1("".join(sorted(after)).encode()).hexdigest()[:8]
    same = len(before.keys() & after.keys()) - len(changed)
    print(
        f"{same} of {len(after)} kernel variants compile to the same PTX as {args.rev} ({digest})"
    )
    sys.exit(1 if changed or only else 0)


if __name__ == "__main__":
    main()
