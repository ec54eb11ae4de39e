"""Progress within a long step: Progress.watch reports each layer's forward and backward, the live line shows it."""
import pytest
import torch

import phi3.progress as progress_module
from phi3.model import Recompute
from phi3.progress import Progress
from test_offload import lora_model


@pytest.mark.parametrize("recompute", [Recompute(), None])
def test_every_layer_is_reported_forward_then_backward(tmp_path, recompute):
    """Once each, in order: a checkpointed layer's forward, run again in the backward pass, is not a forward."""
    model = lora_model("cpu", torch.float32)
    model.recompute = recompute
    progress = Progress(10, 1, tmp_path / "metrics.jsonl")
    calls = []
    progress.within_step = lambda phase, layer, layers: calls.append((phase, layer, layers))
    progress.watch(model.model.layers)
    progress.begin_step(1)
    model.hidden_states(torch.randint(0, 512, (2, 20))).sum().backward()
    assert calls == [("forward", i, 4) for i in range(4)] + [("backward", i, 4) for i in (3, 2, 1, 0)]
    calls.clear()
    progress.begin_micro_batch(1, 2)
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 20)))
    assert calls == [("forward", i, 4) for i in range(4)]  # no backward to report


def test_the_live_line_shows_where_a_long_step_is(tmp_path, monkeypatch, capsys):
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    progress = Progress(10, 1, tmp_path / "metrics.jsonl")
    progress.tty = False
    progress.begin_step(3)
    progress.begin_micro_batch(1, 4)
    progress.within_step("forward", 5, 32)
    assert capsys.readouterr().err == ""  # a step shorter than 2 s says nothing within itself
    now[0] += 61
    progress.within_step("backward", 1, 32)
    assert capsys.readouterr().err == "step 3/10 | micro-batch 2/4 | backward layer 31/32 | 61 s into the step\n"
    now[0] += 30
    progress.within_step("backward", 0, 32)
    assert capsys.readouterr().err == ""  # in a log, at most once a minute
    progress.step(3, 1.0, 1e-4, 100.0, 0.5, 3)
    capsys.readouterr()
    now[0] += 600
    progress.within_step("forward", 0, 32)  # an eval after the step is not inside it
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="VmHWM is Linux's")
def test_peak_host_memory_is_the_process_own():
    """A process started by a larger one reports its own peak: ru_maxrss would carry the parent's (1 GiB here) through
    fork and exec (bench_model read 7.88 GiB for every system that way, the parent having written a checkpoint)."""
    import subprocess
    import sys
    held = b"\x01" * 2**30  # resident in this process
    child = subprocess.run([sys.executable, "-c", "import resource; from phi3.progress import peak_host_gib; "
                            "print(peak_host_gib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"],
                           capture_output=True, text=True, check=True)
    own, inherited = map(float, child.stdout.split())
    assert own < 0.9 < 1.0 <= inherited, (own, inherited)  # the child itself: the interpreter, torch and phi3
    del held
