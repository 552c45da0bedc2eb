"""Run FastAPI's and Starlette's own test suites with taskscope switched on.

Each suite runs from its sdist, unmodified, first without taskscope (the baseline, cached
per version), then once per way a user switches taskscope on (see ``plugin.py``). A run
passes when it has no failure beyond the baseline's and taskscope recorded the tasks the
suite ran. Usage::

    python tests/peers/run.py [--pair newest|oldest] [--suite fastapi|starlette] [-n N]

``newest`` is the FastAPI/Starlette pair the dev environment (``.venv``) resolves;
``oldest`` the oldest pair taskscope supports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "peers"
OLDEST = {"fastapi": "0.115.0", "starlette": "0.38.6"}
# What the oldest pair's suites were released against where a newer release breaks them
# under their own ``filterwarnings = error`` (python-multipart 0.0.13 renamed its module).
# anyio as old as taskscope allows: newer releases deprecate and change what these suites
# use (BlockingPortal's alias, CancelScope.cancel's signature) and fail them wholesale.
# bcrypt 4.1 broke passlib (FastAPI 0.115's tutorials hash passwords with it).
OLDEST_PINS = ("python-multipart<0.0.13", "anyio[trio]==4.4.0", "httpx<0.28", "bcrypt<4.1")
MODES = {
    "fastapi": ("dropin", "instrument-before", "instrument-after"),
    "starlette": ("instrument", "replace"),
}
MAX_RECHECKED = 20  # more new failures than this: taskscope broke something, no re-run
# Test requirements of old sdists that taskscope's own floor overrides.
OVERRIDES = {"anyio": "anyio[trio]==4.4.0"}
# Documentation and packaging tools listed beside the test requirements: not needed to test.
NOT_FOR_TESTS = re.compile(r"^(mkdocs|mkautodoc|mkdocstrings|build|twine)\b", re.IGNORECASE)


@dataclass
class Result:
    suite: str
    mode: str
    passed: int
    failed: set[str]
    recorded: dict[str, float]
    seconds: float


def _quiet(command: list[str]) -> None:
    """Run a pip command; its output is shown only if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise subprocess.CalledProcessError(done.returncode, command)


def dev_versions() -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json;"
        "print(json.dumps({p: m.version(p) for p in ('fastapi', 'starlette')}))"
    )
    out = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-c", code],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    versions: dict[str, str] = json.loads(out)
    return versions


def sdist(package: str, version: str, pip: Path) -> Path:
    """The unpacked sdist (tests included), downloaded once."""
    target = CACHE / "src" / f"{package}-{version}"
    if (target / "tests").is_dir():
        return target
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(pip),
            "download",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(downloads),
            f"{package}=={version}",
        ],
        check=True,
    )
    (archive,) = downloads.glob(f"{package}-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(CACHE / "src", filter="data")
    return target


def requirement_lines(path: Path) -> list[str]:
    """A requirements file's lines, ``-r`` included; editable self-installs dropped."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-e"):
            continue
        if line.startswith("-r"):
            lines += requirement_lines(path.parent / line[2:].strip())
            continue
        if NOT_FOR_TESTS.match(line):
            continue
        name = re.split(r"[\[<>=!~ ;]", line, maxsplit=1)[0].lower()
        lines.append(OVERRIDES.get(name, line))
    return lines


def test_requirements(source: Path, package: str) -> list[str]:
    """What the suite's own project says its tests need."""
    project = tomllib.loads((source / "pyproject.toml").read_text())
    groups = project.get("dependency-groups", {})
    group = "tests" if "tests" in groups else "dev" if "dev" in groups else None
    if group is not None:
        return ["--group", f"{source / 'pyproject.toml'}:{group}"]
    for name in ("requirements-tests.txt", "requirements.txt"):
        if (source / name).exists():
            return requirement_lines(source / name)
    msg = f"{package}: no test requirements found in {source}"
    raise RuntimeError(msg)


def environment(suite: str, versions: dict[str, str]) -> tuple[Path, Path]:
    """A venv for one suite: the pair of frameworks, the suite's own test requirements
    (their tool pins may clash with the other suite's) and taskscope (editable)."""
    key = (
        f"{suite}-{versions[suite]}_fastapi-{versions['fastapi']}_starlette-{versions['starlette']}"
    )
    venv = CACHE / f"venv-{key}"
    python = venv / "bin" / "python"
    pip = venv / "bin" / "pip"
    if not pip.exists():  # new, or left half-made by an interrupted run
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _quiet(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--upgrade",
                "pip",
            ]
        )
    source = sdist(suite, versions[suite], pip)
    stamp = venv / ".installed"
    if not stamp.exists() or (ROOT / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        frameworks = [f"starlette[full]=={versions['starlette']}"]
        if suite == "fastapi":
            frameworks.append(f"fastapi[all]=={versions['fastapi']}")
        requirements = ["-e", str(ROOT), *frameworks, "pytest-xdist"]
        if versions == OLDEST:
            requirements += OLDEST_PINS
        requirements += test_requirements(source, suite)
        print(f"peer suites: installing the test requirements of {key}", flush=True)
        _quiet([str(pip), "install", "-q", "--disable-pip-version-check", *requirements])
        stamp.touch()
    return python, source


def run_suite(
    python: Path,
    source: Path,
    suite: str,
    mode: str,
    workers: int,
    out: Path,
    tests: Sequence[str] = ("tests",),
) -> Result:
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "TASKSCOPE_PEER_MODE": mode,
        "TASKSCOPE_PEER_OUT": str(out),
        "PYTHONPATH": str(ROOT / "tests" / "peers"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # The suite's own configuration (pyproject.toml) applies unchanged.
    command = [str(python), "-m", "pytest", "-p", "plugin", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "no:sugar"]
    if workers > 1:
        command += ["-n", str(workers)]
    command += tests
    started = time.monotonic()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        subprocess.run(
            command, cwd=source, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False
        )
    seconds = time.monotonic() - started
    result_file = out / "result.json"
    if not result_file.exists():
        msg = f"{suite} [{mode}]: pytest wrote no result (see {log})"
        raise RuntimeError(msg)
    data = json.loads(result_file.read_text())
    recorded: dict[str, float] = {}
    for records in out.glob("records-*.json"):
        for outcome, count in json.loads(records.read_text()).items():
            recorded[outcome] = recorded.get(outcome, 0.0) + count
    return Result(suite, mode, data["passed"], set(data["failed"]), recorded, seconds)


def confirm(
    python: Path, source: Path, suite: str, mode: str, out: Path, failed: Sequence[str]
) -> tuple[set[str], set[str]]:
    """Run each new failure again, alone in a process of its own: (still failing, flaky).

    Some old suites fail a test at random when the garbage collector happens to finalize an
    unclosed stream of an earlier test inside it (``ResourceWarning`` under
    ``filterwarnings = error``): a real failure fails again; such a one passes. Alone
    means alone: re-run together, one such test's leftover stream can fail the next.
    """
    if not failed or len(failed) > MAX_RECHECKED or any(f.startswith("collect:") for f in failed):
        return set(failed), set()
    still: set[str] = set()
    for number, nodeid in enumerate(failed):
        again = run_suite(python, source, suite, mode, 1, out / str(number), tests=[nodeid])
        if nodeid in again.failed:
            still.add(nodeid)
    return still, set(failed) - still


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=("newest", "oldest"), default="newest")
    parser.add_argument("--suite", choices=tuple(MODES), action="append")
    parser.add_argument("-n", "--workers", type=int, default=2)
    args = parser.parse_args()
    versions = dev_versions() if args.pair == "newest" else dict(OLDEST)
    problems: list[str] = []
    rows: list[str] = []
    for suite in args.suite or tuple(MODES):
        version = versions[suite]
        python, source = environment(suite, versions)
        results = CACHE / "results" / f"{suite}-{version}"
        baseline_file = CACHE / "baselines" / f"{suite}-{version}.json"
        if baseline_file.exists():
            cached = json.loads(baseline_file.read_text())
            baseline = Result(suite, "off", cached["passed"], set(cached["failed"]), {}, 0.0)
        else:
            baseline = run_suite(python, source, suite, "off", args.workers, results / "off")
            baseline_file.parent.mkdir(parents=True, exist_ok=True)
            baseline_file.write_text(
                json.dumps({"passed": baseline.passed, "failed": sorted(baseline.failed)})
            )
        rows.append(
            f"{suite} {version} without taskscope: {baseline.passed} passed, "
            f"{len(baseline.failed)} failed"
            + (f" ({baseline.seconds:.0f} s)" if baseline.seconds else " (cached)")
        )
        if len(baseline.failed) > 0.02 * (baseline.passed + len(baseline.failed)):
            problems.append(
                f"{suite} {version}: {len(baseline.failed)} failures without taskscope: "
                "the environment is broken, so the comparison would prove nothing"
            )
        for mode in MODES[suite]:
            result = run_suite(python, source, suite, mode, args.workers, results / mode)
            new_now = sorted(result.failed - baseline.failed)
            still, flaky = confirm(python, source, suite, mode, results / f"{mode}-again", new_now)
            new = sorted(still)
            tasks = int(sum(result.recorded.values()))
            outcomes = ", ".join(f"{k} {int(v)}" for k, v in sorted(result.recorded.items()))
            rows.append(
                f"{suite} {version} [{mode}]: {result.passed} passed, {len(result.failed)} "
                f"failed, {len(new)} new"
                + (
                    f" ({len(flaky)} more failed once, passed again: {sorted(flaky)})"
                    if flaky
                    else ""
                )
                + f"; taskscope recorded {tasks} tasks ({outcomes}) "
                f"({result.seconds:.0f} s)"
            )
            problems += [f"{suite} [{mode}] new failure: {nodeid}" for nodeid in new]
            if tasks == 0:
                problems.append(f"{suite} [{mode}]: taskscope recorded no task (vacuous run)")
    print("\n".join(["", "peer suites (" + args.pair + "):", *rows]))
    if problems:
        print("\n".join(["", *problems]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
