"""moelab installed from a wheel (not editable) works from any directory: its data ships inside the package.

The wheel is built from a copy of the checkout's sources (so that setuptools' build/ and egg-info folders neither
land in the checkout nor carry stale modules into the wheel) and installed into a scratch venv with no network.
The scratch venv sees the main venv's packages through a path line in a ``.pth`` file: Python adds that folder to
``sys.path`` without running the ``.pth`` files inside it, so the editable install's ``__editable__`` path line
(which points at ``src/``) is not loaded and ``import moelab`` can only find the installed wheel.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("notebooks/*.ipynb", "notebooks/exercises/*.ipynb", "notebooks/solutions/*.ipynb")

CHECK = """
import json, sys
from pathlib import Path

config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
import moelab
assert Path(moelab.__file__).is_relative_to(sys.prefix), f"moelab imported from {moelab.__file__}"
assert not any(p and Path(p).resolve().is_relative_to(config["src"]) for p in sys.path), sys.path

from moelab.data import load_corpus
data = load_corpus()
assert list(data.domains) == ["arithmetic", "english", "code", "facts", "chinese"], data.domains

from moelab import presets
counts = presets.meta_counts(presets.deepseek_v3())
assert counts["total"] == presets.analytic_counts(presets.deepseek_v3())["total"], counts

from moelab.experiments import moe_vs_dense
model, results = moe_vs_dense.load_trained(), moe_vs_dense.load_results()
assert results["experiment"] == "moe_vs_dense" and not model.training

from moelab.bench import target, write_result
path = write_result("probe", [], [target("one", 1.0, "<=", 2.0)], directory=Path("bench-results"))
assert path.resolve() == Path.cwd() / "bench-results" / "probe.json"
assert json.loads(path.read_text(encoding="utf-8"))["benchmark"] == "probe"

failed = []
for line in config["imports"]:
    try:
        exec(line, {})
    except ImportError as err:
        failed.append(f"{line}  ->  {err}")
assert not failed, "notebook imports that fail:\\n" + "\\n".join(failed)
print("installed moelab OK:", len(config["imports"]), "notebook imports")
"""


def notebook_imports() -> list[str]:
    """Every ``import``/``from ... import`` statement in the code cells of the notebooks, exercises and solutions."""
    statements = set()
    for pattern in NOTEBOOKS:
        for path in sorted(ROOT.glob(pattern)):
            for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
                if cell["cell_type"] == "code":
                    tree = ast.parse("".join(cell["source"]), filename=str(path))
                    statements |= {ast.unparse(node) for node in ast.walk(tree)
                                   if isinstance(node, (ast.Import, ast.ImportFrom))}
    return sorted(statements)


def run(*args, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_finds_its_data_and_every_notebook_import(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "wheels", source,
        cwd=tmp_path)
    wheel, = (tmp_path / "wheels").glob("moelab-*.whl")

    scratch = tmp_path / "venv"
    venv.create(scratch, with_pip=False)
    python = scratch / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    main_site = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "main_venv.pth").write_text("".join(f"{path}\n" for path in main_site), encoding="utf-8")
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"src": str(ROOT / "src"), "imports": notebook_imports()}), encoding="utf-8")
    (tmp_path / "check.py").write_text(CHECK, encoding="utf-8")
    out = run(python, "check.py", config, cwd=tmp_path)
    assert "installed moelab OK" in out
