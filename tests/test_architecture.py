"""The architecture contract (pyproject.toml's [tool.importlinter]) holds, and it can fail: a scratch
copy of the package with one import planted against the flow in every layer breaks it at each plant.
And the CLI starts without torch or transformers."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module in a layer, module of the layer above it it must not import, planted at module level or in a function)
PLANTS = [
    ("transact_edge/shapes.py", "transact_edge.modeling", False),        # facts -> model
    ("transact_edge/loading.py", "transact_edge.prune", True),           # model -> prune
    ("transact_edge/plan.py", "transact_edge.llamacpp", False),          # prune -> runtimes
    ("transact_edge/llamacpp.py", "transact_edge.exporters.gguf", True),  # runtimes -> formats
    ("transact_edge/exporters/onnx.py", "transact_edge.devices.local", False),  # formats -> devices/bench
    ("transact_edge/devices/remote.py", "transact_edge.cli", True),      # devices/bench -> cli
]


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(tree)}  # the scratch copy shadows the installed package
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(tree / "pyproject.toml"),
                           "--no-cache"], cwd=tree, env=env, capture_output=True, text=True)


def test_the_contract_holds_and_catches_a_planted_violation_in_every_layer(tmp_path):
    kept = lint(ROOT)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "1 kept, 0 broken" in kept.stdout
    shutil.copytree(ROOT / "transact_edge", tmp_path / "transact_edge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for path, target, lazy in PLANTS:
        with open(tmp_path / path, "a") as f:
            f.write(f"\n\ndef _planted():\n    import {target}\n" if lazy else f"\nimport {target}  # noqa\n")
    broken = lint(tmp_path)
    assert broken.returncode == 1, broken.stdout
    for path, target, _ in PLANTS:
        importer = path.removesuffix(".py").replace("/", ".")
        assert f"- {importer} -> {target} (l." in broken.stdout, (importer, broken.stdout)
    assert str(tmp_path) in subprocess.run(  # the lint read the scratch copy, not the installed package
        [sys.executable, "-c", "import transact_edge; print(transact_edge.__file__)"],
        env=os.environ | {"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, cwd=tmp_path).stdout


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom transact_edge.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'gguf', 'onnx', 'onnxruntime') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "usage: transact-edge" in done.stdout


def test_modules_and_functions_stay_short():
    """Files that read top to bottom: no module over 400 lines, no function over 60 (the package, its tests
    and its benchmarks)."""
    import ast

    long = []
    for f in sorted(f for d in ("transact_edge", "tests", "benchmarks") for f in (ROOT / d).rglob("*.py")):
        src = f.read_text()
        if len(src.splitlines()) > 400:
            long.append(f"{f.relative_to(ROOT)}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
