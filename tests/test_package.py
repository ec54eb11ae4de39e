"""The repository builds as a package: a wheel holds phi3 (with the kernels as phi3.kernels) and nothing else, and
works installed from any folder."""

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
    for name in ("pyproject.toml", "README.md", "kernels"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, src / name)
    shutil.copytree(REPO / "phi3", src / "phi3", symlinks=True)  # phi3/kernels stays a link to ../kernels
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (found,) = out.glob("phi3_lora-*.whl")
    return found


# Import names that well-known distributions install at the top level: a wheel of ours holding one of them would
# overwrite or shadow that distribution (Hugging Face's `kernels`, required by transformers >= 5.25, took ours).
WELL_KNOWN = {"kernels", "transformers", "peft", "torch", "triton", "safetensors", "tokenizers", "numpy", "accelerate",
              "bitsandbytes", "datasets", "huggingface_hub", "vllm", "liger_kernel", "unsloth", "trl", "flash_attn",
              "xformers", "torchtune", "litgpt", "axolotl", "deepspeed", "lora", "loralib", "model", "models", "utils",
              "tests", "train", "sample", "bench", "examples", "src"}


def test_wheel_holds_one_package_of_its_own_name(wheel):
    """One top-level name, phi3, with the Triton kernels (the repository's kernels/ folder) inside as phi3.kernels;
    no name that a well-known or an installed distribution owns."""
    import importlib.metadata
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"phi3"}
    owned = importlib.metadata.packages_distributions()  # import name -> installed distributions
    assert not top & WELL_KNOWN and all(set(owned.get(name, [])) <= {"phi3-lora"} for name in top), owned
    assert {f"phi3/{p.name}" for p in (REPO / "phi3").glob("*.py")} <= set(names)  # every module of the tree
    assert {f"phi3/kernels/{p.name}" for p in (REPO / "kernels").glob("*.py")} <= set(names)
    tables = {f"phi3/kernels/tables/{p.name}" for p in (REPO / "kernels" / "tables").glob("*.json")}
    assert tables <= set(names)  # the kernels' tables per GPU architecture, which kernels/choices.py reads


def test_the_kernels_folder_is_not_importable_as_kernels():
    """kernels/ holds no __init__.py: from the repository root a top-level `import kernels` finds the installed
    distribution of that name (Hugging Face's), not this folder, which is phi3.kernels."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "phi3" / "kernels").resolve() == (REPO / "kernels").resolve()


def test_transformers_loads_a_model_from_the_repository_root():
    """The case Hugging Face's `kernels` broke: transformers imported from the repository root, beside ours."""
    code = ("import transformers, phi3.kernels.rmsnorm; from transformers import Phi3ForCausalLM; "
            "Phi3ForCausalLM.from_pretrained('models/tiny-phi3'); print('ok')")
    pytest.importorskip("transformers", reason="the oracle is installed by requirements-test.txt")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_installed_wheel_works_as_a_library(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code = ("import phi3, phi3.kernels.lora_linear, torch; from phi3 import load_model, load_tokenizer; "
            "from phi3.lora import LoRAConfig, add_lora; "
            "m = load_model(%r); t = load_tokenizer(%r); add_lora(m, LoRAConfig(rank=2)); "
            "ids, _ = t.render([{'role': 'user', 'content': 'Hi'}]); print(phi3.__file__, m(torch.tensor([ids])).shape)"
            % (str(REPO / "models" / "tiny-phi3"), str(REPO / "models" / "tiny-phi3")))
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(site))
