"""Sensitive-word filter: masks or rejects chat messages that contain blocked words.

An ``on_message`` plugin built on an Aho–Corasick automaton written in pure Python: the
automaton is built once from the word list (a few milliseconds for thousands of words),
and every message is scanned in a single pass whatever the size of the dictionary, in
microseconds (``python -m examples.wordfilter --bench`` prints the figure for this
machine). Matching is case-insensitive, folds full-width ASCII (``ＢＡＤ`` = ``bad``) and
works for any script, Chinese included; it is substring matching (the norm for CJK),
optionally whole-word for ASCII words (``WORDFILTER_WHOLE_WORDS``).

The hook inspects the string values inside ``msg.data`` (every string, recursively, or
only the configured top-level fields such as ``text``) and, per ``WORDFILTER_MODE``:

- ``mask``: every blocked word is replaced by ``***`` and the message goes out modified;
- ``reject``: the sender gets error ``4050`` and nobody sees the message;
- ``drop``: the sender gets a normal ack but nobody sees the message (a silent
  "shadow" filter that does not teach spammers which words are blocked).

Run it::

    WORDFILTER_FILE=/etc/gateway/words.txt WORDFILTER_MODE=mask \\
        gateway run --app examples.wordfilter:make_app

or compose it into your own app::

    from examples.wordfilter import WordFilter, WordFilterSettings
    gw = Gateway(config, plugins=[WordFilter(WordFilterSettings(words=("spam", "傻逼")))])

Settings (environment variables; the gateway's own ``GATEWAY_*`` variables must not be
used for plugin settings, its config loader rejects unknown keys):

=============================  ================================================================
``WORDFILTER_WORDS``           blocked words, comma or newline separated
``WORDFILTER_FILE``            UTF-8 file, one word per line (``#`` comments); added to the above
``WORDFILTER_MODE``            ``mask`` (default), ``reject`` or ``drop``
``WORDFILTER_MASK``            replacement for each blocked word in mask mode (default ``***``)
``WORDFILTER_FIELDS``          top-level keys of ``data`` to inspect, comma separated
                               (default: every string value, recursively)
``WORDFILTER_TYPES``           message types to inspect, comma separated (default: all)
``WORDFILTER_EXEMPT_ROLES``    token ``role`` values that bypass the filter (e.g. ``admin``)
``WORDFILTER_WHOLE_WORDS``     ``1``: ASCII words only match as whole words (``ass`` does not
                               match ``class``); default ``0``
``WORDFILTER_REJECT_MESSAGE``  error message in reject mode
``WORDFILTER_RELOAD_INTERVAL`` seconds between checks of ``WORDFILTER_FILE`` for changes;
                               a changed file is reloaded without a restart (default 0 = off)
=============================  ================================================================

The hook is synchronous on purpose: it does no I/O and costs microseconds, so it runs
inline on the event loop with no task and no timeout bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import DROP, Client, Config, ConfigError, Gateway, Message, Plugin, Reject

__all__ = ["AhoCorasick", "WordFilter", "WordFilterSettings", "make_app", "normalize"]

log = logging.getLogger("gateway.wordfilter")

E_REJECTED = 4050
MODES = ("mask", "reject", "drop")
#: Nesting depth of ``msg.data`` inspected; deeper values pass unchecked.
MAX_DEPTH = 16

# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space fold to ASCII. The mapping is
# one character to one character, so positions in the folded text are positions in the
# original text (masking relies on it). ``str.translate`` is slow on non-ASCII text, so it
# only runs when a full-width character is present (a C-speed character-class search).
_FOLD = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}
_FOLD[0x3000] = 0x20
_HAS_FULL_WIDTH = re.compile("[\uff01-\uff5e\u3000]").search


def normalize(text: str) -> str:
    """Lower-case ``text`` and fold full-width ASCII, keeping its length (one character
    in, one character out), so that match positions apply to the original text."""
    if text.isascii():
        return text.lower()
    if _HAS_FULL_WIDTH(text) is not None:
        text = text.translate(_FOLD)
    t = text.lower()
    if len(t) == len(text):
        return t
    # Rare: a character whose lower case is longer (e.g. U+0130 "İ"): fold per character.
    out = []
    for c in text:
        low = c.lower()
        out.append(low if len(low) == 1 else c)
    return "".join(out)


def _is_word_char(c: str) -> bool:
    return c.isascii() and c.isalnum()


# Automaton nodes are dicts: character keys map to child nodes, and these integer keys
# (which can never collide with one-character strings) hold the node's data. Keeping the
# data in the node itself saves an index per scanned character.
_FAIL = 0  # failure link: the node of the longest proper suffix that is in the trie
_OUT = 1  # length of the longest word that is a suffix of the node's string, 0 = none
_OWN = 2  # length of the word ending exactly here, 0 = none
_LINK = 3  # dictionary link: nearest proper suffix node that ends a word, or None
_BOUNDED = 4  # the word ending here only matches as a whole word

Node = dict[Any, Any]


class AhoCorasick:
    """An Aho–Corasick automaton over normalised words (see :func:`normalize`).

    Built once; :meth:`contains`, :meth:`spans` and :meth:`mask` then scan a text in one
    pass: one goto per character plus amortised O(1) failure links, whatever the number
    of words. Immutable after construction, so it can be swapped atomically for a new one.

    ``whole_words=True`` makes words made only of ASCII letters and digits match only
    when not surrounded by ASCII letters or digits.
    """

    __slots__ = ("_any_bounded", "_empty", "_root", "nodes", "words")

    def __init__(self, words: Iterable[str], *, whole_words: bool = False) -> None:
        root: Node = {_OUT: 0, _OWN: 0, _LINK: None, _BOUNDED: False}
        root[_FAIL] = root
        nodes = 1
        uniq: set[str] = set()
        any_bounded = False
        for raw in words:
            w = normalize(raw.strip())
            if not w or w in uniq:
                continue
            uniq.add(w)
            node = root
            for ch in w:
                nxt = node.get(ch)
                if nxt is None:
                    nxt = {_OUT: 0, _OWN: 0, _LINK: None, _BOUNDED: False}
                    node[ch] = nxt
                    nodes += 1
                node = nxt
            node[_OWN] = node[_OUT] = len(w)
            if whole_words and w.isascii() and w.isalnum():
                node[_BOUNDED] = any_bounded = True
        # Breadth-first: a node's failure target is shallower, hence already complete.
        queue: deque[Node] = deque()
        for ch, child in _children(root):
            child[_FAIL] = root
            queue.append(child)
        while queue:
            node = queue.popleft()
            for ch, child in _children(node):
                queue.append(child)
                f = node[_FAIL]
                while f is not root and ch not in f:
                    f = f[_FAIL]
                target = f.get(ch, root)
                child[_FAIL] = target
                child[_LINK] = target if target[_OWN] else target[_LINK]
                if not child[_OUT]:
                    child[_OUT] = target[_OUT]
        self._root = root
        self._empty = not uniq
        self._any_bounded = any_bounded
        self.words = len(uniq)
        self.nodes = nodes

    def __len__(self) -> int:
        return self.words

    @staticmethod
    def _valid(t: str, i: int, node: Node) -> int:
        """Length of the longest word ending at ``t[i]`` that satisfies the whole-word
        rule, 0 if none."""
        n = node if node[_OWN] else node[_LINK]
        while n is not None:
            ln = n[_OWN]
            if not n[_BOUNDED]:
                return ln  # type: ignore[no-any-return]
            a = i + 1 - ln
            if (a == 0 or not _is_word_char(t[a - 1])) and (i + 1 == len(t) or not _is_word_char(t[i + 1])):
                return ln  # type: ignore[no-any-return]
            n = n[_LINK]
        return 0

    def contains(self, text: str) -> bool:
        """Whether ``text`` contains a word (stops at the first one)."""
        if self._empty:
            return False
        root = self._root
        t = normalize(text)
        if self._any_bounded:
            return bool(self._spans(t, first=True))
        node = root
        for ch in t:
            nxt = node.get(ch)
            while nxt is None and node is not root:
                node = node[_FAIL]
                nxt = node.get(ch)
            node = root if nxt is None else nxt
            if node[_OUT]:
                return True
        return False

    def spans(self, text: str) -> list[tuple[int, int]]:
        """``(start, end)`` slices of ``text`` covered by words: overlapping and touching
        matches are merged, in order."""
        if self._empty:
            return []
        return self._spans(normalize(text), first=False)

    def _spans(self, t: str, first: bool) -> list[tuple[int, int]]:
        root = self._root
        bounded = self._any_bounded
        valid = self._valid
        res: list[tuple[int, int]] = []
        node = root
        for i, ch in enumerate(t):
            nxt = node.get(ch)
            while nxt is None and node is not root:
                node = node[_FAIL]
                nxt = node.get(ch)
            node = root if nxt is None else nxt
            ln = node[_OUT]
            if ln:
                if bounded:
                    ln = valid(t, i, node)
                    if not ln:
                        continue
                start = i + 1 - ln
                while res and start <= res[-1][1]:
                    ps = res.pop()[0]
                    start = min(start, ps)
                res.append((start, i + 1))
                if first:
                    break
        return res

    def find(self, text: str) -> list[str]:
        """The blocked passages of ``text`` as they appear in it (merged spans)."""
        return [text[a:b] for a, b in self.spans(text)]

    def mask(self, text: str, mask: str = "***") -> tuple[str, int]:
        """``text`` with every blocked passage replaced by ``mask``, and how many."""
        sp = self.spans(text)
        if not sp:
            return text, 0
        parts: list[str] = []
        prev = 0
        for a, b in sp:
            parts.append(text[prev:a])
            parts.append(mask)
            prev = b
        parts.append(text[prev:])
        return "".join(parts), len(sp)


def _children(node: Node) -> list[tuple[str, Node]]:
    return [(k, v) for k, v in node.items() if isinstance(k, str)]


# ---- settings ----------------------------------------------------------------------------


def _split(value: str) -> list[str]:
    return [w.strip() for w in value.replace("\n", ",").split(",") if w.strip()]


def _set_or_none(value: str | None) -> frozenset[str] | None:
    items = _split(value or "")
    return frozenset(items) if items else None


def _bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(name, f"must be 0/1/true/false, got {value!r}")


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {value!r}") from None


def read_words(path: str) -> list[str]:
    """Words from a UTF-8 file: one per line, blank lines and ``#`` comments ignored."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ConfigError("WORDFILTER_FILE", f"cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("WORDFILTER_FILE", f"{path!r} is not UTF-8") from None


@dataclass
class WordFilterSettings:
    """Settings of :class:`WordFilter`; see the module docstring for each one."""

    words: tuple[str, ...] = ()
    words_file: str | None = None
    mode: str = "mask"
    mask: str = "***"
    fields: frozenset[str] | None = None
    types: frozenset[str] | None = None
    exempt_roles: frozenset[str] = field(default_factory=frozenset)
    whole_words: bool = False
    reject_message: str = "message contains a blocked word"
    reload_interval: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WordFilterSettings:
        """Read ``WORDFILTER_*`` variables (raises :class:`ConfigError` naming the variable)."""
        env = os.environ if environ is None else environ
        s = cls(
            words=tuple(_split(env.get("WORDFILTER_WORDS", ""))),
            words_file=env.get("WORDFILTER_FILE") or None,
            mode=env.get("WORDFILTER_MODE", "mask").strip().lower(),
            mask=env.get("WORDFILTER_MASK", "***"),
            fields=_set_or_none(env.get("WORDFILTER_FIELDS")),
            types=_set_or_none(env.get("WORDFILTER_TYPES")),
            exempt_roles=frozenset(_split(env.get("WORDFILTER_EXEMPT_ROLES", ""))),
            whole_words=_bool("WORDFILTER_WHOLE_WORDS", env.get("WORDFILTER_WHOLE_WORDS", "0")),
            reject_message=env.get("WORDFILTER_REJECT_MESSAGE", cls.reject_message),
            reload_interval=_float("WORDFILTER_RELOAD_INTERVAL", env.get("WORDFILTER_RELOAD_INTERVAL", "0")),
        )
        s.check()
        return s

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("WORDFILTER_MODE", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.reload_interval < 0:
            raise ConfigError("WORDFILTER_RELOAD_INTERVAL", "must be >= 0")
        if self.reload_interval and not self.words_file:
            raise ConfigError("WORDFILTER_RELOAD_INTERVAL", "needs WORDFILTER_FILE")


# ---- the plugin --------------------------------------------------------------------------


class WordFilter(Plugin):
    """``on_message`` plugin masking, rejecting (4050) or dropping messages with blocked words.

    Counters: ``checked`` (messages inspected), ``masked``, ``rejected``, ``dropped``.
    :meth:`set_words` replaces the dictionary at run time (e.g. from an admin endpoint).
    """

    name = "wordfilter"

    def __init__(self, settings: WordFilterSettings | None = None) -> None:
        self.settings = s = settings or WordFilterSettings()
        s.check()
        self.checked = 0
        self.masked = 0
        self.rejected = 0
        self.dropped = 0
        self._file_mtime: float | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self._ac = AhoCorasick(self._load_words(), whole_words=s.whole_words)
        log.info("word filter: %d words, mode %s", len(self._ac), s.mode)

    @property
    def automaton(self) -> AhoCorasick:
        return self._ac

    def _load_words(self) -> list[str]:
        s = self.settings
        words = list(s.words)
        if s.words_file:
            self._file_mtime = _mtime(s.words_file)
            words += read_words(s.words_file)
        return words

    def set_words(self, words: Iterable[str]) -> None:
        """Replace the dictionary (the new automaton is swapped in atomically)."""
        self._ac = AhoCorasick(words, whole_words=self.settings.whole_words)

    # -- hook ------------------------------------------------------------------------------

    def on_message(self, client: Client, msg: Message) -> Message | object | None:
        s = self.settings
        if s.types is not None and msg.type not in s.types:
            return None
        if s.exempt_roles and _has_role(client.identity.meta.get("role"), s.exempt_roles):
            return None
        self.checked += 1
        data = msg.data
        if s.mode == "mask":
            new, hits = self._mask_top(data)
            if not hits:
                return None
            self.masked += 1
            msg.data = new
            return msg
        if not self._contains_top(data):
            return None
        if s.mode == "drop":
            self.dropped += 1
            return DROP
        self.rejected += 1
        raise Reject(E_REJECTED, s.reject_message)

    def _mask_top(self, data: Any) -> tuple[Any, int]:
        fields = self.settings.fields
        if fields is None or not isinstance(data, dict):
            return self._mask(data, 0)
        out: dict[str, Any] | None = None
        hits = 0
        for k in fields:
            if k in data:
                new, n = self._mask(data[k], 1)
                if n:
                    if out is None:
                        out = dict(data)
                    out[k] = new
                    hits += n
        return (out if out is not None else data), hits

    def _mask(self, v: Any, depth: int) -> tuple[Any, int]:
        if isinstance(v, str):
            return self._ac.mask(v, self.settings.mask)
        if depth >= MAX_DEPTH:
            return v, 0
        if isinstance(v, dict):
            out: dict[str, Any] | None = None
            hits = 0
            for k, x in v.items():
                new, n = self._mask(x, depth + 1)
                if n:
                    if out is None:
                        out = dict(v)
                    out[k] = new
                    hits += n
            return (out if out is not None else v), hits
        if isinstance(v, list):
            lst: list[Any] | None = None
            hits = 0
            for i, x in enumerate(v):
                new, n = self._mask(x, depth + 1)
                if n:
                    if lst is None:
                        lst = list(v)
                    lst[i] = new
                    hits += n
            return (lst if lst is not None else v), hits
        return v, 0

    def _contains_top(self, data: Any) -> bool:
        fields = self.settings.fields
        if fields is None or not isinstance(data, dict):
            return self._contains(data, 0)
        return any(self._contains(data[k], 1) for k in fields if k in data)

    def _contains(self, v: Any, depth: int) -> bool:
        if isinstance(v, str):
            return self._ac.contains(v)
        if depth >= MAX_DEPTH:
            return False
        if isinstance(v, dict):
            return any(self._contains(x, depth + 1) for x in v.values())
        if isinstance(v, list):
            return any(self._contains(x, depth + 1) for x in v)
        return False

    # -- lifecycle: optional reload of the word file ---------------------------------------

    async def setup(self, gateway: Gateway) -> None:
        if self.settings.reload_interval > 0:
            self._reload_task = asyncio.create_task(self._reload_loop())

    async def teardown(self) -> None:
        t, self._reload_task = self._reload_task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _reload_loop(self) -> None:
        s = self.settings
        assert s.words_file
        while True:
            await asyncio.sleep(s.reload_interval)
            m = _mtime(s.words_file)
            if m is None or m == self._file_mtime:
                continue
            try:
                # Building is pure CPU; a thread keeps a large dictionary off the loop's
                # critical path (the GIL is released every few milliseconds).
                words = await asyncio.to_thread(self._load_words)
                ac = await asyncio.to_thread(AhoCorasick, words, whole_words=s.whole_words)
            except Exception:
                log.exception("word filter: reloading %s failed; keeping the old list", s.words_file)
                self._file_mtime = m
                continue
            self._ac = ac
            log.info("word filter: reloaded %s (%d words)", s.words_file, len(ac))


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _has_role(role: Any, allowed: frozenset[str]) -> bool:
    if isinstance(role, str):
        return role in allowed
    if isinstance(role, (list, tuple)):
        return any(isinstance(r, str) and r in allowed for r in role)
    return False


def make_app(config: Config) -> Gateway:
    """``gateway run --app examples.wordfilter:make_app``: the gateway with the word filter
    configured from ``WORDFILTER_*`` environment variables."""
    return Gateway(config, plugins=[WordFilter(WordFilterSettings.from_env())])


# ---- micro-benchmark ---------------------------------------------------------------------


def bench_corpus(n_words: int = 1000, n_msgs: int = 2000, msg_len: int = 100, hit_ratio: float = 0.1, seed: int = 7) -> tuple[list[str], list[str]]:
    """A reproducible dictionary (half Chinese, half Latin words) and chat messages
    (mixed Chinese and Latin text, ``hit_ratio`` of them containing a word)."""
    import random

    rnd = random.Random(seed)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    latin = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n_words:
        if len(words) % 2:
            words.add("".join(rnd.choice(cjk) for _ in range(rnd.randint(2, 4))))
        else:
            words.add("".join(rnd.choice(latin) for _ in range(rnd.randint(4, 9))))
    wl = sorted(words)
    filler = cjk[:1500] + list(latin) * 20 + list(" ,.!?") * 20
    msgs = []
    for _ in range(n_msgs):
        chars = [rnd.choice(filler) for _ in range(msg_len)]
        if rnd.random() < hit_ratio:
            w = rnd.choice(wl)
            at = rnd.randrange(0, msg_len - len(w))
            chars[at : at + len(w)] = list(w.upper())
        msgs.append("".join(chars)[:msg_len])
    return wl, msgs


def bench(n_words: int = 1000, msg_len: int = 100, rounds: int = 5) -> dict[str, float]:
    """Microseconds per message: build time, ``contains`` (reject mode), ``mask`` and the
    whole ``on_message`` hook in mask mode. Best of ``rounds``."""
    words, msgs = bench_corpus(n_words, msg_len=msg_len)
    t0 = time.perf_counter()
    ac = AhoCorasick(words)
    build_ms = (time.perf_counter() - t0) * 1e3
    plugin = WordFilter(WordFilterSettings(words=tuple(words)))
    ident = __import__("gateway.auth", fromlist=["Identity"]).Identity("bench")
    client = Client(1, ident, "s", "127.0.0.1:1")
    payloads = [{"text": m} for m in msgs]

    def best(fn: Any) -> float:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) / len(msgs) * 1e6

    def run_hook() -> None:
        for p in payloads:
            plugin.on_message(client, Message("live:1", "chat", p, client))

    return {
        "words": float(len(ac)),
        "msg_chars": float(msg_len),
        "build_ms": build_ms,
        "contains_us": best(lambda: [ac.contains(m) for m in msgs]),
        "mask_us": best(lambda: [ac.mask(m) for m in msgs]),
        "hook_us": best(run_hook),
        "hits": float(sum(1 for m in msgs if ac.contains(m))),
        "messages": float(len(msgs)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Word filter micro-benchmark (µs per message).")
    ap.add_argument("--bench", action="store_true", help="run the benchmark (default)")
    ap.add_argument("--words", type=int, default=1000)
    ap.add_argument("--chars", type=int, default=100)
    a = ap.parse_args(argv)
    r = bench(a.words, a.chars)
    print(
        f"{int(r['words'])} words, {int(r['messages'])} messages of {int(r['msg_chars'])} chars "
        f"({int(r['hits'])} with a blocked word); automaton built in {r['build_ms']:.1f} ms\n"
        f"  contains (reject/drop mode): {r['contains_us']:.1f} µs/message\n"
        f"  mask:                        {r['mask_us']:.1f} µs/message\n"
        f"  on_message hook (mask mode): {r['hook_us']:.1f} µs/message"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
