"""Character-level tokenizer, the course corpus as tensors, and deterministic train/val batches.

Every batch is a pure function of ``(split, batch_size, block_size, seed, domain)``: the training loop asks for
the batch of step ``s`` with ``seed = base_seed + s``, so a run resumed from a checkpoint sees exactly the
batches an uninterrupted run would. Built in notebooks/01_dense_baseline.ipynb.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import corpus


class CharTokenizer:
    """Maps each distinct character of a text to an id (sorted by code point) and back."""

    def __init__(self, chars: Sequence[str]):
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(list(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a 1-D ``torch.long`` tensor of ids; names the first character outside the vocabulary."""
        try:
            return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        except KeyError as err:
            pos = next(i for i, c in enumerate(text) if c not in self.stoi)
            raise ValueError(f"character {err.args[0]!r} at position {pos} is not in the tokenizer's "
                             f"vocabulary of {self.vocab_size} characters") from None

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


@dataclass
class TextData:
    """A tokenized text split into train and val, with the token range each domain occupies in each split.

    ``ranges[split][domain] = (start, end)``: the domain's tokens are ``tokens[split][start:end]``.
    """

    tokenizer: CharTokenizer
    tokens: dict[str, torch.Tensor]
    ranges: dict[str, dict[str, tuple[int, int]]]

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.ranges["train"])

    def batch(self, split: str, batch_size: int, block_size: int, seed: int, domain: str | None = None,
              balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each ``(batch_size, block_size)``: random windows of the split, ``y`` shifted by one.

        ``domain`` restricts the windows to that domain's text. ``balanced`` draws window ``i`` from domain
        ``i mod n_domains``, so that every batch has the same mix of domains (evaluation uses it: a train and
        a val estimate are then comparable). Deterministic in ``seed``.
        """
        if split not in self.tokens:
            raise ValueError(f"split = {split!r} is not allowed; allowed: 'train', 'val'")
        if domain is not None and domain not in self.ranges[split]:
            raise ValueError(f"domain = {domain!r} is not allowed; allowed: None, {', '.join(self.domains)}")
        names = [domain] if domain else list(self.domains) if balanced else [None]
        bounds = [self.ranges[split][n] if n else (0, len(self.tokens[split])) for n in names]
        for name, (start, end) in zip(names, bounds):
            if end - start - block_size < 1:
                where = f"the {split} split{f' of domain {name!r}' if name else ''}"
                raise ValueError(f"block_size = {block_size} is not allowed: {where} has only {end - start} "
                                 f"tokens; allowed: block_size <= {end - start - 1}, or a longer text")
        g = torch.Generator().manual_seed(seed)
        which = torch.arange(batch_size) % len(bounds)                               # domain of each window
        low = torch.tensor([start for start, _ in bounds])[which]
        span = torch.tensor([end - start - block_size for start, end in bounds])[which]
        offsets = low + (torch.rand(batch_size, generator=g, dtype=torch.float64) * span).long()
        window = offsets[:, None] + torch.arange(block_size + 1)                     # (B, block_size + 1)
        chunk = self.tokens[split][window]
        return chunk[:, :-1], chunk[:, 1:]


def split_at_line(text: str, val_fraction: float) -> tuple[str, str]:
    """Split before the first line that starts after ``1 - val_fraction`` of the text."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction = {val_fraction!r} is not allowed; allowed: a number in (0, 1)")
    cut = text.find("\n", int(len(text) * (1 - val_fraction)))
    cut = len(text) if cut == -1 else cut + 1
    return text[:cut], text[cut:]


def build(texts: dict[str, str], val_fraction: float = 0.1) -> TextData:
    """Tokenize named texts (one per domain), split each into train/val, and concatenate the splits."""
    tokenizer = CharTokenizer.from_text("".join(texts.values()))
    parts: dict[str, list[str]] = {"train": [], "val": []}
    ranges: dict[str, dict[str, tuple[int, int]]] = {"train": {}, "val": {}}
    for name, text in texts.items():
        pieces = split_at_line(text, val_fraction)
        if len(pieces[1]) < 2:
            raise ValueError(f"text {name!r} ({len(text)} characters) has no line break in its last "
                             f"{val_fraction:.0%}, so nothing can be held out for validation; allowed: a text of "
                             f"several lines, or a larger val_fraction")
        for split, piece in zip(("train", "val"), pieces):
            start = sum(len(p) for p in parts[split])
            parts[split].append(piece)
            ranges[split][name] = (start, start + len(piece))
    tokens = {split: tokenizer.encode("".join(pieces)) for split, pieces in parts.items()}
    return TextData(tokenizer, tokens, ranges)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file with errors that say what is wrong: missing, a folder, empty, or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no file at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a UTF-8 text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} "
                         f"cannot be decoded; convert it first, e.g. `iconv -t UTF-8 {path.name}`") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; a training text needs at least a few hundred characters")
    return text


def load_text(path: str | Path, val_fraction: float = 0.1) -> TextData:
    """Train on any UTF-8 text file: one domain named after the file, the last ``val_fraction`` held out."""
    path = Path(path)
    return build({path.stem: read_text(path)}, val_fraction)


def load_corpus(root: str | Path = corpus.CORPUS_DIR, val_fraction: float = 0.1) -> TextData:
    """The five-domain course corpus shipped in the package (regenerate with ``python -m moelab.corpus``)."""
    root = Path(root)
    missing = [d for d in corpus.DOMAINS if not (root / f"{d}.txt").is_file()]
    if missing:
        raise FileNotFoundError(f"course corpus files {', '.join(missing)} not found in {root}; "
                                f"regenerate them with `python -m moelab.corpus --out {root}`")
    return build({d: read_text(root / f"{d}.txt") for d in corpus.DOMAINS}, val_fraction)


def rank_batch(data: TextData, step: int, rank: int, batch_size: int, block_size: int, seed: int = 0):
    """Rank ``rank``'s training batch at ``step`` in data-parallel training: its own windows of the text."""
    return data.batch("train", batch_size, block_size, seed=seed * 10**6 + step * 1000 + rank)


def global_batch(data: TextData, step: int, world_size: int, batch_size: int, block_size: int, seed: int = 0):
    """All ranks' batches at ``step`` together, in rank order: what one process trains on to take the same step."""
    xs, ys = zip(*(rank_batch(data, step, r, batch_size, block_size, seed) for r in range(world_size)))
    return torch.cat(xs), torch.cat(ys)
