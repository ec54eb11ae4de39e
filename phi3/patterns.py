"""rank_pattern / alpha_pattern keys of a PEFT adapter_config.json, looked up as peft does, in bounded time.

peft gives a module the value of the first key for which `re.match(rf"(.*\\.)?({key})$", name)` succeeds
(get_pattern_key in peft/utils/other.py). Python's re backtracks, so a key from a stranger such as "(a+)+$" or
"(.*a){30}" takes exponential time on a module name. Here a key is parsed as the part of Python's regex syntax
such keys use -- literals, escapes, `.`, classes, groups, `|`, `* + ? {m,n}` (greedy or lazy), `^ $ \\A \\Z` -- and
run as a Thompson NFA: one pass over the name with the set of live states, never backtracking. Anything else
(backreferences, lookaround, inline flags, possessive quantifiers, `\\b`) raises PatternError. Only whether a key
matches matters here, and lazy and greedy quantifiers match the same names.

    rank = Patterns({"down_proj": 8, r"layers\\.1\\d\\.": 4}, "rank_pattern").value("model.layers.3.mlp.down_proj", 16)

A budget of steps shared by all the lookups of one Patterns bounds the total time (about a second at most).
"""

from __future__ import annotations

from phi3.config import show

MAX_KEY_CHARS = 1000  # the keys peft and save_adapter write are module names: well under 200 characters
MAX_PROGRAM = 10_000  # NFA instructions per key; `{m,n}` copies its operand, so this bounds the expansion
MAX_DEPTH = 50  # nested groups
MAX_STEPS = 2_000_000  # per Patterns: parse + match work, in units of one instruction visit or one character
CACHE_LIMIT = 10_000  # remembered (state set, character) transitions per key

_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_CATEGORIES = {
    # Python's str-pattern classes: \d is Unicode category Nd, \s str.isspace, \w alphanumerics and "_".
    "d": str.isdecimal, "s": str.isspace, "w": lambda c: c.isalnum() or c == "_",
    "D": lambda c: not c.isdecimal(), "S": lambda c: not c.isspace(), "W": lambda c: not (c.isalnum() or c == "_"),
}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_ANY = ("set", lambda ch: ch != "\n", 1)  # `.`; a set's cost is the steps one test of it is charged


class PatternError(ValueError):
    """A key outside the supported regex subset, or lookups over the step budget."""


# ---- parsing: key -> tree of ("lit", c) ("set", test, cost) ("assert", kind) ("cat", items) ("alt", items)
#      ("repeat", tree, min, max or None)

class _Parser:
    def __init__(self, key: str):
        self.s, self.i, self.depth = key, 0, 0

    def fail(self, what: str):
        raise PatternError(f"{what} at position {self.i}")

    def peek(self, ahead: int = 0) -> str | None:
        return self.s[self.i + ahead] if self.i + ahead < len(self.s) else None

    def take(self) -> str | None:
        c = self.peek()
        self.i += 1
        return c

    def parse(self):
        tree = self.alternation()
        if self.i < len(self.s):  # only a ')' stops alternation early
            self.fail("unbalanced parenthesis")
        return tree

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items, repeated = [], False  # repeated: the last item already carries a quantifier ("a**" is an error)
        while self.peek() is not None and self.peek() not in "|)":
            q = self.quantifier()
            if q is None:
                items.append(self.atom())
                repeated = False
                continue
            if not items or items[-1][0] == "assert":
                self.fail("nothing to repeat")
            if repeated:
                self.fail("multiple repeat")
            if self.peek() == "+":
                self.fail("possessive quantifiers are not supported")
            if self.peek() == "?":  # lazy: matches the same names as greedy
                self.i += 1
            items[-1] = ("repeat", items[-1], *q)
            repeated = True
        flat = []
        for item in items:  # "(ab)c" -> one run of literals (a fast path below looks for that)
            flat += item[1] if item[0] == "cat" else [item]
        return ("cat", flat)

    def quantifier(self) -> tuple[int, int | None] | None:
        """(min, max or None) if a quantifier starts here (consumed); None otherwise. As in Python, "{" that does
        not open a well-formed {m}, {m,}, {,n} or {m,n} is a literal."""
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{" or self.peek(1) == "}":
            return None
        j = self.i + 1
        lo_start = j
        while j < len(self.s) and self.s[j] in "0123456789":
            j += 1
        lo, hi = self.s[lo_start:j], None
        comma = j < len(self.s) and self.s[j] == ","
        if comma:
            hi_start = j = j + 1
            while j < len(self.s) and self.s[j] in "0123456789":
                j += 1
            hi = self.s[hi_start:j]
        if j >= len(self.s) or self.s[j] != "}":
            return None
        self.i = j + 1
        if len(lo) > 6 or len(hi or "") > 6:  # beyond MAX_PROGRAM anyway; also keeps int() cheap
            self.fail("repeat count too large")
        low = int(lo) if lo else 0
        high = (int(hi) if hi else None) if comma else low
        if high is not None and high < low:
            self.fail("min repeat greater than max repeat")
        return low, high

    def atom(self):
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                if self.peek(1) != ":":
                    self.fail("only (...) and (?:...) groups are supported, not lookaround, flags or named groups")
                self.i += 2
            self.depth += 1
            if self.depth > MAX_DEPTH:
                self.fail(f"groups nested more than {MAX_DEPTH} deep")
            tree = self.alternation()
            self.depth -= 1
            if self.take() != ")":
                self.fail("missing ), unterminated subpattern")
            return tree
        if c == "[":
            return self.char_class()
        if c == ".":
            return _ANY
        if c == "^":
            return ("assert", "bol")
        if c == "$":
            return ("assert", "eol")
        if c == "\\":
            return self.escape(in_class=False)
        return ("lit", c)

    def escape(self, in_class: bool):
        c = self.take()
        if c is None:
            self.fail("bad escape (end of pattern)")
        if c in _CATEGORIES:
            return ("category", c) if in_class else ("set", _CATEGORIES[c], 1)
        if c == "b" and in_class:
            return ("lit", "\b")
        if c in ("A", "Z") and not in_class:
            return ("assert", "bol" if c == "A" else "eos")
        if c in _ESCAPES:
            return ("lit", _ESCAPES[c])
        if c in _HEX_DIGITS:
            digits = self.s[self.i:self.i + _HEX_DIGITS[c]]
            if len(digits) != _HEX_DIGITS[c] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                self.fail(f"incomplete escape \\{c}")
            self.i += len(digits)
            if int(digits, 16) > 0x10FFFF:
                self.fail(f"bad escape \\{c}{digits}")
            return ("lit", chr(int(digits, 16)))
        if c.isascii() and c.isalnum():  # \1 (backreference), \b, \B, \N{...}, octal, unknown letters
            self.fail(f"escape \\{c} is not supported")
        return ("lit", c)

    def char_class(self):
        negate = self.peek() == "^"
        self.i += negate
        items = []
        while True:
            c = self.take()
            if c is None:
                self.fail("unterminated character set")
            if c == "]" and items:  # a "]" first in the set is a literal
                break
            first = self.escape(in_class=True) if c == "\\" else ("lit", c)
            if self.peek() == "-" and self.peek(1) is not None and self.peek(1) != "]":
                self.i += 1
                d = self.take()
                last = self.escape(in_class=True) if d == "\\" else ("lit", d)
                if first[0] != "lit" or last[0] != "lit" or last[1] < first[1]:
                    self.fail("bad character range")
                items.append(("range", first[1], last[1]))
            else:
                items.append(first)
        chars, ranges, tests = set(), [], []
        for item in items:
            if item[0] == "lit":
                chars.add(item[1])
            elif item[0] == "range":
                ranges.append(item[1:])
            else:
                tests.append(_CATEGORIES[item[1]])
        return ("set", lambda ch: (ch in chars or any(lo <= ch <= hi for lo, hi in ranges)
                                   or any(t(ch) for t in tests)) != negate, 1 + len(ranges) + len(tests))


# ---- compiling: tree -> NFA program of ("lit", c) ("set", test, cost) ("split", a, b) ("jmp", a) ("assert", kind)
#      ("match",)

def _emit(tree, program: list) -> None:
    if len(program) > MAX_PROGRAM:
        raise PatternError(f"too complex (more than {MAX_PROGRAM} NFA states)")
    kind = tree[0]
    if kind in ("lit", "set", "assert"):
        program.append(tree)
    elif kind == "cat":
        for item in tree[1]:
            _emit(item, program)
    elif kind == "alt":  # split -> first | (split -> second | ...), each branch jumps to the end
        jumps = []
        for branch in tree[1][:-1]:
            split = len(program)
            program.append(None)
            _emit(branch, program)
            jumps.append(len(program))
            program.append(None)
            program[split] = ("split", split + 1, len(program))
        _emit(tree[1][-1], program)
        for j in jumps:
            program[j] = ("jmp", len(program))
    elif not _empty(tree):  # repeat: `lo` copies, then `hi - lo` optional copies or a loop; each copy adds
        _, item, lo, hi = tree  # instructions, so the size check above also ends these loops
        for _ in range(lo):
            _emit(item, program)
        if hi is None:
            loop = len(program)
            program.append(None)
            _emit(item, program)
            program.append(("jmp", loop))
            program[loop] = ("split", loop + 1, len(program))
        else:
            splits = []
            for _ in range(hi - lo):
                splits.append(len(program))
                program.append(None)
                _emit(item, program)
            for s in splits:
                program[s] = ("split", s + 1, len(program))


def _empty(tree) -> bool:
    """True when a tree compiles to no instructions (an empty group, x{0}): repeating it is a no-op."""
    if tree[0] == "cat":
        return all(_empty(item) for item in tree[1])
    if tree[0] == "repeat":
        return tree[3] == 0 or _empty(tree[1])
    return False


def _peft_tree(key_tree):
    """peft's wrapper around a key: (.*\\.)?(key)$, matched from the start of the name."""
    any_prefix = ("cat", [("repeat", _ANY, 0, None), ("lit", ".")])
    return ("cat", [("repeat", any_prefix, 0, 1), key_tree, ("assert", "eol")])


def _literal(tree) -> tuple[str, bool] | None:
    """(text, anchored) when a key is plain text, optionally between ^ and $ (all keys save_adapter writes)."""
    items = list(tree[1]) if tree[0] == "cat" else [tree]
    anchored = bool(items) and items[0] == ("assert", "bol")
    items = items[anchored:]
    if items and items[-1] == ("assert", "eol"):
        items.pop()
    if all(item[0] == "lit" for item in items):
        return "".join(item[1] for item in items), anchored
    return None


class Patterns:
    """A rank_pattern / alpha_pattern mapping compiled once; `value(name, default)` is peft's lookup."""

    def __init__(self, patterns: dict, what: str = "pattern"):
        self.what, self.steps, self.patterns = what, 0, dict(patterns)
        self.rules = []  # (literal (text, anchored) or NFA program, transition cache, value) in the mapping's order
        for key, value in patterns.items():
            if len(key) > MAX_KEY_CHARS:
                raise PatternError(f"{what} key of {len(key)} characters is too long (at most {MAX_KEY_CHARS})")
            try:
                tree = _Parser(key).parse()
                literal = _literal(tree)
                program = []
                if literal is None:
                    _emit(_peft_tree(tree), program)
                    program.append(("match",))
            except PatternError as e:
                raise PatternError(f"{what} key {show(key)}: {e}") from None
            self.spend(10 * (len(key) + len(program)))  # parsing costs about 10x a matching step per character
            self.rules.append((literal or program, {}, value))

    def spend(self, steps: int) -> None:
        self.steps += steps
        if self.steps > MAX_STEPS:
            raise PatternError(f"{self.what} is too large or complex to evaluate (over {MAX_STEPS} steps); "
                               "use fewer or simpler keys")

    def value(self, name: str, default):
        for rule, cache, value in self.rules:
            self.spend(1)
            if self._literal_matches(*rule, name) if isinstance(rule, tuple) else self._nfa_matches(rule, cache, name):
                return value
        # When no key matches, get_pattern_key returns the name itself, which peft then looks up as a key: this only
        # matters for a name with regex characters (module names have none) that equals a key.
        return self.patterns.get(name, default)

    @staticmethod
    def _literal_matches(text: str, anchored: bool, name: str) -> bool:
        """re.match(r"(.*\\.)?(text)$", name): name is [a prefix ending in "." without newlines] + text, and `$` also
        matches before a final newline."""
        for s in (name, name[:-1]) if name.endswith("\n") else (name,):
            prefix = s[:len(s) - len(text)]
            if s.endswith(text) and (prefix == "" or (not anchored and prefix.endswith(".") and "\n" not in prefix)):
                return True
        return False

    def _nfa_matches(self, program: list, cache: dict, name: str) -> bool:
        """Thompson simulation: the set of instructions waiting for the next character, advanced one character at a
        time; each (set, character) step is remembered, so repeated module-name parts cost one lookup."""
        n = len(name)

        def closure(pcs, pos: int) -> tuple[frozenset, bool]:
            at = {"bol": pos == 0, "eos": pos == n, "eol": pos == n or (pos == n - 1 and name[pos] == "\n")}
            seen, waiting, matched, stack = set(), [], False, list(pcs)
            while stack:
                pc = stack.pop()
                if pc in seen:
                    continue
                seen.add(pc)
                op = program[pc]
                if op[0] == "split":
                    stack += op[1:]
                elif op[0] == "jmp":
                    stack.append(op[1])
                elif op[0] == "assert":
                    if at[op[1]]:
                        stack.append(pc + 1)
                elif op[0] == "match":
                    matched = True
                else:
                    waiting.append(pc)
            self.spend(len(seen))
            return frozenset(waiting), matched

        def advance(state: frozenset, c: str) -> list[int]:
            moved = []
            for pc in state:
                op = program[pc]
                if op[0] == "lit":
                    hit = op[1] == c
                else:
                    hit = op[1](c)
                    self.spend(op[2])  # a class of many ranges costs more than one step to test
                if hit:
                    moved.append(pc + 1)
            return moved

        state, matched = closure([0], 0)
        for pos, c in enumerate(name):
            if matched or not state:
                break
            # Before the last two positions no assertion holds (^ needs 0; $ the end or a final "\n"), so the
            # step depends on (state, c) alone and can be remembered.
            cacheable = pos + 1 < n - 1
            step = cache.get((state, c)) if cacheable else None
            if step is None:
                step = closure(advance(state, c), pos + 1)
                if cacheable and len(cache) < CACHE_LIMIT:
                    cache[(state, c)] = step
            state, matched = step
            self.spend(1)
        return matched
