"""The package imports one way (core < ops < compiler < exporters < runtime < app), without cycles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("tools_layers", ROOT / "tools" / "layers.py")
layers = sys.modules.setdefault("tools_layers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(layers)

# In a fresh interpreter: import every module, bottom layer first; after each layer, no module of a higher
# layer may have been loaded. A module-level cycle fails its import; an upward import shows as a module loaded
# too early.
_IMPORT_ALL = """
import importlib, json, sys
order, rank, top = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
def layer(m):
    parts = m.split(".")
    return "core" if parts == [top] else (parts[1] if parts[1] in rank and parts[1] != "app" else "app")
problems = []
for current in sorted({layer(m) for m in order}, key=rank.get):
    for m in [m for m in order if layer(m) == current]:
        try:
            importlib.import_module(m)
        except Exception as exc:
            problems.append(f"{m}: {type(exc).__name__}: {exc}")
    early = sorted(m for m in sys.modules if (m == top or m.startswith(top + ".")) and rank[layer(m)] > rank[current])
    problems += [f"importing the {current} layer loaded {m}" for m in early]
print(json.dumps(problems))
"""


def test_no_upward_import_and_no_cycle() -> None:
    result = layers.analyse(ROOT)
    assert result["files"], "tools/layers.py found no modules"
    assert not result["violations"], layers.report(result)
    assert not result["cycles"], layers.report(result)


def test_every_module_imports_in_layer_order_in_a_fresh_interpreter() -> None:
    order = layers.layer_order(ROOT)
    run = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(order), json.dumps(layers.RANK), layers.TOP],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    problems = json.loads(run.stdout.strip().splitlines()[-1])
    assert problems == []
