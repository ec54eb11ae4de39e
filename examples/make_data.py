"""Build the example data sets from WordNet 3.0 (Debian package `wordnet-base`).

    apt-get install -y wordnet-base            # puts the data files under /usr/share/wordnet/
    python examples/make_data.py               # writes examples/pretrain.jsonl, chat.jsonl, chat_eval.jsonl
    python examples/make_data.py --out-dir /tmp/d --seed 0 --n-train 2000 --n-eval 200

Outputs (all deterministic for a given --seed and WordNet copy):
  pretrain.jsonl   {"text": ...}, one record per synset, e.g.
                   'cat (noun): feline mammal usually having thick soft fur and no ability to roar: domestic cats;
                    wildcats. Synonyms: true cat.'  Not committed; regenerate it with this script.
  chat.jsonl       {"messages": [...]}: "what does X mean?" conversations about common words (train).
  chat_eval.jsonl  same format, ~200 held-out words that never occur as asked words in chat.jsonl.

The chat answers are built from the very gloss that the pretraining record of the same synset carries, so a base
model pretrained on pretrain.jsonl already "knows" the answer; a LoRA only has to teach the chat behaviour.

Word choice for chat: single lower-case words (nouns, verbs, adjectives), sense 1 of that part of speech (WordNet
index files list senses most frequent first), the word must head its sense-1 synset (so the pretraining record is
"word (pos): gloss"), ranked by the sense-tagged corpus count of that sense in cntlist.rev. Stdlib only.
"""

import argparse
import json
import os
import random
import re
from collections import defaultdict

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAME = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
SS_NUM = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # sense-key ss_type digit -> index pos
CHAT_POS = ("n", "v", "a")

SYSTEM_PROMPTS = [
    "You are a helpful dictionary assistant.",
    "You are a concise assistant. Answer briefly.",
    "You explain the meanings of English words.",
    "Answer questions about word meanings in one sentence.",
]
QUESTIONS_ANY = [
    'What does the word "{w}" mean?',
    'What is the meaning of "{w}"?',
    'Define "{w}".',
    'Can you tell me what "{w}" means?',
    'What does "{w}" mean as a {pos}?',
]
QUESTIONS_POS = {
    "n": ['What is {a} "{w}"?'],
    "v": ['What does it mean to "{w}"?'],
    "a": ['What does it mean to be "{w}"?'],
}
ANSWER = 'As {article} {pos}, "{w}" means: {definition}'


# ---------------------------------------------------------------- WordNet parsing

def clean_lemma(word):
    """'ready_to_hand(p)' -> 'ready to hand' (adjective syntactic markers (a), (p), (ip) dropped)."""
    return re.sub(r"\((a|p|ip)\)$", "", word).replace("_", " ")


def split_gloss(gloss):
    """'def; more def; "ex one"; "ex two"' -> ('def; more def', ['ex one', 'ex two'])."""
    q = gloss.find('"')
    if q < 0:
        return gloss.strip().rstrip(";").strip(), []
    definition = gloss[:q].strip().rstrip(";").strip()
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', gloss[q:]) if e.strip()]
    return definition, examples


def parse_data_line(line):
    """One data.<pos> line: offset lex_filenum ss_type w_cnt(hex) [word lex_id]... p_cnt [ptr]... [frames] | gloss."""
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, lex_filenum, ss_type, w_cnt = f[0], int(f[1]), f[2], int(f[3], 16)
    words = [clean_lemma(f[4 + 2 * i]) for i in range(w_cnt)]
    definition, examples = split_gloss(gloss.strip())
    return {"offset": offset, "lex_filenum": lex_filenum, "ss_type": ss_type, "words": words,
            "definition": definition, "examples": examples}


def read_data(wn_dir, pos):
    """{offset: synset} for data.<pos>; license header lines start with two spaces and are skipped."""
    synsets = {}
    with open(os.path.join(wn_dir, "data." + POS_FILES[pos]), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            s = parse_data_line(line.rstrip("\n"))
            s["pos"] = pos
            synsets[s["offset"]] = s
    return synsets


def read_index(wn_dir, pos):
    """{lemma: [synset offsets, most frequent sense first]} for index.<pos>."""
    senses = {}
    with open(os.path.join(wn_dir, "index." + POS_FILES[pos]), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            f = line.split()
            lemma, synset_cnt, p_cnt = f[0], int(f[2]), int(f[3])
            senses[lemma] = f[4 + p_cnt + 2:4 + p_cnt + 2 + synset_cnt]
    return senses


def read_counts(wn_dir):
    """{(lemma, pos, sense_number): tag count} from cntlist.rev (sense_key sense_number tag_cnt)."""
    counts = defaultdict(int)
    path = os.path.join(wn_dir, "cntlist.rev")
    if not os.path.exists(path):
        return counts
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            key, sense_number, tag_cnt = line.split()
            lemma, _, rest = key.partition("%")
            counts[(lemma, SS_NUM[rest[0]], int(sense_number))] += int(tag_cnt)
    return counts


# ---------------------------------------------------------------- text builders

def end_sentence(text):
    """Add a full stop unless the text already ends with one ('... or wealth etc.')."""
    return text if text.endswith((".", "!", "?")) else text + "."


def pretrain_text(s, sense_number):
    """'cat (noun): gloss. Synonyms: true cat. Examples: "..."; "...".' Sense 1 is unmarked, others say 'sense N'."""
    head = s["words"][0]
    tag = POS_NAME[s["ss_type"]] + ("" if sense_number == 1 else f", sense {sense_number}")
    text = end_sentence(f"{head} ({tag}): {s['definition']}")
    if len(s["words"]) > 1:
        text += " Synonyms: " + end_sentence(", ".join(s["words"][1:]))
    if s["examples"]:
        text += " Examples: " + "; ".join(f'"{e}"' for e in s["examples"]) + "."
    return text


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def answer_text(word, pos, definition):
    name = POS_NAME[pos]
    return end_sentence(ANSWER.format(article=article(name), pos=name, w=word, definition=definition))


def conversation(word, pos, definition, rng):
    phrasings = QUESTIONS_ANY + QUESTIONS_POS[pos]
    question = rng.choice(phrasings).format(w=word, pos=POS_NAME[pos], a=article(word))
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer_text(word, pos, definition)})
    return {"messages": messages}


# ---------------------------------------------------------------- main

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    ap.add_argument("--out-dir", default=here)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--core-repeats", type=int, default=3,
                    help="times the pretraining record of each chat word (train and eval) appears in pretrain.jsonl")
    ap.add_argument("--chat-share", type=float, default=0.1,
                    help="share of the other synsets also written as a one-turn chat (trains the chat tokens)")
    ap.add_argument("--max-answer-words", type=int, default=40)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.wordnet_dir, "data.noun")):
        raise SystemExit(f"no WordNet in {args.wordnet_dir}: apt-get install -y wordnet-base")

    synsets, index = {}, {}
    for pos in POS_FILES:
        for off, s in read_data(args.wordnet_dir, pos).items():
            synsets[(pos, off)] = s
        index[pos] = read_index(args.wordnet_dir, pos)
    counts = read_counts(args.wordnet_dir)

    # sense number of each synset for its head word (index lemmas are lower case with '_' for spaces)
    def sense_of(s):
        offs = index[s["pos"]].get(s["words"][0].lower().replace(" ", "_"), [])
        return offs.index(s["offset"]) + 1 if s["offset"] in offs else 1

    # chat candidates: one entry per (word, pos) where the word heads its sense-1 synset
    cands = []
    for pos in CHAT_POS:
        for lemma, offs in index[pos].items():
            s = synsets[(pos, offs[0])]
            n_words = len(answer_text(lemma, pos, s["definition"]).split())
            if (lemma.isalpha() and lemma.islower() and len(lemma) >= 3 and s["words"][0] == lemma
                    and s["definition"] and n_words <= args.max_answer_words and counts[(lemma, pos, 1)] > 0):
                cands.append((counts[(lemma, pos, 1)], lemma, pos, s))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    best = {}  # one part of speech per word: its most frequent one
    for c in cands:
        best.setdefault(c[1], c)
    chosen = sorted(best.values(), key=lambda c: (-c[0], c[1]))[:args.n_train + args.n_eval]
    if len(chosen) < args.n_train + args.n_eval:
        raise SystemExit(f"only {len(chosen)} candidate words")
    rng = random.Random(args.seed)
    rng.shuffle(chosen)
    eval_words, train_words = chosen[:args.n_eval], chosen[args.n_eval:]

    chat = {"chat.jsonl": [conversation(w, p, s["definition"], rng) for _, w, p, s in train_words],
            "chat_eval.jsonl": [conversation(w, p, s["definition"], rng) for _, w, p, s in eval_words]}

    # pretraining: every synset once, chat words' synsets --core-repeats times in all, fixed-seed shuffle
    core = {(p, s["offset"]) for _, _, p, s in chosen}
    # A --chat-share of the other synsets is also laid out as a terse chat (user: the head word, assistant: the
    # same record), so the base has trained embeddings for <|user|>, <|assistant|>, <|system|>, <|end|> as real
    # Phi-3 bases do. The demo words never appear in chat layout: their answers come from plain text only.
    chat_rng = random.Random(args.seed + 2)
    records = []
    for key in sorted(synsets):
        s = synsets[key]
        t = pretrain_text(s, sense_of(s))
        records.extend([{"text": t}] * (args.core_repeats if key in core else 1))
        if key not in core and chat_rng.random() < args.chat_share:
            turns = [{"role": "system", "content": "You are a dictionary."}] if chat_rng.random() < 0.2 else []
            turns += [{"role": "user", "content": s["words"][0]}, {"role": "assistant", "content": t}]
            records.append({"messages": turns})
    random.Random(args.seed + 1).shuffle(records)
    texts = [r["text"] if "text" in r else r["messages"][-1]["content"] for r in records]

    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "pretrain.jsonl"), "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"pretrain.jsonl: {len(texts)} records ({len(synsets)} synsets, {len(core)} core x{args.core_repeats}), "
          f"{sum(len(t) for t in texts):,} characters")
    for name, recs in chat.items():
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        chars = sum(len(m["content"]) for r in recs for m in r["messages"])
        print(f"{name}: {len(recs)} conversations, {chars:,} characters")


if __name__ == "__main__":
    main()
