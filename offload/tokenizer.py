"""Text <-> token ids for a Hugging Face checkpoint directory, plus its chat template.

Backed by the `tokenizers` library reading tokenizer.json, so `encode` gives the ids transformers'
AutoTokenizer gives for the same directory (BOS / EOS come from tokenizer.json's post-processor,
as transformers 5 does when a tokenizer.json is present).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from offload.errors import ConfigError, RequestError

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as plain strings or as serialised AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the chat and the stop logic need: special tokens,
    EOS ids (tokenizer + generation_config), BOS, and the chat template(s)."""

    def __init__(
        self,
        backend,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        extra_eos_ids: list[int] | None = None,
        add_bos_token: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        name: str = "tokenizer",
    ):
        self.backend = backend  # tokenizers.Tokenizer
        self.name = name
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates = dict(chat_templates or {})
        self.add_bos_token = add_bos_token
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._added = backend.get_added_tokens_decoder()  # id -> AddedToken
        eos = []
        for i in list(extra_eos_ids or []) + [self.token_to_id(self.special_tokens.get("eos_token"))]:
            if i is not None and i not in eos:
                eos.append(int(i))
        self._eos_ids = eos

    # ---- construction

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja (and additional_chat_templates/),
        and generation_config.json's eos_token_id from a checkpoint directory."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"{tok_file}: not found (offload needs a tokenizer.json, the `tokenizers` format)")
        _read_json(tok_file)  # a clear message for bad JSON before the Rust parser's
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 -- the Rust side raises a plain Exception
            raise ConfigError(f"{tok_file}: not a valid tokenizers file: {str(e).splitlines()[0]}") from None

        cfg_file = path / "tokenizer_config.json"
        cfg = _read_json(cfg_file) if cfg_file.is_file() else {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{cfg_file}: expected a JSON object")
        special = {k: _token_text(cfg.get(k)) for k in _NAMED_SPECIALS}
        # Tokens listed only in tokenizer_config's added_tokens_decoder (rare) are added as HF does.
        from tokenizers import AddedToken

        known = backend.get_vocab(with_added_tokens=True)
        extra = []
        for entry in (cfg.get("added_tokens_decoder") or {}).values():
            text = _token_text(entry)
            if text is not None and text not in known:
                extra.append(AddedToken(text, special=bool(entry.get("special", True)), normalized=False))
        for v in special.values():
            if v is not None and v not in known and all(v != t.content for t in extra):
                extra.append(AddedToken(v, special=True, normalized=False))
        if extra:
            backend.add_tokens(extra)

        templates = cls._read_templates(path, cfg, cfg_file)

        eos_ids: list[int] = []
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = _read_json(gen_file)
            e = gen.get("eos_token_id") if isinstance(gen, dict) else None
            if isinstance(e, int):
                eos_ids = [e]
            elif isinstance(e, list) and all(isinstance(x, int) for x in e):
                eos_ids = list(e)
            elif e is not None:
                raise ConfigError(f"{gen_file}: eos_token_id must be an int or a list of ints, got {e!r}")
        return cls(
            backend,
            special_tokens=special,
            chat_templates=templates,
            extra_eos_ids=eos_ids,
            add_bos_token=cfg.get("add_bos_token"),
            clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
            name=str(path),
        )

    @staticmethod
    def _read_templates(path: Path, cfg: dict, cfg_file: Path) -> dict[str, str]:
        templates: dict[str, str] = {}
        ct = cfg.get("chat_template")
        if isinstance(ct, str):
            templates["default"] = ct
        elif isinstance(ct, list):
            for item in ct:
                if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)):
                    raise ConfigError(f"{cfg_file}: chat_template list entries need 'name' and 'template' strings")
                templates[item["name"]] = item["template"]
        elif ct is not None:
            raise ConfigError(f"{cfg_file}: chat_template must be a string or a list of named templates")
        # Separate files win over tokenizer_config.json entries, as in transformers.
        legacy = path / "chat_template.json"
        if legacy.is_file():
            data = _read_json(legacy)
            if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
                templates["default"] = data["chat_template"]
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        return templates

    # ---- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (len() of the transformers tokenizer)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("bos_token"))

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("eos_token"))

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self.special_tokens.get("pad_token"))

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: generation_config.json's eos_token_id(s), then the tokenizer's eos."""
        return list(self._eos_ids)

    @property
    def special_token_ids(self) -> set[int]:
        """Ids of added tokens marked special (the ones decode(skip_special_tokens=True) drops)."""
        return {i for i, t in self._added.items() if t.special}

    # ---- text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"prompt: expected a string, got {type(text).__name__}")
        # encode_batch releases the GIL and encode holds it: a 7.5 MB prompt froze every other thread of
        # `offload serve` (its /health included) for the 17 s it took to tokenise
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            # transformers applies this WordPiece-era clean-up to non-BPE models only.
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    # ---- chat

    def chat_template(self, name: str | None = None, tools: list | None = None) -> str:
        """The template source: `name` if given, else "tool_use" when tools are passed and it exists, else "default"."""
        if not self.chat_templates:
            raise ConfigError(f"{self.name}: no chat template (tokenizer_config.json chat_template or chat_template.jinja)")
        if name is not None:
            if name in self.chat_templates:
                return self.chat_templates[name]
            raise RequestError(f"chat_template: unknown name {name!r}, have {sorted(self.chat_templates)}")
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise RequestError(f"chat_template: several templates {sorted(self.chat_templates)} and none named 'default'")

    def apply_chat_template(
        self,
        messages: list,
        tools: list | None = None,
        add_generation_prompt: bool = True,
        documents: list | None = None,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render the conversation to the prompt text (transformers' apply_chat_template(tokenize=False)).

        chat_template: a template name from the checkpoint, or a template source string."""
        if chat_template is not None and ("{{" in chat_template or "{%" in chat_template):
            source = chat_template
        else:
            source = self.chat_template(chat_template, tools)
        from offload.chat_template import render_chat_template  # jinja2: imported on the first chat only

        return render_chat_template(
            source, messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens, **template_kwargs,
        )

    def encode_chat(self, messages: list, tools: list | None = None, add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Render then encode without adding special tokens: the template writes BOS itself when the model
        wants one (transformers' apply_chat_template(tokenize=True) does the same)."""
        text = self.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
