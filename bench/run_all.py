"""Run every benchmark (each in its own process) and summarise the targets.

    .venv/bin/python bench/run_all.py           # about 3-4 minutes
    .venv/bin/python bench/run_all.py --quick   # about 1 minute
    make bench

Exit status 0 even when a target is missed (the figures are the product; read them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import BENCH, print_environment

_HEADINGS = ("# per-task", "# http", "# probe", "# detection", "# celery")
SCRIPTS = (
    "per_task.py",
    "http_load.py",
    "probe_cost.py",
    "detection_latency.py",
    "celery_cost.py",
    "celery_worker_cost.py",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1 minute in all")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated scripts")
    args = parser.parse_args()
    print_environment()
    checks: list[str] = []
    started = time.monotonic()
    for script in args.only.split(","):
        command = [sys.executable, str(BENCH / script)]
        if args.quick:
            command.append("--quick")
        print(f"\n## {script}{' --quick' if args.quick else ''}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith("# ") and not line.startswith(_HEADINGS):
                continue  # environment lines: printed once above
            print(line)
            if line.endswith(("-> met", "-> MISSED")):
                checks.append(line)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            checks.append(f"{script}: FAILED (exit {proc.returncode})")
        print(f"({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"\n## targets ({time.monotonic() - started:.0f} s in all)")
    for line in checks:
        print(line)


if __name__ == "__main__":
    main()
