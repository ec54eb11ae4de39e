"""The repository builds as a package: a wheel holds phi3 and kernels and nothing else, and works installed."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install setuptools)")
    src = tmp_path_factory.mktemp("src")  # a copy: building in place would leave build/ in the checkout
    for name in ("pyproject.toml", "README.md", "phi3", "kernels"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (found,) = out.glob("phi3_lora-*.whl")
    return found


def test_wheel_holds_phi3_and_kernels_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"phi3", "kernels"}
    for package in ("phi3", "kernels"):  # every module of the source tree made it in
        assert {f"{package}/{p.name}" for p in (REPO / package).glob("*.py")} <= set(names)
    choices = {f"phi3/kernel_choices/{p.name}" for p in (REPO / "phi3" / "kernel_choices").glob("*.json")}
    assert choices and choices <= set(names)  # the shipped kernel choices, which phi3/kernel_tuning.py reads


def test_installed_wheel_works_as_a_library(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code = ("import phi3, kernels, torch; from phi3 import load_model, load_tokenizer; "
            "from phi3.lora import LoRAConfig, add_lora; "
            "m = load_model(%r); t = load_tokenizer(%r); add_lora(m, LoRAConfig(rank=2)); "
            "ids, _ = t.render([{'role': 'user', 'content': 'Hi'}]); print(phi3.__file__, m(torch.tensor([ids])).shape)"
            % (str(REPO / "models" / "tiny-phi3"), str(REPO / "models" / "tiny-phi3")))
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(site))
