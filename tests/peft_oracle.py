"""peft as the oracle for trained adapters: the same adapter in both models, a training step in each, and every
gradient of ours compared with peft's, both judged against peft computing in float64 (DESIGN.md's rule).

Dropout masks: peft's dropout modules are swapped for Replay, which draws its mask as our layers draw theirs (fp32,
F.dropout of ones, one draw per layer in the same order), so both see the same masks from the same seed; the
float64 copy replays the masks the fp32 run drew."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from phi3.lora import save_adapter
from test_model import assert_as_accurate
from tiny import transformers_or_skip

PEFT_NAMES = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
              "lora_magnitude": "lora_magnitude_vector.default.weight", "lora_embedding_A": "lora_embedding_A.default",
              "lora_embedding_B": "lora_embedding_B.default",
              "lora_token_rows": "token_adapter.trainable_tokens_delta.default"}


def peft_or_skip():
    transformers_or_skip()
    return pytest.importorskip("peft", reason="peft is the reference oracle; pip install peft")


class Replay(nn.Module):
    """peft's LoRA dropout with our layers' masks: recorded while state["record"], replayed in order after."""

    def __init__(self, p: float, state: dict):
        super().__init__()
        self.p, self.state = p, state

    def forward(self, x):
        if self.state["record"]:
            mask = F.dropout(torch.ones(x.shape, dtype=torch.float32), self.p)
            self.state["masks"].append(mask)
        else:
            mask = self.state["masks"][self.state["position"]]
            self.state["position"] += 1
        return x * mask.to(x.dtype)


def peft_model(base_folder, adapter_folder, trainable: bool = False):
    """transformers' model from base_folder with the adapter loaded by peft (fp32)."""
    import transformers
    peft = peft_or_skip()
    hf = transformers.Phi3ForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapter_folder, is_trainable=trainable)


def peft_view(ours: nn.Module, name: str, grad: torch.Tensor) -> torch.Tensor:
    """peft's gradient of a whole-layer tensor in the layout of our parameter `name` (per-slice B and magnitude)."""
    module_name, kind = name.rsplit(".", 1)
    m = ours.get_submodule(module_name)
    if kind == "lora_B" and not m.whole:
        return torch.cat([grad[s:e, i * m.rank:(i + 1) * m.rank] for i, (s, e) in enumerate(m.slices)])
    if kind == "lora_magnitude":
        return m.slice_rows(grad)
    return grad


def assert_trains_like_peft(ours: nn.Module, base_folder, tmp_path, ids: torch.Tensor, seed: int = 5) -> None:
    """Save ours, load it in peft, run one training forward + backward in both (train mode, dropout live) and in
    peft at float64: the loss and every trainable parameter's gradient of ours is as accurate as peft's."""
    save_adapter(ours, tmp_path / "oracle_adapter")
    theirs = peft_model(base_folder, tmp_path / "oracle_adapter", trainable=True)
    state = {"record": True, "masks": [], "position": 0}
    for module in theirs.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and isinstance(dropouts["default"], nn.Dropout):
            dropouts["default"] = Replay(dropouts["default"].p, state)
    weights = torch.randn(*ids.shape, ours.config.vocab_size, generator=torch.Generator().manual_seed(seed))
    ours.train(), theirs.train()
    torch.manual_seed(seed)
    loss = (ours(ids) * weights).sum()
    loss.backward()
    torch.manual_seed(seed)
    ref = (theirs(ids).logits * weights).sum()
    ref.backward()
    exact = copy.deepcopy(theirs).double()
    exact.zero_grad(set_to_none=True)
    for module in exact.modules():  # (the copy holds a copy of `state`: set it too)
        if isinstance(module, Replay):
            module.state["record"] = False
    exact_loss = (exact(ids).logits * weights.double()).sum()
    exact_loss.backward()
    assert_as_accurate(loss.detach().reshape(1), ref.detach().reshape(1), exact_loss.detach().reshape(1))
    theirs_params, exact_params = dict(theirs.named_parameters()), dict(exact.named_parameters())
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert trained
    for name, p in trained:
        module_name, kind = name.rsplit(".", 1)
        key = f"base_model.model.{module_name}.{PEFT_NAMES[kind]}"
        view = lambda t: peft_view(ours, name, t)
        assert p.grad is not None and theirs_params[key].grad is not None, name
        assert_as_accurate(p.grad, view(theirs_params[key].grad), view(exact_params[key].grad))
