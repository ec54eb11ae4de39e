"""Score a model (+ adapter) on the held-out demo questions: greedy replies vs the reference answers.

    python examples/eval_chat.py                      # embedded tiny model + the adapter in ./out
    python examples/eval_chat.py --adapter none       # the base model alone ("before")
    python examples/eval_chat.py --adapter runs/a --limit 50 --show 3

Reports token F1 and exact match (examples/chat_metric.py) and the share of replies that ended with a
stop token (<|end|>) within --max-new-tokens, i.e. that learned to stop.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

from chat_metric import score, summarize  # noqa: E402
from phi3.atomic import atomic_file  # noqa: E402
from phi3.generate import generate  # noqa: E402
from sample import ERRORS, Parser, check_device, count, flag_type, load_for_chat, one_line  # noqa: E402

SHAPE = 'expected {"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]} with string contents'
positive = flag_type(int, lambda v: v > 0, "a whole number > 0")


def question_problem(messages) -> str | None:
    """Why a line's messages are not a question + reference answer (None when they are)."""
    if not (isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages)):
        return SHAPE
    if [m["role"] for m in messages[-2:]] != ["user", "assistant"]:
        return "the last two messages must be a user question and the assistant's reference answer"
    for i, m in enumerate(messages):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" without its pair): no tokenizer encodes it
            return f"messages[{i}].content holds a lone surrogate (a \\uD800-style escape without its pair)"
    return None


def read_questions(path: Path) -> list[tuple[int, list[dict], str]]:
    """(line number, messages before the answer, reference answer) per line; a bad line is a ValueError naming it."""
    if not path.is_file():  # missing, a folder, or a FIFO that would block the read
        raise ValueError(f"{path}: not a file; pass a JSONL file with --data")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror}); pass a JSONL file with --data") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: byte {e.start} is not UTF-8; regenerate it with examples/make_data.py") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, RecursionError, KeyError, TypeError):  # ValueError: not JSON, or an int of 5000 digits
            messages = None
        problem = question_problem(messages)
        if problem:  # an explicit check: `python -O` drops asserts
            raise ValueError(f"{path}:{n}: {problem}; regenerate the file with examples/make_data.py")
        out.append((n, messages[:-1], messages[-1]["content"]))
    if not out:
        raise ValueError(f"{path}: no questions in it; pass a JSONL file of chats with --data")
    return out


def main(argv=None) -> int:
    p = Parser(prog="examples/eval_chat.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO / "examples" / "chat_eval.jsonl")
    p.add_argument("--model", type=Path, default=None, help="default: the adapter's base, else models/tiny-phi3")
    p.add_argument("--adapter", default="out", help="adapter folder, or 'none' for the base model")
    p.add_argument("--limit", type=positive, default=None, help="score only the first N questions")
    p.add_argument("--max-new-tokens", type=count, default=64)
    p.add_argument("--show", type=count, default=2, help="print this many question/reply pairs")
    p.add_argument("--device", default="auto", help="auto (cuda if there is a GPU, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    check_device(p, args)
    if args.json is not None and not args.json.parent.is_dir():  # fail now, not after the whole evaluation
        p.error(f"--json {args.json}: folder {args.json.parent} does not exist")

    adapter = None if args.adapter == "none" else Path(args.adapter)
    try:
        questions = read_questions(args.data)[: args.limit]
        model, tokenizer = load_for_chat(args.model, adapter, args.device, args.dtype)
        context = model.config.max_position_embeddings
        prompts = []
        for line, messages, _ in questions:  # all refused before the first reply, not after an hour
            prompt, _ = tokenizer.render(messages, add_generation_prompt=True)
            if len(prompt) >= context:
                raise ValueError(f"{args.data}:{line}: the question is {len(prompt)} tokens and the model's context "
                                 f"is {context} (max_position_embeddings): no room for a reply; shorten it")
            prompts.append(prompt)
        scores, stopped = [], 0
        start = time.perf_counter()
        for i, ((_, messages, reference), prompt) in enumerate(zip(questions, prompts)):
            reply_ids = list(generate(model, prompt, args.max_new_tokens, stop_ids=tokenizer.stop_ids))
            if reply_ids and reply_ids[-1] in tokenizer.stop_ids:
                stopped += 1
                reply_ids = reply_ids[:-1]
            reply = tokenizer.decode(reply_ids)
            scores.append(score(reply, reference))
            if i < args.show:
                print(f"Q: {messages[-1]['content']}\nA: {reply}\nref: {reference}\n", file=sys.stderr)
        summary = summarize(scores)
        summary["stopped"] = stopped / len(questions)
        label = "base + adapter " + str(adapter) if adapter else "base, no adapter"
        print(f"{label}: {len(questions)} questions, F1 {summary['f1']:.3f}, exact match {summary['exact_match']:.3f}, "
              f"stopped at <|end|> {summary['stopped']:.0%} ({time.perf_counter() - start:.0f}s)")
        if args.json:
            with atomic_file(args.json) as tmp:  # a full disk leaves no half-written summary
                tmp.write_text(json.dumps(summary, indent=2) + "\n")
    except ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
