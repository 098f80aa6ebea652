"""The folders' arrows point one way: trainables/ is plain PyTorch (no Ray, no MLflow), data/ knows no
orchestrator or trainables, and the Ray Train worker lives in orchestrator/."""

from __future__ import annotations

import subprocess
import sys

from .conftest import REPO

BLOCK = """
import importlib, importlib.abc, pkgutil, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            raise ImportError(f"blocked import of {{name}}")
sys.meta_path.insert(0, Block())
import {package}
for module in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(module.name)
print("ok")
"""


def _imports_without(package: str, blocked: set[str]) -> subprocess.CompletedProcess:
    code = BLOCK.format(package=package, blocked=sorted(blocked))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_trainables_import_neither_ray_nor_mlflow():
    result = _imports_without("trainables", {"ray", "mlflow", "orchestrator"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_worker_function_lives_in_the_orchestrator():
    from orchestrator.worker import train_loop_per_worker as worker

    assert worker.__module__ == "orchestrator.worker"


def test_the_trial_and_controller_processes_do_not_import_the_models():
    # The Tune trial process imports orchestrator.sweep and the Train controller orchestrator.train (for its
    # callbacks); each trial starts both, so timm, torchvision and the models would cost seconds of CPU each time.
    code = ("import sys, orchestrator.sweep, orchestrator.train; "
            "print(sorted(m for m in ('timm', 'torchvision', 'trainables.models', 'trainables.pir_at') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])


def test_data_imports_neither_the_orchestrator_nor_trainables():
    result = _imports_without("data", {"orchestrator", "trainables", "mlflow"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
