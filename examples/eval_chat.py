"""Score a model (+ adapter) on the held-out demo questions: greedy replies vs the reference answers.

    python examples/eval_chat.py                      # embedded tiny model + the adapter in ./out
    python examples/eval_chat.py --adapter none       # the base model alone ("before")
    python examples/eval_chat.py --adapter runs/a --limit 50 --show 3

Reports token F1 and exact match (examples/chat_metric.py) and the share of replies that ended with a
stop token (<|end|>) within --max-new-tokens, i.e. that learned to stop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from chat_metric import score, summarize  # noqa: E402
from phi3 import CheckpointError, ConfigError, TokenizerError  # noqa: E402
from phi3.generate import generate  # noqa: E402
from sample import load_for_chat  # noqa: E402


def read_questions(path: Path) -> list[tuple[list[dict], str]]:
    """(messages before the answer, reference answer) per line; a bad line is a ValueError naming it."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            ends_with_answer = isinstance(messages, list) and messages[-1]["role"] == "assistant"
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            ends_with_answer = False
        if not ends_with_answer:  # an explicit check: `python -O` drops asserts
            raise ValueError(f"{path}:{n}: expected {{\"messages\": [..., {{\"role\": \"assistant\", ...}}]}}; "
                             "regenerate the file with examples/make_data.py")
        out.append((messages[:-1], messages[-1]["content"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "examples" / "chat_eval.jsonl")
    p.add_argument("--model", type=Path, default=None, help="default: the adapter's base, else models/tiny-phi3")
    p.add_argument("--adapter", default="out", help="adapter folder, or 'none' for the base model")
    p.add_argument("--limit", type=int, default=None, help="score only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--show", type=int, default=2, help="print this many question/reply pairs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)

    adapter = None if args.adapter == "none" else Path(args.adapter)
    try:
        questions = read_questions(args.data)
        model, tokenizer = load_for_chat(args.model, adapter, args.device)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    questions = questions[: args.limit] if args.limit else questions
    scores, stopped = [], 0
    start = time.perf_counter()
    for i, (messages, reference) in enumerate(questions):
        prompt, _ = tokenizer.render(messages, add_generation_prompt=True)
        reply_ids = list(generate(model, prompt, args.max_new_tokens, stop_ids=tokenizer.stop_ids))
        if reply_ids and reply_ids[-1] in tokenizer.stop_ids:
            stopped += 1
            reply_ids = reply_ids[:-1]
        reply = tokenizer.decode(reply_ids)
        scores.append(score(reply, reference))
        if i < args.show:
            print(f"Q: {messages[-1]['content']}\nA: {reply}\nref: {reference}\n", file=sys.stderr)
    summary = summarize(scores)
    summary["stopped"] = stopped / max(len(questions), 1)
    label = "base + adapter " + str(adapter) if adapter else "base, no adapter"
    print(f"{label}: {len(questions)} questions, F1 {summary['f1']:.3f}, exact match {summary['exact_match']:.3f}, "
          f"stopped at <|end|> {summary['stopped']:.0%} ({time.perf_counter() - start:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
