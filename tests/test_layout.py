"""The layout holds: the daemon loads neither torch, wfdb nor training code; the tools load no torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.conftest import REPO

SERVE = "import pipeline.cli, pipeline.process.serve; pipeline.cli.build_parser(); pipeline.process.serve.Daemon"
TOOLS = ("import pipeline.tools.replay, pipeline.tools.demo, pipeline.tools.bench, pipeline.tools.alerts, "
         "pipeline.tools.records, pipeline.tools.broker, pipeline.tools.embedded_broker")


def modules_after(code: str) -> set[str]:
    """Top-level names of every module a fresh interpreter has loaded after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=REPO, timeout=120)
    return {name.split(".")[0] for name in json.loads(out.stdout.splitlines()[-1])}


def test_what_ecgmon_serve_runs_loads_no_torch_wfdb_or_training_code() -> None:
    loaded = modules_after(SERVE)
    assert loaded & {"torch", "wfdb", "train", "matplotlib", "starlette", "uvicorn", "playwright"} == set()
    assert "pipeline" in loaded


def test_the_daemon_never_loads_the_central_station() -> None:
    out = subprocess.run([sys.executable, "-c", f"{SERVE}\nimport sys; print(sorted(m for m in sys.modules "
                          "if m.startswith('pipeline.tools')))"], capture_output=True, text=True, check=True,
                         cwd=REPO, timeout=120)
    assert "pipeline.tools.station" not in out.stdout


def test_the_operator_tools_load_no_torch_and_no_training_code() -> None:
    loaded = modules_after(TOOLS)
    assert loaded & {"torch", "train"} == set()
    assert "wfdb" not in modules_after("import pipeline.tools.replay, pipeline.tools.demo, pipeline.tools.bench")


def test_the_daemon_core_imports_only_its_declared_dependencies() -> None:
    """README: the daemon's core needs numpy, scipy, onnxruntime and paho-mqtt, with pydantic, PyYAML,
    prometheus-client and msgpack for its config, metrics and state (and pika for the RabbitMQ source only): every
    import in
    pipeline/ (its io, analysis, detectors, alarms and process folders), the tools and cli.py (the entry point of all
    three parts, importing each lazily) aside."""
    allowed = {"numpy", "scipy", "onnxruntime", "paho", "pydantic", "yaml", "prometheus_client", "msgpack"}
    ours = {"pipeline", "models", "__future__"}
    imported: dict[str, set[str]] = {}
    core = [p for p in (REPO / "pipeline").rglob("*.py") if p.name != "cli.py" and "tools" not in p.parts]
    assert len(core) > 25  # every core module, in its folder
    for path in sorted(core):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(path.name)
    third_party = {m: files for m, files in imported.items() if m not in sys.stdlib_module_names and m not in ours}
    optional = {"pika": {"rabbit.py", "rabbit_sink.py"}}  # the [cluster] extra, only with `source: rabbitmq`
    assert {m for m, files in third_party.items() if m not in allowed and not files <= optional.get(m, set())} == set()
