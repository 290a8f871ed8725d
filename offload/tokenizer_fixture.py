"""A tiny, deterministic byte-level BPE tokenizer directory for tests (no download, < 2 s).

`make_test_tokenizer_dir(path)` trains a ~1000-token byte-level BPE on a built-in multilingual
text with the `tokenizers` library and writes tokenizer.json, tokenizer_config.json (with a
simple Qwen-style chat template that handles tools and enable_thinking) and generation_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

# GLM-style and Qwen-style specials. Ids are assigned in this order after the byte alphabet is
# trained, so every id here is stable across runs.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|im_start|>",
    "<|im_end|>",
]
# Not "special" in HF's sense (they are kept by decode(skip_special_tokens=True)), like Qwen3.
NON_SPECIAL_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

# GPT-4o / Qwen2 style split: letters runs, single digits, punctuation runs, whitespace.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few experts.
Offloading keeps the attention on the GPU and the routed experts in system memory, computed on the CPU.
def generate(prompt, max_new_tokens=16):
    ids = tokenizer.encode(prompt)
    for _ in range(max_new_tokens):
        logits = model(ids)
        ids.append(int(logits.argmax()))
    return tokenizer.decode(ids)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 3.14159 2026-11-22 100% $19.99 #tag @user {"key": [1, 2, 3]}
The weather today is sunny with a light breeze. What time is it in Paris? It is 9 o'clock.
I can't believe it's already November; we'll see what they've done. You're right, I'm sure.
大型混合专家模型在一台工作站上运行。路由器为每个词元选择八个专家，其余专家留在内存中。
今天天气很好，我们去公园散步吧。你好，世界！请把这段文字翻译成英文。
東京は日本の首都です。今日はいい天気ですね。ありがとうございます。こんにちは、世界！
Привет, мир! Сегодня хорошая погода. Модель работает на процессоре и видеокарте.
Bonjour le monde ! Ça va très bien, merci. Où est la bibliothèque ? Déjà vu, naïve façade.
Hallo Welt! Größe, Straße, Übung, schön. Ein Modell mit vielen Experten läuft schnell.
안녕하세요 세계! 오늘 날씨가 좋네요. مرحبا بالعالم! नमस्ते दुनिया! Γειά σου Κόσμε!
Emoji: 😀 😃 🚀 🎉 👍🏽 ❤️ 🇫🇷 👨‍👩‍👧 ✅ 🔥 — and symbols: € £ ¥ © ® ™ ° ± × ÷ → ← ∞ ≠ ≤ ≥.
<think>Let me reason step by step about the question.</think>The answer is 42.
<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
"""

# Qwen3-like template: system + tools block, tool calls, tool responses, optional thinking.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions. Function signatures:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\nFor each call return <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{ raise_exception('system message must come first') }}{% endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if message.reasoning_content %}
            {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- message.content or '' }}
        {%- for tc in message.tool_calls or [] %}
            {%- set f = tc.function if tc.function is defined else tc %}
            {{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' }}
            {{- f.arguments if f.arguments is string else f.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('unknown role: ' ~ message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def _train_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeat the corpus a little so merges get counts; training itself is deterministic.
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED])
    return tok


def make_test_tokenizer_dir(path: str | Path) -> Path:
    """Write a deterministic tiny tokenizer (tokenizer.json, tokenizer_config.json,
    generation_config.json) into `path` (created if needed) and return it as a Path.

    Vocabulary ~1000 byte-level BPE tokens plus GLM specials ([gMASK] <sop> <|system|> <|user|>
    <|assistant|> <|observation|> <|endoftext|>) and Qwen specials (<|im_start|> <|im_end|>
    <think> </think>). No BOS is added (Qwen / GLM style); eos = <|im_end|> and <|endoftext|>.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED}
    added = {
        str(ids[t]): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    gen = {
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
    }
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def llama_cpp_sdist(cache: str | Path | None = None) -> Path:
    """The llama-cpp-python sdist tarball of the installed version (any version if none is installed),
    downloaded once from PyPI into `cache` (default ~/.cache/offload-tests/). It ships llama.cpp's
    converter, gguf-py and vocab test files. RuntimeError when PyPI cannot be reached and nothing is cached."""
    import subprocess
    import sys

    cache = Path(cache or Path.home() / ".cache" / "offload-tests")
    cache.mkdir(parents=True, exist_ok=True)
    try:  # same version as the installed reference, so its files and the library agree
        from importlib.metadata import version

        ver = version("llama-cpp-python")
    except ImportError:  # PackageNotFoundError is an ImportError
        ver = None
    pattern = f"llama_cpp_python-{ver}.tar.gz" if ver else "llama_cpp_python-*.tar.gz"
    found = sorted(cache.glob(pattern))
    if not found:
        spec = f"llama-cpp-python=={ver}" if ver else "llama-cpp-python"
        # --no-binary for this package only: with :all: pip also builds every build dependency of the sdist
        # from source to read its metadata (minutes on a fresh machine; seconds with their wheels)
        cmd = [sys.executable, "-P", "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
               spec, "-d", str(cache), "--quiet"]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        found = sorted(cache.glob(pattern))
        if r.returncode != 0 or not found:
            raise RuntimeError(f"pip download llama-cpp-python sdist failed: {r.stderr.strip()[-500:]}")
    return found[-1]


def llama_cpp_models_dir(cache: str | Path | None = None) -> Path:
    """llama.cpp's `models/` folder (ggml-vocab-*.gguf with .inp/.out cases, templates/*.jinja), taken from
    the llama-cpp-python sdist on PyPI (`pip download --no-binary llama-cpp-python`) and cached under
    ~/.cache/offload-tests/. Raises RuntimeError when PyPI cannot be reached and nothing is cached."""
    import shutil
    import tarfile
    import tempfile

    cache = Path(cache or Path.home() / ".cache" / "offload-tests")
    out = cache / "llama.cpp-models"
    if (out / ".complete").is_file():
        return out
    tarball = llama_cpp_sdist(cache)
    # Extract into a private folder, then rename: two test runs at once must not see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix="llama.cpp-models.", dir=cache))
    with tarfile.open(tarball) as tar:
        for m in tar.getmembers():
            parts = m.name.split("/")
            # <pkg>/vendor/llama.cpp/models/<file> or .../models/templates/<file>
            if m.isfile() and len(parts) >= 5 and parts[1:4] == ["vendor", "llama.cpp", "models"]:
                rel = Path(*parts[4:])
                if rel.parts[0].startswith("ggml-vocab-") or rel.parts[0] == "templates":
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src:
                        dest.write_bytes(src.read())
    (tmp / ".complete").write_text(tarball.name)
    if (out / ".complete").is_file():  # another run finished first
        shutil.rmtree(tmp)
        return out
    if out.exists():
        shutil.rmtree(out)
    try:
        tmp.rename(out)
    except OSError:  # lost the race to a concurrent run
        shutil.rmtree(tmp, ignore_errors=True)
    return out
