"""Mutation testing of the modules that guard the invariants (`make mutation`; not run by CI).

mutmut 3 (configured in pyproject.toml, [tool.mutmut]) copies the tree into mutants/ (git-ignored), makes
every mutant of the selected functions and runs, for each, only the tests of the selection that cover the
function. This script runs one group (or all) and tallies the outcome per group:

    .venv/bin/python scripts/mutation.py                  # the fast groups: merge, cursor, index
    .venv/bin/python scripts/mutation.py merge cursor     # some groups
    .venv/bin/python scripts/mutation.py --fresh ...      # drop mutants/ first (after editing tests)
    .venv/bin/python scripts/mutation.py --survivors merge  # list each survivor with its diff

Killed = a covering test failed (or the mutant timed out: an endless loop); survived = every covering test
passed; no tests = no test of the selection reaches the function. The figures and the reasons for the
survivors left are in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
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
    "lease": ["worker.backfill.x_reap_orphans__*"],  # expired leases with no attempt left end `failed`
    "claim": ["worker.backfill.x_claim__*"],
    "rollouts": ["service.rollouts.x_complete__*"],  # the transition that switches the serving model
}
# The tests run against each mutant: the union in pyproject.toml ([tool.mutmut]); mutmut runs, per mutant,
# only those that cover the mutated function.
# lease, claim and rollouts re-run the Postgres worker tests for every mutant, and a mutant that stops the
# reaper or the claim makes them wait for their timeouts: minutes per mutant on 2 shared cores. Opt-in.
DEFAULT_GROUPS = ["merge", "cursor", "index"]
KILLED = {"killed", "timeout"}


def results() -> dict[str, str]:
    """Every mutant mutmut knows of -> its status (killed, survived, timeout, no tests, not checked...)."""
    out = subprocess.run([MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
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
    ap.add_argument("groups", nargs="*", choices=[[], *GROUPS], default=[], help="default: merge cursor index")
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    ap.add_argument("--no-run", action="store_true", help="only tally the results already in mutants/")
    args = ap.parse_args()
    groups = args.groups or DEFAULT_GROUPS
    if args.fresh:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    rows = []
    for group in groups:
        started = time.monotonic()
        if not args.no_run:
            cmd = [MUTMUT, "run", "--max-children", str(args.max_children), *GROUPS[group]]
            subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
        row = tally(group, results())
        row["seconds"] = round(time.monotonic() - started, 1)
        rows.append(row)
        print(
            f"{group:9s} mutants {row['mutants']:4d}  killed {row['killed']:4d}  survived {row['survived']:3d}  "
            f"no tests {row['no_tests']:3d}  other {row['other']}  ({row['seconds']} s)",
            flush=True,
        )
        if args.survivors:
            for name in row["survivors"]:  # type: ignore[attr-defined]
                diff = subprocess.run([MUTMUT, "show", name], cwd=ROOT, capture_output=True, text=True).stdout
                changed = [ln for ln in diff.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
                print(f"  {name}\n    " + "\n    ".join(changed))
    out = ROOT / "runs" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
