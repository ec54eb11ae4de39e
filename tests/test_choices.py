"""kernels/choices.py: which GEMM kind and config a launch takes, from the shipped table of the GPU's architecture or
the rule, the same in every process by construction; the shipped tables name only options that exist."""
import json

import pytest
import torch

from phi3.kernels import choices

SITES = {"fwd": ["tma", "cublas"], "dx": ["tma", "cublas"], "nf4.fwd": ["nf4", "nf4-cublas"],
         "nf4.dx": ["nf4", "nf4-cublas"], **{
    f"{site}.{kernel}": list(choices.CONFIGS[kernel]) for site, kernel in
    [("fwd", "tma"), ("dx", "tma"), ("fwd.low-rank", "gemm"), ("dx.low-rank", "gemm"), ("fwd", "gemm"),
     ("dx", "gemm"), ("down", "down"), ("dy", "dy"), ("da", "da"), ("nf4.fwd", "nf4"), ("nf4.dx", "nf4"),
     ("nf4.fwd", "nf4-decode"), ("nf4.dx", "nf4-decode"), ("nf4.fwd.low-rank", "gemm"), ("nf4.dx.low-rank", "gemm"),
     ("nf4", "nf4-dequantize")]}}
GPU = torch.device("cuda")  # (never touched: the architecture is given)


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(choices, "architecture", lambda device: "sm90")


def test_every_shipped_table_names_known_options_for_well_formed_keys():
    for path in sorted(choices.TABLES.glob("*.json")):
        data = json.loads(path.read_text())
        assert path.stem == data["architecture"] and data["choices"], path
        for key, option in data["choices"].items():
            site, *numbers = key.split()
            assert site in SITES and option in SITES[site], (path.name, key, option)
            bucket, n, k, rank, dropout = map(int, numbers)
            # (rank 0: a 4-bit layer without LoRA, or the dequantize kernel)
            assert bucket == choices.key(bucket, n, k, rank, dropout)[0] and dropout in (0, 1) and min(n, k) > 0
            assert rank > 0 or site.startswith("nf4"), (path.name, key)


def test_the_table_decides_then_the_nearest_bucket_then_the_rule(hopper):
    table = {"fwd 8192 9216 3072 16 0": "cublas", "fwd 2048 9216 3072 16 0": "tma", "down 8192 16 3072 16 1": "64x256 s3"}
    choices.use_table(table)
    try:
        pick = lambda site, key, options=("tma", "cublas"): choices.choose(site, key, list(options), None, GPU)
        assert pick("fwd", (8192, 9216, 3072, 16, 0)) == "cublas"
        assert pick("fwd", (16384, 9216, 3072, 16, 0)) == "cublas"  # the nearest bucket of that shape
        assert pick("fwd", (4096, 9216, 3072, 16, 0)) == "cublas"  # equally near 2048 and 8192: the larger
        assert pick("fwd", (1024, 9216, 3072, 16, 0)) == "tma"
        assert pick("fwd", (8192, 9216, 3072, 8, 0)) == "tma"  # another rank: no entry of that shape, the rule
        assert pick("fwd", (8192, 9216, 3072, 16, 0), ["cublas"]) == "cublas"  # one option: no choice to make
        assert pick("dx", (8192, 9216, 3072, 16, 0)) == "tma"  # the site is part of the key
        assert pick("down", (8192, 16, 3072, 16, 1), list(choices.CONFIGS["down"])) == "64x256 s3"
        choices.use_table({"fwd 8192 9216 3072 16 0": "concat"})  # an option that no longer exists: the rule
        assert pick("fwd", (8192, 9216, 3072, 16, 0)) == "tma"
    finally:
        choices.use_table(None)


def test_the_rule_is_the_first_option_and_small_tiles_for_fp32_or_the_interpreter(hopper, monkeypatch):
    choices.use_table({})
    try:
        x = torch.empty(8, 8, dtype=torch.bfloat16)
        monkeypatch.setattr(choices.launch, "INTERPRET", False)
        for kernel, configs in choices.CONFIGS.items():
            assert choices.config("site", kernel, (8192, 1, 1, 16, 0), x, None) is next(iter(configs.values()))
            assert choices.config("site", kernel, (8192, 1, 1, 16, 0), x.float(), None) is choices.SMALL[kernel]
        monkeypatch.setattr(choices.launch, "INTERPRET", True)
        assert choices.config("site", "tma", (8192, 1, 1, 16, 0), x, None) is choices.SMALL["tma"]
    finally:
        choices.use_table(None)


def test_a_timer_sees_every_option_and_its_pick_is_taken(hopper, monkeypatch):
    monkeypatch.setattr(choices.launch, "INTERPRET", False)
    ran, asked = [], []

    def timer(key, options, run):
        asked.append((key, options))
        for option in options:
            run(option)
        return options[-1]
    choices.set_timer(timer)
    try:
        x = torch.empty(8, 8, dtype=torch.bfloat16)
        config = choices.config("dx", "dy", (4096, 3072, 16, 16, 0), x, ran.append)
    finally:
        choices.set_timer(None)
    assert asked == [("dx.dy 4096 3072 16 16 0", list(choices.CONFIGS["dy"]))]
    assert ran == list(choices.CONFIGS["dy"].values()) and config is list(choices.CONFIGS["dy"].values())[-1]


def test_keys_bucket_token_counts_by_powers_of_two():
    assert choices.key(8192, 9216, 3072, 16, True) == (8192, 9216, 3072, 16, 1)
    assert choices.key(8000, 9216, 3072, 16, False)[0] == choices.key(4097, 1, 1, 1, 0)[0] == 8192
    assert choices.key(1, 1, 1, 1, 0)[0] == 16


def test_a_config_too_large_for_the_gpu_gives_way_to_the_next(hopper, monkeypatch):
    """On a GPU with less shared memory than Hopper's (an RTX 4090: 99 KB a block) the rule's config may not fit:
    its launch raises OutOfResources, the next config of the list runs, and later launches go to it directly."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(choices.launch, "INTERPRET", False)
    monkeypatch.setattr(choices, "_fits", {})
    first, second = list(choices.CONFIGS["gemm"].values())[:2]
    tried = []

    def run(cfg):
        tried.append(cfg)
        if cfg is first:
            raise OutOfResources(131072, 101376, "shared memory")
    choices.use_table({})
    try:
        x = torch.empty(8, 8, dtype=torch.bfloat16)
        choices.launch_with("fwd.low-rank", "gemm", (8192, 9216, 3072, 16, 0), x, run)
        choices.launch_with("fwd.low-rank", "gemm", (8192, 9216, 3072, 16, 0), x, run)
    finally:
        choices.use_table(None)
    assert tried == [first, second, second]


HOPPER_SHARED_BYTES = 227 * 1024  # per block on an H100 / H200 (sm90)


@pytest.mark.parametrize("kernel, operand_bytes", [("tma", 2), ("tma-fp8", 1), ("gemm", 2)])
def test_every_tma_and_gemm_config_fits_hoppers_shared_memory(kernel, operand_bytes):
    """A config whose pipeline (stages x the A and B tiles) exceeds the shared memory of the only GPUs these GEMMs
    are tuned for never runs as itself: launch_with falls back to another (FP8's 5-stage 128x256 did, on an H100)."""
    for name, config in choices.CONFIGS[kernel].items():
        tiles = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * operand_bytes
        assert config["num_stages"] * tiles <= HOPPER_SHARED_BYTES, f"{kernel} {name}: {config['num_stages']} x {tiles} B"
