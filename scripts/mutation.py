"""Mutation testing of the modules that guard the invariants (`make mutation`; not run by CI).

mutmut 3 (configured in pyproject.toml, [tool.mutmut]) copies the tree into mutants/ (git-ignored), makes
every mutant of the selected functions and runs, for each, only the tests of the selection that cover the
function. This script runs one group (or all) and tallies the outcome per group:

    .venv/bin/python scripts/mutation.py                  # every group
    .venv/bin/python scripts/mutation.py merge cursor     # some groups
    .venv/bin/python scripts/mutation.py --fresh ...      # drop mutants/ first (after editing tests)
    .venv/bin/python scripts/mutation.py --survivors merge  # list each survivor with its diff

Killed = a covering test failed (or the mutant timed out: an endless loop); survived = every covering test
passed; no tests = no test of the selection reaches the function. The figures and the reasons for the
survivors left are in docs/reliability.md.

The groups of the worker's lease code and of the rollout transitions run in a selection of their own
(`SELECTIONS`): a scratch root, runs/mutation/<selection>/, that links the sources and the tests and holds a
pyproject.toml whose [tool.mutmut] table names only that selection's fast contract tests (no RQ worker, no
waits on leases) and a per-test timeout. So their mutants never re-run the slow worker tests, a mutant that
blocks fails within the timeout instead of waiting for mutmut's CPU limit (a blocked test uses no CPU), and
their mutmut state (runs/mutation/<selection>/mutants/) never resets the other groups' results.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = str(Path(sys.executable).with_name("mutmut"))

# group -> mutant name globs (module.function, methods as module.xǁClassǁmethod).
GROUPS: dict[str, list[str]] = {
    "merge": ["service.merge.*"],
    "cursor": ["service.cursor.*"],
    "index": [  # the index moves: items between sides, out of a side, the staged index promoted, compaction
        "service.index.xǁIndexSetǁapply__*",
        "service.index.xǁIndexSetǁside_of__*",
        "service.index.xǁVectorIndexǁremove__*",
        "service.index.xǁVectorIndexǁ_compact__*",
        "service.index.xǁVectorIndexǁ_promote_if_ready__*",
    ],
    # The lease: expired leases with no attempt left end `failed`; failed attempts and released batches go back.
    "lease": ["worker.backfill.x_reap_orphans__*", "worker.backfill.x__fail__*", "worker.backfill.x_release__*"],
    "claim": ["worker.backfill.x_claim__*"],  # which tasks, in which order, under which lease
    "commit": ["worker.backfill.x_commit_batch__*"],  # a batch commits only the tasks it still holds
    # Completion: the transition that switches the serving model (or ends the rollout `failed`).
    "rollouts": [
        "service.rollouts.x_complete__*",
        "service.rollouts.x_requeue_missing__*",
        "service.rollouts.x_task_counts__*",
    ],
    # The operator's transitions.
    "transitions": [
        "service.rollouts.x_pause__*",
        "service.rollouts.x_resume__*",
        "service.rollouts.x_abort__*",
        "service.rollouts.x__lock__*",
    ],
}


@dataclass(frozen=True)
class Selection:
    """Tests run against a group's mutants instead of the project's [tool.mutmut] selection."""

    mutate: list[str]  # only_mutate: the modules of its groups
    tests: list[str]
    timeout_s: int  # per test (pytest-timeout): a mutant that blocks or loops fails after this


SELECTIONS = {
    # Each test well under 1-2 s on real Postgres, clock fixed, no sleeps.
    "contract": Selection(
        ["worker/backfill.py", "service/rollouts.py"],
        ["tests/integration/test_lease_contract.py", "tests/integration/test_completion_contract.py"],
        timeout_s=20,
    ),
}
SELECTION_OF = {g: "contract" for g in ("lease", "claim", "commit", "rollouts", "transitions")}
LINKED = ["service", "worker", "models", "devtools", "cli", "migrations", "tests", "alembic.ini"]
# The tests run against each mutant: the union in pyproject.toml ([tool.mutmut]), or the group's selection;
# mutmut runs, per mutant, only those that cover the mutated function.
DEFAULT_GROUPS = list(GROUPS)
KILLED = {"killed", "timeout"}


def _toml_table(name: str, values: dict[str, object]) -> str:
    # Strings, booleans and lists of strings only: JSON writes them as TOML does.
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def prepare(selection: str) -> Path:
    """The scratch root of a selection: links to the sources and tests, and the project's pyproject.toml with
    a [tool.mutmut] table of its own."""
    sel, work = SELECTIONS[selection], ROOT / "runs" / "mutation" / selection
    work.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        if not (work / name).is_symlink():
            (work / name).symlink_to(ROOT / name)
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["tool"]["mutmut"]
    # Drop the project's [tool.mutmut] table (up to the next table header), keep everything else (pytest's).
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\s*$.*?(?=^\[[^\]\n]+\]\s*$|\Z)", "", text)
    table = {
        "source_paths": project["source_paths"],
        "only_mutate": sel.mutate,
        "also_copy": project["also_copy"],
        "use_git_change_detection": False,
        "pytest_add_cli_args": ["-p", "no:randomly", "-p", "no:cacheprovider", "-q", f"--timeout={sel.timeout_s}"],
        "pytest_add_cli_args_test_selection": sel.tests,
    }
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n" + _toml_table("tool.mutmut", table))
    return work


def workdir(group: str) -> Path:
    selection = SELECTION_OF.get(group)
    return ROOT if selection is None else prepare(selection)


def results(cwd: Path = ROOT) -> dict[str, str]:
    """Every mutant mutmut knows of -> its status (killed, survived, timeout, no tests, not checked...)."""
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=cwd, capture_output=True, text=True, check=True)
    status = {}
    for line in out.stdout.splitlines():
        name, sep, state = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            status[name] = state
    return status


def tally(group: str, status: dict[str, str]) -> dict[str, object]:
    mine = {n: s for n, s in status.items() if any(fnmatch.fnmatchcase(n, g) for g in GROUPS[group])}
    counts = Counter(mine.values())
    return {
        "group": group,
        "mutants": len(mine),
        "killed": sum(n for s, n in counts.items() if s in KILLED),
        "survived": counts.get("survived", 0),
        "no_tests": counts.get("no tests", 0),
        "other": {s: n for s, n in counts.items() if s not in KILLED | {"survived", "no tests"}},
        "survivors": sorted(n for n, s in mine.items() if s == "survived"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", choices=[[], *GROUPS], default=[], help="default: all")
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    ap.add_argument("--no-run", action="store_true", help="only tally the results already in mutants/")
    args = ap.parse_args()
    groups = args.groups or DEFAULT_GROUPS
    if args.fresh:
        for work in {workdir(g) for g in groups}:
            shutil.rmtree(work / "mutants", ignore_errors=True)
    rows = []
    for group in groups:
        started = time.monotonic()
        work = workdir(group)
        if not args.no_run:
            cmd = [MUTMUT, "run", "--max-children", str(args.max_children), *GROUPS[group]]
            subprocess.run(cmd, cwd=work, check=False, stdout=subprocess.DEVNULL)
        row = tally(group, results(work))
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(
            f"{group:9s} mutants {row['mutants']:4d}  killed {row['killed']:4d}  survived {row['survived']:3d}  "
            f"no tests {row['no_tests']:3d}  other {row['other']}  ({row['seconds']} s)",
            flush=True,
        )
        if args.survivors:
            for name in row["survivors"]:  # type: ignore[attr-defined]
                diff = subprocess.run([MUTMUT, "show", name], cwd=work, capture_output=True, text=True).stdout
                changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
                print(f"  {name}\n    " + "\n    ".join(changed))
    out = ROOT / "runs" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
