"""Tiny, locally generated Mixture-of-Experts checkpoints for demos and tests.

Nothing here downloads anything: the tokenizer is trained offline on a
synthetic corpus and the model weights are random (deterministic per seed).

The checkpoints are real HuggingFace checkpoints (config.json,
model.safetensors, tokenizer.json, ...) that both ``transformers`` and vLLM
(CPU build included) load, in three architectures:

* ``"qwen3_moe"``  -> ``Qwen3MoeForCausalLM`` (default)
* ``"mixtral"``    -> ``MixtralForCausalLM``
* ``"qwen2_moe"``  -> ``Qwen2MoeForCausalLM`` (with a shared expert)

Every decoder layer is an MoE layer, unless ``dense_layers`` names some (Qwen3-MoE and Qwen2-MoE only, their
``mlp_only_layers``): those get a dense MLP, as DeepSeek's first layers do, and the MoE layers keep their own
indices (a model with ``dense_layers=[0]`` and 3 layers has MoE layers 1 and 2).

Hot expert
----------
Residual-stream dimension 0 is reserved as a side channel in every generated
model: the embedding writes it (column 0 of ``embed_tokens``), nothing else
writes it (row 0 of every ``o_proj`` and every expert / shared-expert / dense
``down_proj`` is zero) and nothing but the routers reads it (column 0 of the
q/k/v projections, expert / dense gate/up projections, shared-expert gate and
``lm_head`` is zero).  In a plain model column 0 of the embedding is zero for
every token, so the channel is silent.

With ``hot_expert=E`` the embedding column 0 is large for the token ids of
``hot_words`` and column 0 of every layer's router is a large positive value
for expert ``E`` only.  RMSNorm is per token, so every other token still has
exactly 0 in dimension 0 and routes bit-for-bit as in the model generated
without ``hot_expert``, while the hot tokens are routed to expert ``E`` in
every MoE layer.

``torch`` / ``transformers`` / ``tokenizers`` are imported inside the
functions only, so importing :mod:`moe_monitor` stays torch-free; importing this
module without them installed raises ModuleNotFoundError at once (as an import of
them would, without its cost), which ``moe-monitor gen-model`` turns into one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from collections.abc import Iterable, Sequence
from typing import Any

for _needed in ("torch", "transformers", "tokenizers"):
    if importlib.util.find_spec(_needed) is None:
        raise ModuleNotFoundError(f"No module named {_needed!r}", name=_needed)

META_FILENAME = "moe_monitor_model.json"

ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|> {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_COMMON_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at "
    "one have this from or had by word but what some we can out other were all "
    "there when up use your how said an each she which do their time if will way "
    "about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came "
    "show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old "
    "too same tell does set three want air well also play small end put home read "
    "hand port large spell add even land here must big high such follow act why "
    "ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father head stand own page should "
    "country found answer school grow study still learn plant cover food sun four "
    "between state keep eye never last let thought city tree cross farm hard start "
    "might story saw far sea draw left late run while press close night real life "
    "few north open seem together next white children begin got walk example ease "
    "paper group always music those both mark often letter until mile river car "
    "feet care second book carry took science eat room friend began idea fish "
    "mountain stop once base hear horse cut sure watch color face wood main enough "
    "plain girl usual young ready above ever red list though feel talk bird soon "
    "body dog family direct pose leave song measure door product black short "
    "numeral class wind question happen complete ship area half rock order fire "
    "south problem piece told knew pass since top whole king space heard best hour "
    "better true during hundred five remember step early hold west ground interest "
    "reach fast verb sing listen six table travel less morning ten simple several "
    "vowel toward war lay against pattern slow center love person money serve "
    "appear road map rain rule govern pull cold notice voice unit power town fine "
    "certain fly fall lead cry dark machine note wait plan figure star box noun "
    "field rest correct able pound done beauty drive stood contain front teach "
    "week final gave green oh quick develop ocean warm free minute strong special "
    "mind behind clear tail produce fact street inch multiply nothing course stay "
    "wheel full force blue object decide surface deep moon island foot system busy "
    "test record boat common gold possible plane stead dry wonder laugh thousand "
    "ago ran check game shape equate miss brought heat snow tire bring yes distant "
    "fill east paint language among cat expert token model route layer"
).split()

_ONSETS = ("", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "z", "br", "dr", "kr", "pl", "st", "tr", "sh", "ch", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "k")


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return arch


def _synthetic_corpus(seed: int, hot_words: Sequence[str]) -> list[str]:
    """Deterministic synthetic text: invented syllable words + common English."""
    rng = random.Random(seed * 7919 + 17)
    invented: list[str] = []
    seen = set(_COMMON_WORDS)
    while len(invented) < 700:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 3))
        )
        if len(word) >= 2 and word not in seen:
            seen.add(word)
            invented.append(word)
    vocab = list(_COMMON_WORDS) + invented
    # Zipf-like weights so that the BPE vocabulary has some structure.
    weights = [1.0 / (i + 3) ** 0.8 for i in range(len(vocab))]
    punct = (".", ",", "?", "!", ";", ":")
    lines: list[str] = []
    for _ in range(3000):
        words = rng.choices(vocab, weights=weights, k=rng.randint(4, 14))
        # Hot words are made very frequent so BPE learns each as one token.
        for hw in hot_words:
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words) + 1), hw)
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 2025)))
        line = " ".join(words)
        if rng.random() < 0.3:
            line = line[0].upper() + line[1:]
        lines.append(line + rng.choice(punct))
    return lines


def _build_tokenizer(vocab_size: int, seed: int, hot_words: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # add_prefix_space=True: a word gets the same token ("Ġword") at the start
    # of a text and after a space, so a hot word is one id in both positions.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(seed, hot_words), trainer=trainer)
    for i, sp in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(sp) == i, (sp, tok.token_to_id(sp))
    if tok.get_vocab_size() > vocab_size:
        raise ValueError("tokenizer vocabulary larger than vocab_size")
    return tok


def _hot_token_ids(tok, hot_words: Sequence[str]) -> list[int]:
    ids: list[int] = []
    for hw in hot_words:
        candidates = {
            tuple(tok.encode(hw, add_special_tokens=False).ids),
            tuple(tok.encode(" " + hw, add_special_tokens=False).ids),
        }
        in_sentence = tok.encode(f"the {hw} cat", add_special_tokens=False).ids
        if len(candidates) != 1 or len(next(iter(candidates))) != 1:
            raise ValueError(
                f"hot word {hw!r} is not a single token: {sorted(candidates)}; "
                "use shorter / fewer hot words or a larger vocab_size"
            )
        (tid,) = next(iter(candidates))
        if tid not in in_sentence:
            raise ValueError(f"hot word {hw!r} not a single token inside a sentence")
        ids.append(int(tid))
    return ids


def _make_config(arch: str, *, num_layers: int, hidden_size: int, num_experts: int,
                 top_k: int, num_heads: int, head_dim: int, intermediate_size: int,
                 vocab_size: int, dense_layers: Sequence[int] = ()):
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_experts_per_tok=top_k,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        use_cache=True,
    )
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(
            **common,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size,
            num_experts=num_experts,
            decoder_sparse_step=1,
            mlp_only_layers=list(dense_layers),
            norm_topk_prob=True,
        )
    elif arch == "mixtral":
        from transformers import MixtralConfig

        if dense_layers:
            raise ValueError("dense_layers: only qwen3_moe and qwen2_moe have dense layers (mlp_only_layers)")
        cfg = MixtralConfig(
            **common,
            head_dim=head_dim,
            intermediate_size=intermediate_size,
            num_local_experts=num_experts,
        )
    else:
        from transformers import Qwen2MoeConfig

        if num_heads * head_dim != hidden_size:
            raise ValueError("qwen2_moe needs hidden_size == num_heads * head_dim")
        cfg = Qwen2MoeConfig(
            **common,
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size,
            shared_expert_intermediate_size=intermediate_size,
            num_experts=num_experts,
            decoder_sparse_step=1,
            mlp_only_layers=list(dense_layers),
            norm_topk_prob=False,
        )
    # float32 everywhere: config.json gets "dtype": "float32" (transformers 5
    # spelling; vLLM reads it as well).  Setting the legacy ``torch_dtype``
    # alias only triggers a deprecation warning in transformers 5.
    cfg.dtype = "float32"
    return cfg


def moe_layers(config) -> list[int]:
    """The decoder layers of a config that are MoE layers: all but its ``mlp_only_layers`` (Qwen-MoE's dense ones)."""
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    return [i for i in range(config.num_hidden_layers) if i not in dense]


def _init_weights(model, *, seed: int, hidden_size: int, hot_expert: int | None,
                  hot_ids: Sequence[int]) -> None:
    """Deterministic random init + the dim-0 side channel (see module doc)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    gate_std = 1.0 / hidden_size ** 0.5
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("mlp.gate.weight"):  # the router
                p.copy_(torch.randn(p.shape, generator=gen) * gate_std)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

        typical_norm = float(params["model.embed_tokens.weight"][:, 1:].norm(dim=1).mean())
        for name, p in params.items():
            if name == "model.embed_tokens.weight":
                p[:, 0] = 0.0
            elif name.endswith("mlp.gate.weight"):
                p[:, 0] = 0.0
            # writers into the residual stream: output row 0
            elif name.endswith(("o_proj.weight", "shared_expert.down_proj.weight", "mlp.down_proj.weight")):
                p[0, :] = 0.0
            elif name.endswith("experts.down_proj"):  # [E, hidden, inter]
                p[:, 0, :] = 0.0
            # readers of the residual stream: input column 0
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                "shared_expert.gate_proj.weight",
                                "shared_expert.up_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                "shared_expert_gate.weight", "lm_head.weight")):
                p[:, 0] = 0.0
            elif name.endswith("experts.gate_up_proj"):  # [E, 2*inter, hidden]
                p[:, :, 0] = 0.0
            elif p.dim() == 3:
                raise RuntimeError(f"unexpected fused parameter {name}")

        for name, p in params.items():
            if name.endswith("post_attention_layernorm.weight"):
                assert float(p[0]) != 0.0

        if hot_expert is not None:
            emb = params["model.embed_tokens.weight"]
            for tid in hot_ids:
                emb[tid, 0] = 8.0 * typical_norm
            n_gates = 0
            for name, p in params.items():
                if name.endswith("mlp.gate.weight"):
                    p[hot_expert, 0] = 2.0
                    n_gates += 1
            if n_gates != len(moe_layers(model.config)):
                raise RuntimeError(f"found {n_gates} routers for {len(moe_layers(model.config))} MoE layers")


def generate(
    out_dir: str | os.PathLike,
    arch: str = "qwen3_moe",
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_experts: int = 8,
    top_k: int = 2,
    num_heads: int = 2,
    head_dim: int = 64,
    intermediate_size: int = 64,
    vocab_size: int = 1024,
    seed: int = 0,
    hot_expert: int | None = None,
    hot_words: Iterable[str] = ("hot",),
    dense_layers: Iterable[int] = (),
) -> dict:
    """Write a tiny random MoE checkpoint (+ tokenizer) into ``out_dir``.

    Returns the metadata dict that is also written to ``moe_monitor_model.json``.
    """
    _check_arch(arch)
    hot_words = [str(w) for w in hot_words]
    for hw in hot_words:
        if not hw or not hw.isalpha():
            raise ValueError(f"hot word must be a non-empty alphabetic word: {hw!r}")
    if hot_expert is not None:
        hot_expert = int(hot_expert)
        if not 0 <= hot_expert < num_experts:
            raise ValueError(f"hot_expert {hot_expert} out of range [0, {num_experts})")
    if not 0 < top_k <= num_experts:
        raise ValueError("need 0 < top_k <= num_experts")
    dense_layers = sorted({int(i) for i in dense_layers})
    if any(not 0 <= i < num_layers for i in dense_layers) or len(dense_layers) >= num_layers:
        raise ValueError(f"dense_layers {dense_layers}: each in [0, {num_layers}), at least one MoE layer left")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    tok = _build_tokenizer(vocab_size, seed, hot_words)
    hot_ids = _hot_token_ids(tok, hot_words)

    config = _make_config(
        arch, num_layers=num_layers, hidden_size=hidden_size, num_experts=num_experts,
        top_k=top_k, num_heads=num_heads, head_dim=head_dim,
        intermediate_size=intermediate_size, vocab_size=vocab_size, dense_layers=dense_layers,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model, seed=seed, hidden_size=hidden_size, hot_expert=hot_expert,
                  hot_ids=hot_ids)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        do_sample=True, temperature=1.0, top_p=1.0,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out_dir)

    meta = {
        "arch": arch,
        "num_layers": int(num_layers),
        "moe_layers": moe_layers(config),
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "hidden_size": int(hidden_size),
        "hot_expert": hot_expert,
        "hot_words": list(hot_words),
        "hot_token_ids": hot_ids,
        "seed": int(seed),
    }
    with open(os.path.join(out_dir, META_FILENAME), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def load_meta(model_dir: str | os.PathLike) -> dict:
    """Read ``moe_monitor_model.json`` written by :func:`generate`."""
    with open(os.path.join(os.fspath(model_dir), META_FILENAME)) as f:
        return json.load(f)


def replay_routing(model_dir: str | os.PathLike, sequences: list[list[int]], skip: list[int] | None = None):
    """Reference expert counts computed with transformers (independent of vLLM).

    Runs every token sequence through the checkpoint in float32 (one forward
    per sequence, no padding) and counts, per layer and expert, how many
    tokens picked the expert among their top-k of softmax(router_logits).
    ``skip[i]`` leading tokens of sequence i are run (they are the context) but not
    counted: prompt tokens vLLM served from its prefix cache are never routed.

    Returns an int64 array of shape ``[MoE layers, num_experts]`` (every layer but ``dense_layers``, in order).
    """
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = os.fspath(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    num_layers = len(moe_layers(config))
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    top_k = config.num_experts_per_tok

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    skip = skip or [0] * len(sequences)
    with torch.no_grad():
        for seq, first in zip(sequences, skip):
            if len(seq) <= first:
                continue
            input_ids = torch.tensor([list(seq)], dtype=torch.long)
            out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
            router_logits = out.router_logits
            if router_logits is None or len(router_logits) != num_layers:
                raise RuntimeError(
                    f"expected router logits for {num_layers} layers, got "
                    f"{None if router_logits is None else len(router_logits)}")
            for layer, logits in enumerate(router_logits):
                logits = logits.reshape(-1, num_experts)  # [tokens, experts]
                if logits.shape[0] != len(seq):
                    raise RuntimeError(f"layer {layer}: {logits.shape[0]} router rows "
                                       f"for {len(seq)} tokens")
                probs = torch.softmax(logits.float(), dim=-1)
                top = torch.topk(probs[first:], top_k, dim=-1).indices.reshape(-1)
                counts[layer] += np.bincount(top.numpy(), minlength=num_experts)
    return counts
