"""`deepspec.models` stays free of orchestration: no Prefect, MLflow or Hydra import."""

import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_models_import_no_orchestration_packages():
    modules = sorted(
        "deepspec.models." + ".".join(p.relative_to(MODELS).with_suffix("").parts)
        for p in MODELS.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'prefect', 'mlflow', 'hydra', 'omegaconf'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
