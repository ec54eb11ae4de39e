"""Make the kernel choices the repository ships for this GPU model (phi3/kernel_choices/), run on that GPU.

    python3 bench/make_kernel_choices.py            # writes phi3/kernel_choices/<GPU name>.json

A first run on a fresh machine then times no kernel for the shapes below (phi3/kernel_tuning.py reads the file;
issue 12, item 7: launch to the end of step 10 no slower than transformers + peft, cold). The file is tied to the
timed kernels (kernels/gemm.py, lowrank.py) and the configs they choose among (launch.py): after a change there,
run this again on each GPU model that has a file (the test suite fails until then). Shapes covered, LoRA as
train.py's defaults (r16, alpha 32, dropout 0.05, qkv/o/gate_up/down, gradient checkpointing): Phi-3-mini up to
131,072 tokens per micro-batch (the 128k model's longest), and ranks 8, 32 and 64 up to 8,192 (4 x 2048, the
default batch); Phi-3-medium up to 8,192. Other shapes are timed by the run that meets them, once per machine
(~/.cache/phi3-lora).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["PHI3_KERNEL_CACHE"] = "off"  # every choice made here, by timing, in this process

from phi3.kernels import launch  # noqa: E402
from phi3.kernels.tuning import tuning_record  # noqa: E402  (after the switch above)
from phi3 import Phi3Config, kernel_tuning  # noqa: E402
from phi3.atomic import atomic_file  # noqa: E402
from phi3.lora import LoRAConfig  # noqa: E402

CONFIGS = REPO / "assets" / "configs"
RUNS = [("phi3-mini-4k-instruct", 16, 131072), ("phi3-mini-4k-instruct", 8, 8192), ("phi3-mini-4k-instruct", 32, 8192),
        ("phi3-mini-4k-instruct", 64, 8192), ("phi3-medium-4k-instruct", 16, 8192)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="file to write (default: the shipped one for this GPU)")
    p.add_argument("--quick", action="store_true", help="only Phi-3-mini r16 up to 8,192 tokens (train.py's defaults)")
    args = p.parse_args()
    if any(kernel_tuning.settings().values()):
        sys.exit(f"unset {', '.join(kernel_tuning.SETTINGS)}: shipped choices are for the default kernel settings")
    device = torch.device("cuda")
    name, capability = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    for config_name, rank, max_tokens in [("phi3-mini-4k-instruct", 16, 8192)] if args.quick else RUNS:
        started = time.perf_counter()
        # the model cut to two layers (their LoRA shapes are every layer's), LoRA and checkpointing as train.py's
        config = Phi3Config.from_json(CONFIGS / config_name / "config.json")
        lora = LoRAConfig(rank=rank, alpha=2 * rank, dropout=0.05)
        model = kernel_tuning.stand_in(config, lora, device, torch.bfloat16)
        with launch.compile_ahead(device):
            kernel_tuning.tune_lora_layers(model, max_tokens, torch.bfloat16)
        kernel_tuning.tune_lora_layers(model, max_tokens, torch.bfloat16)
        del model
        torch.cuda.empty_cache()
        print(f"{config_name} r{rank} up to {max_tokens:,} tokens: {time.perf_counter() - started:.0f} s, "
              f"{sum(len(part) for part in tuning_record().values() if isinstance(part, dict))} choices so far",
              flush=True)
    out = args.out or kernel_tuning.shipped_file(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_text(kernel_tuning.shipped_text(name, capability, tuning_record()))
    print(f"wrote {out} ({name}, sm{capability[0]}{capability[1]})")


if __name__ == "__main__":
    main()
