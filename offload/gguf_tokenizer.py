"""Build a Tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE, model "gpt2").

The GGUF stores the Hugging Face vocabulary (tokens in byte-level form, merges as "a b"), a type
per token, and the name of the pre-tokenizer (`tokenizer.ggml.pre`). We rebuild the
`tokenizers` pipeline that the original tokenizer.json used: the split regexes per pre-tokenizer
(the same ones llama.cpp's llama-vocab.cpp mirrors), then the byte-level mapping and BPE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from offload.errors import ConfigError
from offload.tokenizer import Tokenizer

# GGUF token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own regex
# Written with escapes: these character ranges must not pass through Unicode normalisation.
_DEEPSEEK_LLM = [
    '[\r\n]',
    '\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
    '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
    '\\s+$',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}+',
]
_DEEPSEEK_CODER = [
    '[\r\n]',
    '\\s?\\p{L}+',
    '\\s?\\p{P}+',
    '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+',
    '\\p{N}',
]
_DEEPSEEK_V3 = [
    '\\p{N}{1,3}',
    '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+',
    '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
]

# pre name -> (split regexes, or None for GPT-2's built-in ByteLevel regex; NFC; ignore_merges; default add_bos)
_PRE: dict[str, tuple[list[str] | None, bool, bool, bool]] = {
    "gpt-2": (None, False, False, False),
    "smollm": ([r"\p{N}", _GPT2], False, False, False),  # SmolLM / SmolLM2: each digit alone, then GPT-2's
    "qwen2": ([_QWEN2], True, False, False),
    "deepseek-r1-qwen": ([_QWEN2], True, False, False),
    "qwen35": ([_QWEN35], False, False, False),
    "llama-bpe": ([_LLAMA3], False, True, True),
    "llama3": ([_LLAMA3], False, True, True),
    "llama-v3": ([_LLAMA3], False, True, True),
    "deepseek-llm": (_DEEPSEEK_LLM, False, False, False),
    "deepseek-coder": (_DEEPSEEK_CODER, False, False, False),
    "deepseek-v3": (_DEEPSEEK_V3, False, False, False),
    "chatglm-bpe": ([_LLAMA3], False, False, False),
    "glm4": ([_LLAMA3], False, True, False),
    "glm5": ([_LLAMA3], False, True, False),
}

# Control tokens llama.cpp treats as end of generation whatever the metadata says.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|eom_id|>", "<|end_of_text|>",
              "<｜end▁of▁sentence｜>")


def _get(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    return metadata.get(key, default)


def _as_list(value: Any, key: str) -> list:
    if value is None:
        raise ConfigError(f"GGUF metadata: {key} is missing")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"GGUF metadata: {key} must be an array, got {type(value).__name__}")
    return list(value)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """["a b", ...] -> [("a", "b"), ...]: every merge must be two tokens separated by one space."""
    try:
        joined = "\x00".join(merges)
    except TypeError:  # not all strings: the slow path below
        joined = None
    if joined is not None:
        # all at once: in the NUL-joined text the separators must alternate space, NUL, space, ...
        seps = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
        seps = seps[(seps == 0x20) | (seps == 0)]
        if len(seps) == 2 * len(merges) - 1 and (seps[0::2] == 0x20).all() and not seps[1::2].any():
            parts = iter(joined.replace("\x00", " ").split(" "))
            return list(zip(parts, parts))
    pairs = []  # the slow path names the first bad entry
    for i, m in enumerate(merges):
        parts = str(m).split(" ")
        if len(parts) != 2:
            raise ConfigError(f"GGUF metadata: tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _pre_tokenizer(splits: list[str] | None):
    from tokenizers import Regex, pre_tokenizers

    if splits is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in splits]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any]) -> Tokenizer:
    """A Tokenizer equivalent to the one the GGUF was converted from (byte-level BPE only)."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as Backend

    model = _get(metadata, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"GGUF metadata: tokenizer.ggml.model = {model!r} is not supported (expected 'gpt2', "
                          "byte-level BPE)")
    pre = _get(metadata, "tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise ConfigError(f"GGUF metadata: tokenizer.ggml.pre = {pre!r} is not supported (known: {sorted(_PRE)})")
    splits, nfc, ignore_merges, default_add_bos = _PRE[pre]

    tokens = _as_list(_get(metadata, "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
    if set(map(type, tokens)) - {str}:
        tokens = [str(t) for t in tokens]
    types = _get(metadata, "tokenizer.ggml.token_type")
    if types is None:
        types = np.full(len(tokens), NORMAL, dtype=np.int64)
    elif isinstance(types, np.ndarray) and types.ndim == 1 and types.dtype.kind in "iu":
        types = types.astype(np.int64)
    else:
        try:
            types = np.asarray(_as_list(types, "tokenizer.ggml.token_type"), dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError("GGUF metadata: tokenizer.ggml.token_type must be an array of integers") from None
    if len(types) != len(tokens):
        raise ConfigError(f"GGUF metadata: tokenizer.ggml.token_type has {len(types)} entries, "
                          f"expected {len(tokens)} (one per token)")
    merges = _merge_pairs(_as_list(_get(metadata, "tokenizer.ggml.merges"), "tokenizer.ggml.merges"))

    # duplicates (padding entries) keep their first id: the reversed walk writes the lowest id last
    vocab: dict[str, int] = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    try:
        backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                     byte_fallback=False, ignore_merges=ignore_merges))
    except Exception as exc:  # the tokenizers library raises a bare Exception for a merge of unknown tokens
        raise ConfigError(f"GGUF metadata: tokenizer.ggml.merges is not a BPE merge list of tokenizer.ggml.tokens ({exc})") from None
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()

    # Control tokens are HF "special" tokens; user-defined ones are added tokens matched in plain text.
    added = []
    for i in np.flatnonzero((types == CONTROL) | (types == USER_DEFINED)).tolist():
        if vocab[tokens[i]] == i:
            added.append(AddedToken(tokens[i], special=bool(types[i] == CONTROL), normalized=False))
    backend.add_tokens(added)

    def token_at(key: str) -> str | None:
        i = _get(metadata, key)
        if i is None or not 0 <= int(i) < len(tokens):
            return None
        return tokens[int(i)]

    bos, eos = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    if pre in ("chatglm-bpe", "glm4", "glm5"):
        bos = None  # llama.cpp drops GLM's BOS: the chat template writes [gMASK]<sop> itself
    add_bos = bool(_get(metadata, "tokenizer.ggml.add_bos_token", default_add_bos)) and bos is not None
    add_eos = bool(_get(metadata, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
    specials = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos and eos != bos else [])
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials),
    ])

    special = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "sep_token": token_at("tokenizer.ggml.seperator_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "mask_token": token_at("tokenizer.ggml.mask_token_id"),
    }
    eos_ids = [int(_get(metadata, k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                  "tokenizer.ggml.eom_token_id") if _get(metadata, k) is not None]
    eos_ids += [vocab[t] for t in _EOG_TEXTS if t in vocab and int(types[vocab[t]]) == CONTROL]

    templates = {}
    if isinstance(_get(metadata, "tokenizer.chat_template"), str):
        templates["default"] = _get(metadata, "tokenizer.chat_template")
    names = _get(metadata, "tokenizer.chat_templates")
    for name in (_as_list(names, "tokenizer.chat_templates") if names is not None else []):
        src = _get(metadata, f"tokenizer.chat_template.{name}")
        if isinstance(src, str):
            templates[str(name)] = src
    return Tokenizer(backend, special_tokens=special, chat_templates=templates, extra_eos_ids=eos_ids,
                     add_bos_token=add_bos, name=f"GGUF tokenizer ({pre})")

