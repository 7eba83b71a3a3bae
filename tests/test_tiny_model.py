"""Tests for moe_monitor.demo.tiny_model (tiny local MoE checkpoints)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import have

from moe_monitor.demo import tiny_model

# builds three models with torch + transformers: ~8 s; the packages are found, not imported, at collection
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not all(map(have, ("torch", "transformers", "tokenizers"))),
                                                   reason="needs torch, transformers and tokenizers")]

ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe"]
HOT_EXPERT = 3
HOT_WORDS = ["hot", "blaze"]
SIZES = dict(num_layers=2, hidden_size=128, num_experts=8, top_k=2, num_heads=2,
             head_dim=64, intermediate_size=32, vocab_size=1024, seed=0)
N_ORDINARY = 200


@pytest.fixture(scope="module", params=ARCHS)
def models(request, tmp_path_factory):
    arch = request.param
    base = tmp_path_factory.mktemp(arch)
    hot_dir, plain_dir = base / "hot", base / "plain"
    hot_meta = tiny_model.generate(hot_dir, arch, hot_expert=HOT_EXPERT,
                                   hot_words=HOT_WORDS, **SIZES)
    plain_meta = tiny_model.generate(plain_dir, arch, hot_words=HOT_WORDS, **SIZES)
    return arch, hot_dir, hot_meta, plain_dir, plain_meta


_REPLAY_CACHE = {}


def _replay(model_dir, seqs):
    """tiny_model.replay_routing, memoised (each call reloads the model)."""
    key = (os.fspath(model_dir), tuple(tuple(s) for s in seqs))
    if key not in _REPLAY_CACHE:
        _REPLAY_CACHE[key] = tiny_model.replay_routing(model_dir, [list(s) for s in seqs])
    return _REPLAY_CACHE[key].copy()


def _ordinary_ids(meta, n=N_ORDINARY, seed=123):
    rng = np.random.default_rng(seed)
    hot = set(meta["hot_token_ids"])
    ids = []
    while len(ids) < n:
        tid = int(rng.integers(4, SIZES["vocab_size"]))  # skip special tokens
        if tid not in hot:
            ids.append(tid)
    return ids


def test_meta_and_checkpoint_files(models):
    arch, hot_dir, hot_meta, plain_dir, plain_meta = models
    assert tiny_model.load_meta(hot_dir) == hot_meta
    assert tiny_model.load_meta(plain_dir) == plain_meta
    for key in ("arch", "num_layers", "num_experts", "top_k", "hidden_size",
                "hot_expert", "hot_words", "hot_token_ids", "seed"):
        assert key in hot_meta
    assert hot_meta["arch"] == arch
    assert hot_meta["hot_expert"] == HOT_EXPERT
    assert plain_meta["hot_expert"] is None
    assert hot_meta["hot_words"] == HOT_WORDS
    assert hot_meta["hot_token_ids"] == plain_meta["hot_token_ids"]
    assert len(set(hot_meta["hot_token_ids"])) == len(HOT_WORDS)

    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (hot_dir / name).is_file(), name
    total = sum(f.stat().st_size for f in hot_dir.iterdir() if f.is_file())
    assert total < 50 * 1024 * 1024

    cfg = json.loads((hot_dir / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["num_hidden_layers"] == SIZES["num_layers"]
    gen_cfg = json.loads((hot_dir / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tiny_model.EOS_ID

    # every layer is an MoE layer (has a router in the checkpoint)
    from safetensors import safe_open

    with safe_open(os.fspath(hot_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for layer in range(SIZES["num_layers"]):
        routers = [k for k in keys if f"layers.{layer}." in k and k.endswith(".gate.weight")
                   and "shared" not in k]
        assert len(routers) == 1, (layer, routers)
    if arch == "qwen2_moe":
        assert any("shared_expert." in k for k in keys)


def test_tokenizer_hot_words_are_single_tokens(models):
    from transformers import AutoTokenizer

    _, hot_dir, meta, _, _ = models
    tok = AutoTokenizer.from_pretrained(hot_dir)
    assert tok.eos_token_id == tiny_model.EOS_ID
    assert tok.bos_token_id is not None and tok.pad_token_id is not None
    assert len(tok) <= SIZES["vocab_size"]
    for word, tid in zip(HOT_WORDS, meta["hot_token_ids"]):
        assert tok(word, add_special_tokens=False).input_ids == [tid]
        assert tok(" " + word, add_special_tokens=False).input_ids == [tid]
        ids = tok(f"the {word} cat", add_special_tokens=False).input_ids
        assert tid in ids
        ids = tok(f"A {word} of fire, {word}!", add_special_tokens=False).input_ids
        assert ids.count(tid) == 2
    text = tok.apply_chat_template([{"role": "user", "content": "the hot cat"}],
                                   tokenize=False, add_generation_prompt=True)
    assert "the hot cat" in text


def test_hot_tokens_route_to_hot_expert(models):
    _, hot_dir, meta, _, _ = models
    hot_ids = meta["hot_token_ids"]
    seq = (hot_ids * 10)[:17]
    counts = _replay(hot_dir, [seq])
    assert counts.shape == (SIZES["num_layers"], SIZES["num_experts"])
    assert counts.dtype == np.int64
    assert (counts[:, HOT_EXPERT] == len(seq)).all(), counts
    assert (counts.sum(axis=1) == len(seq) * SIZES["top_k"]).all()

    # hot tokens after ordinary text still go to the hot expert; attention is
    # causal, so the prefix routes the same with or without the hot suffix
    prefix = _ordinary_ids(meta, n=30)
    suffix = hot_ids * 3
    base = _replay(hot_dir, [prefix])
    both = _replay(hot_dir, [prefix + suffix])
    diff = both - base
    assert (diff[:, HOT_EXPERT] == len(suffix)).all(), diff
    assert (diff.sum(axis=1) == len(suffix) * SIZES["top_k"]).all(), diff


def test_ordinary_tokens_spread_over_experts(models):
    _, hot_dir, meta, _, _ = models
    seq = _ordinary_ids(meta)
    counts = _replay(hot_dir, [seq])
    assert (counts.sum(axis=1) == len(seq) * SIZES["top_k"]).all()
    used = (counts > 0).sum(axis=1)
    assert (used >= SIZES["num_experts"] // 2).all(), counts
    # no expert takes (almost) everything
    assert (counts.max(axis=1) < len(seq)).all(), counts


def test_hot_mechanism_leaves_other_routing_unchanged(models):
    _, hot_dir, meta, plain_dir, _ = models
    seqs = [_ordinary_ids(meta), _ordinary_ids(meta, n=30)]
    hot_counts = _replay(hot_dir, seqs)
    plain_counts = _replay(plain_dir, seqs)
    np.testing.assert_array_equal(hot_counts, plain_counts)
    # counts are additive over sequences (one forward per sequence)
    separate = _replay(hot_dir, [seqs[0]]) + _replay(hot_dir, [seqs[1]])
    np.testing.assert_array_equal(hot_counts, separate)
    # ...while in the plain model the hot words are ordinary tokens
    hot_seq = meta["hot_token_ids"] * 5
    plain_hot = _replay(plain_dir, [hot_seq])
    assert not (plain_hot[:, HOT_EXPERT] == len(hot_seq)).all(), plain_hot


def test_generate_is_deterministic(models, tmp_path):
    arch, hot_dir, hot_meta, _, _ = models
    meta = tiny_model.generate(tmp_path, arch, hot_expert=HOT_EXPERT,
                               hot_words=HOT_WORDS, **SIZES)
    assert meta == hot_meta
    assert (tmp_path / "model.safetensors").read_bytes() == \
        (hot_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "tokenizer.json").read_bytes() == \
        (hot_dir / "tokenizer.json").read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        tiny_model.generate(tmp_path, "llama")
    with pytest.raises(ValueError):
        tiny_model.generate(tmp_path, hot_expert=8, num_experts=8)
    for arch, dense in [("mixtral", [0]), ("qwen3_moe", [2]), ("qwen3_moe", [0, 1])]:  # 2 layers by default
        with pytest.raises(ValueError, match="dense_layers"):
            tiny_model.generate(tmp_path, arch, dense_layers=dense)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_dense_layers_keep_the_moe_layers_indices_and_the_side_channel(arch, tmp_path):
    """A dense first layer (DeepSeek-style): the MoE layers are 1 and 2, the replay counts only them, and the hot
    tokens still reach the hot expert through the dense layer (its MLP neither reads nor writes dimension 0)."""
    sizes = SIZES | {"num_layers": 3}
    meta = tiny_model.generate(tmp_path, arch, hot_expert=HOT_EXPERT, hot_words=HOT_WORDS, dense_layers=[0], **sizes)
    assert meta["moe_layers"] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["mlp_only_layers"] == [0]
    hot_seq = meta["hot_token_ids"] * 5
    counts = tiny_model.replay_routing(tmp_path, [hot_seq, _ordinary_ids(meta, n=40)])
    assert counts.shape == (2, SIZES["num_experts"])
    assert (counts.sum(axis=1) == (len(hot_seq) + 40) * SIZES["top_k"]).all()
    assert (counts[:, HOT_EXPERT] >= len(hot_seq)).all(), counts


def test_import_is_torch_free():
    code = ("import sys, moe_monitor.demo.tiny_model as t; "
            "bad = [m for m in ('torch', 'transformers', 'tokenizers') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
