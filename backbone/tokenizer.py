"""The model's tokenizer: `tokenizer.json` through the `tokenizers` library, with the special
tokens, BOS/EOS rules and chat template that Hugging Face keeps beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from backbone.chat_template import Message, render_chat_template
from backbone.errors import ModelLoadError

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        eos = list(eos_token_ids or [])
        if self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            eos.insert(0, self.token_to_id(self.eos_token))
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))  # ordered, no repeats

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Read `tokenizer.json` and, where present, tokenizer_config.json, special_tokens_map.json,
        chat_template.jinja, generation_config.json and config.json (the last two for EOS ids)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: the model folder needs a tokenizer.json (fast tokenizer)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{path} cannot be read by `tokenizers` ({err}); the file is corrupt") from None
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        special_tokens = {
            name: _token_content(config.get(name, special_map.get(name)))
            for name in NAMED_SPECIAL_TOKENS
            if config.get(name, special_map.get(name)) is not None
        }
        # BOS/EOS are added by tokenizer.json's post-processor alone, as transformers>=5 does: it
        # ignores tokenizer_config's add_bos_token for tokenizers loaded from tokenizer.json.
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=_chat_template(folder, config),
            eos_token_ids=_eos_ids(_read_json(folder / "generation_config.json"))
            + _eos_ids(_read_json(folder / "config.json")),
        )

    # Encoding and decoding.

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS exactly where the HF tokenizer adds them.
        Special-token text in `text` (e.g. `<|im_start|>` from a rendered chat) becomes its one id."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # Special tokens.

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def pad_token_id(self) -> int | None:
        pad = self.special_tokens.get("pad_token")
        return None if pad is None else self.token_to_id(pad)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # Chat.

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for a conversation, as `transformers`' apply_chat_template(tokenize=False).
        Encode it with `encode(prompt)` (no added BOS: templates write their own)."""
        if not self.chat_template:
            raise ModelLoadError(
                "this model has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "use a plain prompt instead of chat messages"
            )
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **extra,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from None
    return value if isinstance(value, dict) else {}


def _token_content(value: Any) -> str:
    """Token text from either spelling: "<s>" or an AddedToken dict {"content": "<s>", ...}."""
    return value["content"] if isinstance(value, dict) else str(value)


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    # transformers>=4.43 may save the template as its own file; it wins over the config key.
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template


def _eos_ids(config: dict[str, Any]) -> list[int]:
    eos = config.get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
