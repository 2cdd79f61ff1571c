"""Mutation score of the numerical core: do its own tests notice a plausible one-line bug?

On demand, not in CI. Each mutant is one small change to the source (an arithmetic or comparison
operator, a boolean operator, a negation, a number or a boolean constant), applied alone to a
copy of ``src/``; the module's own test files then run against that copy (``pytest -x``, with a
timeout). A mutant is *killed* when a test fails or the run times out, and *survives* when every
test passes. Surviving mutants are listed so that each one gets a test or an explanation.

Strings are not mutated (they are messages, names and library options; a misspelt option already
fails loudly), nor docstrings, f-strings or ``__all__``. ``data/presets.py`` is mutated only in its
preset table (``PRESET_OPS`` and ``_radiology_affine``).

Speed: the heavy imports (torch, Lightning, MONAI, ...) happen once in this process; every mutant
runs in a forked child that imports the mutated ``medvit`` afresh and calls ``pytest.main``. About
1-5 s per mutant on one core.

    .venv/bin/python benchmarks/mutation.py --out benchmarks/results/mutation/cpu.json
    .venv/bin/python benchmarks/mutation.py --module splits --max-per-module 40
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as dt
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module key -> (source file, its own test files, top-level names to mutate or None for all)
TARGETS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "metrics": ("src/medvit/models/metrics.py", ["tests/test_metrics.py"], None),
    "splits": ("src/medvit/evaluate/splits.py", ["tests/test_splits.py"], None),
    "vit": ("src/medvit/models/vit.py", ["tests/test_vit.py"], None),
    "presets": (
        "src/medvit/data/presets.py",
        ["tests/test_transforms.py", "tests/test_batch_transforms.py"],
        ["PRESET_OPS", "_radiology_affine"],
    ),
}

_BINOPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Div,
    ast.Mod: ast.Mult,
    ast.Pow: ast.Mult,
    ast.MatMult: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
}
_CMPOPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}


@dataclass
class Mutant:
    """One change: where, what it was, what it became, and what the tests said."""

    module: str
    line: int
    kind: str
    before: str
    after: str
    status: str = "pending"  # killed, survived, timeout (counts as killed), error
    seconds: float = 0.0


def _skip_ids(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, f-strings, ``__all__``, annotations."""
    skip: set[int] = set()

    def mark(node: ast.AST | None) -> None:
        if node is not None:
            skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        value = first.value if isinstance(first, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            mark(first)
        if isinstance(node, ast.JoinedStr):
            mark(node)
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            mark(node)
        if isinstance(node, ast.arg | ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.FunctionDef):
            mark(node.returns)
    return skip


def _in_scope(tree: ast.Module, names: list[str] | None) -> set[int]:
    """ids of the nodes inside the named top-level definitions (all nodes for None)."""
    if names is None:
        return {id(n) for n in ast.walk(tree)}
    ids: set[int] = set()
    for node in tree.body:
        defined = (
            [node.name]
            if isinstance(node, ast.FunctionDef | ast.ClassDef)
            else [
                t.id
                for t in getattr(node, "targets", [getattr(node, "target", None)])
                if isinstance(t, ast.Name)
            ]
        )
        if set(defined) & set(names):
            ids.update(id(n) for n in ast.walk(node))
    return ids


def _mutations(node: ast.AST) -> list[tuple[str, str, str, ast.AST]]:
    """(kind, before, after, replacement node) for every mutation of ``node`` itself."""
    out = []
    if isinstance(node, ast.BinOp | ast.AugAssign) and type(node.op) in _BINOPS:
        new = copy.deepcopy(node)
        new.op = _BINOPS[type(node.op)]()
        out.append(("operator", ast.unparse(node), ast.unparse(new), new))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _CMPOPS:
                new = copy.deepcopy(node)
                new.ops[i] = _CMPOPS[type(op)]()
                out.append(("comparison", ast.unparse(node), ast.unparse(new), new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("boolean", ast.unparse(node), ast.unparse(new), new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        new = copy.deepcopy(node.operand)
        out.append(("negation", ast.unparse(node), ast.unparse(new), new))
    elif isinstance(node, ast.Constant) and type(node.value) in (bool, int, float):
        v = node.value
        if isinstance(v, bool):
            nv = not v
        elif isinstance(v, int):
            nv = v + 1
        else:
            nv = v * 2 if v != 0 else 1.0  # 0.3 -> 0.6: like a wrong probability
        new = ast.Constant(nv)
        out.append(("constant", repr(v), repr(nv), new))
    return out


class _Replace(ast.NodeTransformer):
    def __init__(self, target: ast.AST, replacement: ast.AST) -> None:
        self.target, self.replacement = target, replacement

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if node is self.target:
            return ast.copy_location(self.replacement, node)
        return super().generic_visit(node)


def enumerate_mutants(key: str) -> list[tuple[Mutant, str]]:
    """Every mutant of one target, with the full mutated source."""
    path, _, names = TARGETS[key]
    source = (REPO / path).read_text()
    tree = ast.parse(source)
    skip, scope = _skip_ids(tree), _in_scope(tree, names)
    result = []
    for node in ast.walk(tree):
        if id(node) in skip or id(node) not in scope:
            continue
        for kind, before, after, new in _mutations(node):
            # A fresh tree per mutant, with the node at the same position replaced.
            fresh = ast.parse(source)
            mutated = ast.unparse(_Replace(_find(fresh, node), new).visit(fresh))
            result.append((Mutant(key, node.lineno, kind, before, after), mutated))
    return result


def _find(tree: ast.Module, like: ast.AST) -> ast.AST:
    """The node of ``tree`` at the position and of the type of ``like`` (parsed from the same text)."""
    for node in ast.walk(tree):
        if (
            type(node) is type(like)
            and getattr(node, "lineno", None) == like.lineno
            and getattr(node, "col_offset", None) == like.col_offset
            and getattr(node, "end_col_offset", None) == like.end_col_offset
            and getattr(node, "end_lineno", None) == like.end_lineno
        ):
            return node
    raise LookupError(f"node at line {like.lineno} not found again")


def _run_tests(src_root: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    """Fork, import the mutated medvit from ``src_root``, run pytest -x; status and seconds."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        try:
            sys.path.insert(0, str(src_root))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import pytest

            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests])
            os._exit(int(rc))
        except BaseException:  # noqa: BLE001 - any crash of a mutant is a failing test run
            os._exit(99)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ("survived" if code == 0 else "killed"), time.perf_counter() - start
        if time.perf_counter() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - start
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument(
        "--max-per-module",
        type=int,
        default=0,
        help="test at most N mutants per module, a seeded random sample (0: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that sample")
    parser.add_argument(
        "--timeout-factor", type=float, default=4.0, help="timeout = factor x clean run + 10 s"
    )
    parser.add_argument(
        "--rerun-survivors",
        type=Path,
        metavar="REPORT",
        help="run only the mutants that survived in this earlier JSON report (after new tests)",
    )
    parser.add_argument(
        "--exclude",
        type=Path,
        metavar="REPORT",
        help="skip the mutants already run in this earlier JSON report (to finish a sample)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.chdir(REPO)
    # The heavy imports, once, before any fork; medvit itself is imported only in the children.
    import albumentations  # noqa: F401
    import lightning  # noqa: F401
    import monai.transforms  # noqa: F401
    import pytest  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import timm  # noqa: F401
    import torch
    import torchmetrics  # noqa: F401

    torch.set_num_threads(1)
    assert "medvit" not in sys.modules, "medvit must not be imported before the forks"

    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "modules": {},
        "mutants": [],
    }
    work = Path(tempfile.mkdtemp(prefix="medvit-mutation-"))
    try:
        src_copy = work / "src"
        shutil.copytree(REPO / "src", src_copy, ignore=shutil.ignore_patterns("__pycache__"))
        for key in args.module:
            path, tests, _ = TARGETS[key]
            mutants = enumerate_mutants(key)
            total = len(mutants)
            if args.exclude:
                done = {
                    (m["line"], m["kind"], m["before"], m["after"])
                    for m in json.loads(args.exclude.read_text())["mutants"]
                    if m["module"] == key
                }
                mutants = [
                    m
                    for m in mutants
                    if (m[0].line, m[0].kind, m[0].before, m[0].after) not in done
                ]
            if args.rerun_survivors:
                earlier = json.loads(args.rerun_survivors.read_text())["mutants"]
                wanted = {
                    (m["line"], m["kind"], m["before"], m["after"])
                    for m in earlier
                    if m["module"] == key and m["status"] == "survived"
                }
                mutants = [
                    m for m in mutants if (m[0].line, m[0].kind, m[0].before, m[0].after) in wanted
                ]
            elif args.max_per_module and total > args.max_per_module:
                mutants = random.Random(args.seed).sample(mutants, args.max_per_module)
                mutants.sort(key=lambda m: m[0].line)
            if args.list:
                for m, _ in mutants:
                    print(f"{key}:{m.line} {m.kind}: {m.before} -> {m.after}")
                continue
            target = src_copy / Path(path).relative_to("src")
            original = target.read_text()
            clean, clean_s = _run_tests(src_copy, tests, timeout=1800)
            if clean != "survived":
                raise SystemExit(f"{key}: its tests fail on the unmutated code; fix that first")
            timeout = args.timeout_factor * clean_s + 10
            print(
                f"{key}: {len(mutants)} of {total} mutants, clean run {clean_s:.1f} s", flush=True
            )
            for m, mutated in mutants:
                target.write_text(mutated)
                try:
                    m.status, m.seconds = _run_tests(src_copy, tests, timeout)
                finally:
                    target.write_text(original)
                mark = "." if m.status in ("killed", "timeout") else "S"
                print(mark, end="", flush=True)
                report["mutants"].append(asdict(m))
            killed = sum(m.status in ("killed", "timeout") for m, _ in mutants)
            report["modules"][key] = {
                "source": path,
                "tests": tests,
                "mutants_total": total,
                "mutants_run": len(mutants),
                "killed": killed,
                "survived": len(mutants) - killed,
                "kill_rate": round(killed / max(1, len(mutants)), 4),
                "clean_run_s": round(clean_s, 1),
            }
            print(f"\n{key}: killed {killed}/{len(mutants)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.list:
        return 0
    run = sum(v["mutants_run"] for v in report["modules"].values())
    killed = sum(v["killed"] for v in report["modules"].values())
    report["kill_rate"] = round(killed / max(1, run), 4)
    print("\n| module | mutants run / total | killed | kill rate |\n|---|---|---|---|")
    for key, v in report["modules"].items():
        print(
            f"| {key} | {v['mutants_run']} / {v['mutants_total']} | {v['killed']} | "
            f"{v['kill_rate']:.1%} |"
        )
    print(f"| all | {run} | {killed} | {report['kill_rate']:.1%} |\n\nSurvivors:")
    for m in report["mutants"]:
        if m["status"] == "survived":
            print(f"- {m['module']}:{m['line']} {m['kind']}: `{m['before']}` -> `{m['after']}`")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
