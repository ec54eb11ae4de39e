"""LoRA training step speed and peak memory: this project vs transformers + peft, side by side.

    python bench/bench_train.py                       # Phi-3-mini-4k shapes, batch 4 x 2048, r=16, checkpointing on
    python bench/bench_train.py --no-checkpointing --steps 6
    python bench/bench_train.py --config phi4-mini-instruct         # another model's shapes (assets/configs/NAME)
    python bench/bench_train.py --qlora     # 4-bit base: ours vs transformers + peft + bitsandbytes, and vs ours bf16
    python bench/bench_train.py --dora      # DoRA: ours vs transformers + peft DoRA, and vs ours LoRA
    python bench/bench_train.py --fp8       # the base's GEMMs in FP8 (train.py --fp8): vs transformers + peft, and ours

Workload (DESIGN.md section 5): random bf16 weights, LoRA r=16 alpha=32 dropout 0.05 on qkv/o/gate_up/down,
every token trained, AdamW (fused), gradient checkpointing per layer. Each system runs in its own process
(clean peak memory). Prints tokens/s, peak GiB and the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from side_by_side import run_each  # bench/ itself: the script's folder is on sys.path
from systems import bnb_4bit, hf_random, ours_config, ours_lora, peft_lora

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "assets" / "configs"
CONFIG = CONFIGS / "phi3-mini-4k-instruct" / "config.json"  # --config replaces it
DROPOUT = 0.05  # --dropout replaces it (both sides)
NEW_TOKENS = tuple(range(32000, 32008))  # --tokens: 8 rows trained (Phi-3's placeholder special tokens)


ABLATIONS = {  # this project with one mechanism switched off: what each buys in the whole step
    "ours-no-offload": "checkpointed layer inputs kept on the GPU instead of in pinned host memory",
    "ours-no-flash": "attention through SDPA with a dense mask instead of flash attention",
    "ours-no-cudnn": "flash attention for every row instead of cuDNN's kernels for rows of 4,096 tokens and more "
                     "(phi3/attention.py)",
    "ours-torch-rope": "RoPE as torch ops instead of kernels/rope.py",
    "ours-torch-norm-swiglu": "RMSNorm, residual add and SwiGLU as torch ops instead of their kernels",
    # the LoRA kernel's own mechanism (issue 12: each must pay for itself in the whole step; the concat GEMM kind
    # and the private fast launcher did not, and were removed: bench/README.md)
    "ours-rule": "kernel configs and GEMM kinds by the rule alone, the shipped table switched off (kernels/choices.py)",
    "ours-checkpointed-loss": "the loss recomputing each chunk's lm_head GEMM and fp32 logits in the backward instead "
                              "of computing d hidden in the forward (phi3/loss.py)",
    "ours-full-recompute": "each layer's recompute running the down projection's frozen GEMM too, whose output "
                           "nothing reads (phi3/recompute.py)",
    "ours-no-keep": "each layer's recompute computing attention again instead of taking back the output and "
                    "log-sum-exp its forward kept in host memory beside its input (phi3/attention.py)",
    "ours-no-kept-outputs": "no layer keeping its frozen GEMMs' outputs for the recompute, which runs them again "
                            "(phi3/recompute.py; the default keeps as many as spare memory holds, at most doubling "
                            "the step's memory)",
    "ours-nothing-kept": "the recompute computing every LoRA layer's S = dropout(x) A^T and output again, none kept "
                         "from the first run (phi3/recompute.py)",
}


def build_ours(checkpointing: bool, ablation: str | None = None):
    import phi3.kernels.choices
    import phi3.attention
    import phi3.loss
    import phi3.model
    from phi3.loss import cross_entropy_sum
    from phi3.ops import rms_norm_reference, rope_qk_reference, swiglu_reference

    if ablation == "ours-no-flash":
        phi3.attention.use_flash = False
    elif ablation == "ours-no-cudnn":
        phi3.attention.use_cudnn = False
    elif ablation == "ours-torch-rope":
        phi3.model.rope_qk = rope_qk_reference
    elif ablation == "ours-torch-norm-swiglu":
        phi3.model.rms_norm = rms_norm_reference
        phi3.model.swiglu = swiglu_reference
    elif ablation == "ours-rule":
        phi3.kernels.choices.use_table({})
    elif ablation == "ours-checkpointed-loss":
        phi3.loss.fused_linear_loss = False
    elif ablation == "ours-full-recompute":
        phi3.model.recomputing = lambda: False
    elif ablation == "ours-no-keep":
        phi3.attention.keep_outputs = False
    elif ablation == "ours-nothing-kept":
        phi3.model.Phi3ForCausalLM.kept_outputs = lambda *args: None
    layers = None  # the middle ground, ours-checkpoint-N: only the first N layers checkpointed
    if ablation and ablation.startswith("ours-checkpoint-"):
        layers = int(ablation.removeprefix("ours-checkpoint-"))
    model = ours_lora(ours_config(CONFIG), "cuda", torch.bfloat16, checkpointing, ablation != "ours-no-offload", layers,
                      four_bit=ablation == "ours-nf4", dora=ablation == "ours-dora", dropout=DROPOUT,
                      embedding=ablation == "ours-embed", tokens=NEW_TOKENS if ablation == "ours-tokens" else ())
    if ablation == "ours-fp8":
        from phi3.lora import use_fp8
        use_fp8(model)
    if ablation == "ours-no-kept-outputs" or (ablation or "").startswith("ours-keep-outputs-"):
        # ours-keep-outputs-N: N layers keep their GEMM outputs, whatever the free memory
        kept = 0 if ablation == "ours-no-kept-outputs" else int(ablation.removeprefix("ours-keep-outputs-"))
        model.recompute = dataclasses.replace(model.recompute, keep_outputs=kept)

    def loss_fn(ids, labels):
        return cross_entropy_sum(model.hidden_states(ids), model.lm_head, labels) / labels.numel()
    return model, loss_fn


def build_reference(checkpointing: bool, four_bit: bool = False, kind: str = ""):
    if four_bit:  # the random bf16 checkpoint bitsandbytes quantizes at load
        base = bnb_4bit(CONFIG, None, "cuda", torch.bfloat16)
    else:
        base = hf_random(CONFIG, None, "cuda", torch.bfloat16)
    model = peft_lora(base, checkpointing, kind == "dora", DROPOUT, kind == "embed", NEW_TOKENS if kind == "tokens" else ())

    def loss_fn(ids, labels):
        # transformers shifts labels itself; pass ids as labels so every position is trained like ours
        return model(input_ids=ids, labels=ids).loss
    return model, loss_fn


def measure(system: str, batch: int, seq: int, steps: int, checkpointing: bool, cap_gib: float = 0.0) -> dict:
    """cap_gib: torch may hold at most this much GPU memory (a card of that size, emulated)."""
    torch.manual_seed(0)
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    if system.startswith("reference"):
        model, loss_fn = build_reference(checkpointing, system == "reference-bnb", system.removeprefix("reference-"))
    else:
        # the middle ground checkpoints its first N layers also in a --no-checkpointing run (the sweep's point)
        checkpointing = checkpointing or system.startswith("ours-checkpoint-")
        model, loss_fn = build_ours(checkpointing, None if system == "ours" else system)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda")
    labels = torch.roll(ids, -1, dims=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    from phi3.recompute import keeping_less_where_memory_runs_out
    times, budget, ran_out = [], getattr(model, "kept_budget", None), []
    for i in range(steps + 2):  # 2 warm-up steps (Triton autotune, allocator)
        torch.cuda.synchronize()
        start = time.perf_counter()

        def attempt():
            opt.zero_grad(set_to_none=True)  # (a failed attempt's partial sums)
            loss = loss_fn(ids, labels)
            loss.backward()
            return loss

        def again(kept):
            ran_out.append(kept)
            print(f"step {i + 1} ran out of memory with {kept} layers keeping outputs: again, keeping fewer "
                  "(as train.py)", file=sys.stderr)

        loss = keeping_less_where_memory_runs_out(budget, attempt, again)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[2:])[len(times[2:]) // 2]
    return {"system": system, "tokens_per_s": batch * seq / step_s, "step_s": step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss),
            "trainable": sum(p.numel() for p in trainable), "kept_layers": kept_layers(model), "ran_out": ran_out}


def kept_layers(model) -> int | None:
    """How many layers kept their GEMM outputs for the recompute in ours' last pass (phi3/recompute.py)."""
    from phi3.model import kept_output_bytes
    budget, recompute = getattr(model, "kept_budget", None), getattr(model, "recompute", None)
    if budget is None or recompute is None:
        return None
    if recompute.keep_outputs is not None:
        return recompute.keep_outputs
    kept, tokens = budget.last or (0, 1)
    return kept // max(1, kept_output_bytes(model, tokens, torch.bfloat16))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--system", help="one system in this process: ours, reference, an ablation, ours-checkpoint-N")
    p.add_argument("--config", default="phi3-mini-4k-instruct", help="the model's shapes: a folder of assets/configs")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout on both sides")
    p.add_argument("--checkpoint-layers", default="",
                   help="also run ours with only the first N layers checkpointed, for each N of a comma-separated list "
                        "(tokens/s against peak memory between checkpointing all layers and none)")
    p.add_argument("--qlora", action="store_true", help="4-bit bases: ours-nf4 against transformers + peft + "
                   "bitsandbytes (reference-bnb) and against ours in bf16")
    p.add_argument("--dora", action="store_true", help="DoRA: ours-dora against transformers + peft's (use_dora) "
                   "and against ours with plain LoRA")
    p.add_argument("--fp8", action="store_true", help="ours-fp8 (the frozen base's GEMMs in FP8) against transformers "
                   "+ peft (bf16) and against ours in bf16")
    p.add_argument("--embed", action="store_true", help="LoRA on embed_tokens too: ours-embed against peft's, and ours")
    p.add_argument("--tokens", action="store_true", help="8 trainable token rows too: ours-tokens against peft's "
                   "(trainable_token_indices), and ours")
    p.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                   help="also run ours with each mechanism off in turn (or only those named, comma-separated)")
    p.add_argument("--cap", type=float, default=0.8,
                   help="also run ours on a card with this fraction of the reference's peak memory, emulated (torch's "
                        "set_per_process_memory_fraction; ours keeps outputs for the recompute only in the memory a "
                        "card has, so its peak on an 80 GB card is not the least it runs in); 0: no such run")
    p.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)  # (--system's: the cap itself)
    args = p.parse_args()
    global CONFIG, DROPOUT
    CONFIG, DROPOUT = CONFIGS / args.config / "config.json", args.dropout
    if args.system:
        print(json.dumps(measure(args.system, args.batch, args.seq, args.steps, args.checkpointing, args.cap_gib)))
        return
    if args.qlora:
        return qlora(args)
    for kind in ("dora", "embed", "tokens", "fp8"):
        if getattr(args, kind):
            return adapter_kind(args, kind)
    systems = ("ours", "reference") + tuple(a for a in args.ablations.split(",") if a) + tuple(
        f"ours-checkpoint-{int(n)}" for n in args.checkpoint_layers.split(",") if n)
    flags = ["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq), "--dropout", str(args.dropout),
             "--steps", str(args.steps), "--checkpointing" if args.checkpointing else "--no-checkpointing"]
    results = run_each(__file__, systems, flags)
    ours, ref = results["ours"], results["reference"]
    cap_gib = args.cap * ref["peak_gib"]
    capped = capped_run(flags, cap_gib) if args.cap else None
    print(f"\nLoRA training step, {args.config} shapes, batch {args.batch} x {args.seq}, r=16, dropout {args.dropout}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, {torch.cuda.get_device_name()}, "
          f"median of {args.steps} steps")
    print(f"{'':16}{'ours':>12}{'transformers+peft':>20}{'ours/ref':>10}")
    print(f"{'tokens/s':16}{ours['tokens_per_s']:12,.0f}{ref['tokens_per_s']:20,.0f}{ours['tokens_per_s'] / ref['tokens_per_s']:10.2f}")
    print(f"{'peak GiB':16}{ours['peak_gib']:12.2f}{ref['peak_gib']:20.2f}{ours['peak_gib'] / ref['peak_gib']:10.2f}")
    print(f"{'trainable':16}{ours['trainable']:12,}{ref['trainable']:20,}")
    print(f"ours kept the GEMM outputs of {ours['kept_layers']} layers for the recompute (phi3/recompute.py)")
    if capped:
        print(f"ours on a card of {args.cap:g}x the reference's peak ({cap_gib:.2f} GiB, emulated): "
              f"{capped['tokens_per_s']:,.0f} tokens/s ({capped['tokens_per_s'] / ref['tokens_per_s']:.2f}x ref), "
              f"peak {capped['peak_gib']:.2f} GiB ({capped['peak_gib'] / ref['peak_gib']:.2f}x ref), "
              f"outputs of {capped['kept_layers']} layers kept; steps that ran out of memory and ran again, keeping "
              f"fewer: {len(capped['ran_out'])} (they had kept {capped['ran_out'] or '-'})")
    elif args.cap:
        print(f"ours on a card of {args.cap:g}x the reference's peak ({cap_gib:.2f} GiB, emulated): failed (above)")
    for name in (s for s in systems if s.startswith("ours-checkpoint-")):
        r = results[name]
        print(f"ours with the first {name.removeprefix('ours-checkpoint-')} layers checkpointed: "
              f"{r['tokens_per_s']:,.0f} tokens/s ({r['tokens_per_s'] / ref['tokens_per_s']:.2f}x ref), "
              f"{r['peak_gib']:.2f} GiB ({r['peak_gib'] / ref['peak_gib']:.2f}x ref)")
    for name, what in ABLATIONS.items():
        if name in results:
            off = results[name]
            print(f"{name} ({what}): {off['tokens_per_s']:,.0f} tokens/s, {off['peak_gib']:.2f} GiB; "
                  f"the mechanism buys {ours['tokens_per_s'] / off['tokens_per_s']:.3f}x")


def capped_run(flags: list[str], cap_gib: float) -> dict | None:
    """Ours with torch allowed `cap_gib` of GPU memory, or None where it does not fit."""
    try:
        return run_each(__file__, ("ours",), flags + ["--cap-gib", str(cap_gib)])["ours"]
    except SystemExit as failed:  # (run_each ends the benchmark on a failed run; this one may not fit)
        print(str(failed)[-400:])
        return None


KINDS = {"dora": "DoRA", "embed": "LoRA also on embed_tokens", "tokens": f"{len(NEW_TOKENS)} trainable token rows too",
         "fp8": "the base's GEMMs in FP8 (against transformers + peft in bf16)"}


def adapter_kind(args, kind: str) -> None:
    """ours-KIND against transformers + peft's same adapter, and against ours with plain LoRA (its cost)."""
    flags = ["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
             "--dropout", str(args.dropout)]
    reference = "reference" if kind == "fp8" else f"reference-{kind}"  # FP8: against the usual bf16 reference
    r = run_each(__file__, (f"ours-{kind}", reference, "ours"), flags)
    d, ref, lora = r[f"ours-{kind}"], r[reference], r["ours"]
    print(f"\n{KINDS[kind]}: training step, {args.config} shapes, batch {args.batch} x {args.seq}, r=16, dropout "
          f"{args.dropout}, checkpointing on, {torch.cuda.get_device_name()}, median of {args.steps} steps")
    theirs = "peft bf16" if kind == "fp8" else "peft " + kind
    print(f"{'':16}{'ours ' + kind:>13}{theirs:>13}{'ours lora':>12}{'ours/peft':>11}{kind + '/lora':>13}")
    for key, fmt in (("tokens_per_s", ",.0f"), ("peak_gib", ".2f"), ("trainable", ",")):
        print(f"{key:16}{d[key]:13{fmt}}{ref[key]:13{fmt}}{lora[key]:12{fmt}}{d[key] / ref[key]:11.2f}"
              f"{d[key] / lora[key]:13.2f}")
    print(f"step cost of {kind} over ours LoRA: {lora['tokens_per_s'] / d['tokens_per_s']:.3f}x")


def qlora(args) -> None:
    flags = ["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    r = run_each(__file__, ("ours-nf4", "reference-bnb", "ours"), flags)
    q, ref, bf16 = r["ours-nf4"], r["reference-bnb"], r["ours"]
    print(f"\nQLoRA training step (NF4 base), {args.config} shapes, batch {args.batch} x {args.seq}, r=16, "
          f"checkpointing on, {torch.cuda.get_device_name()}, median of {args.steps} steps")
    print(f"{'':16}{'ours nf4':>12}{'peft+bnb':>12}{'ours bf16':>12}{'nf4/bnb':>10}{'nf4/bf16':>10}")
    for key, fmt in (("tokens_per_s", ",.0f"), ("peak_gib", ".2f")):
        print(f"{key:16}{q[key]:12{fmt}}{ref[key]:12{fmt}}{bf16[key]:12{fmt}}{q[key] / ref[key]:10.2f}"
              f"{q[key] / bf16[key]:10.2f}")
    print(f"step cost of 4-bit over ours bf16: {bf16['tokens_per_s'] / q['tokens_per_s']:.3f}x")


if __name__ == "__main__":
    main()
