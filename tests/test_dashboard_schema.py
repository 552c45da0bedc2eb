"""dashboards/*.json type-check against Grafana's own dashboard schema.

Each dashboard is inlined as a TypeScript object literal typed as ``Dashboard`` from the npm
package ``@grafana/schema`` (the version of the Grafana image in deploy/docker-compose.yml)
and compiled with ``tsc --noEmit``: a misspelt or misplaced field is an excess property, a
wrong type a type error. scripts/ensure-node-tools (run by scripts/test) installs both.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
TOOLS = ROOT / ".venv" / "node-tools"
PINNED = ROOT / "tests" / "dashboard-schema" / "package.json"
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "noEmit": True,
        "target": "ES2020",
        "module": "ESNext",
        "moduleResolution": "node",
        "skipLibCheck": True,
        "types": [],
    },
    "files": ["dashboard.ts"],
}


# JSON has no TypeScript enums: a string enum (e.g. FieldColorModeId) is accepted as the
# union of its values, as Grafana reads them from JSON. Everything else stays as strict as
# the schema (excess-property checks included: the mapping keeps every object's keys).
AS_JSON = """\
type AsJson<T> = T extends string
  ? `${T}`
  : T extends Array<infer U>
    ? Array<AsJson<U>>
    : T extends object
      ? { [K in keyof T]: AsJson<T[K]> }
      : T;
"""


def tsc() -> Path:
    found = TOOLS / "node_modules" / ".bin" / "tsc"
    if not found.exists():
        message = "tsc and @grafana/schema are not installed (scripts/ensure-node-tools)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def type_check(dashboard: object, workdir: Path) -> subprocess.CompletedProcess[str]:
    """Compile ``dashboard`` as ``const dashboard: AsJson<Dashboard> = <literal>``."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "node_modules").symlink_to(TOOLS / "node_modules")
    (workdir / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (workdir / "dashboard.ts").write_text(
        'import type { Dashboard } from "@grafana/schema";\n\n'
        f"{AS_JSON}\n"
        f"const dashboard: AsJson<Dashboard> = {json.dumps(dashboard, indent=2)};\n\n"
        "export default dashboard;\n"
    )
    return subprocess.run(
        [str(tsc()), "--project", str(workdir / "tsconfig.json"), "--pretty", "false"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_matches_grafanas_schema(path: Path, tmp_path: Path) -> None:
    """tsc accepts the dashboard as a ``Dashboard`` of @grafana/schema."""
    started = time.perf_counter()
    result = type_check(json.loads(path.read_text()), tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"tsc: {path.name} type-checked in {elapsed:.1f} s")


def test_a_typo_is_a_type_error(tmp_path: Path) -> None:
    """The check can fail: a misspelt panel field and a wrong type are both reported."""
    dashboard = json.loads(DASHBOARDS[0].read_text())
    dashboard["panels"][1]["gridPoss"] = dashboard["panels"][1].pop("gridPos")
    dashboard["refresh"] = 10
    result = type_check(dashboard, tmp_path)
    assert result.returncode != 0
    errors = re.findall(r"error (TS\d+)", result.stdout)
    assert sorted(errors) == ["TS2322", "TS2353"], result.stdout  # wrong type, unknown key
    assert "'\"gridPoss\"' does not exist" in result.stdout, result.stdout


def test_schema_version_matches_the_compose_grafana() -> None:
    """The pinned @grafana/schema is the Grafana the compose stack runs."""
    pinned = json.loads(PINNED.read_text())["devDependencies"]["@grafana/schema"]
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert compose["services"]["grafana"]["image"] == f"grafana/grafana:{pinned}"
    lock = json.loads((PINNED.parent / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@grafana/schema"]["version"] == pinned
