"""Convert a Llama- or Qwen2-architecture GGUF file (llama.cpp's format) into a Hugging Face model folder:
config.json, model.safetensors (fp32), tokenizer.json, tokenizer_config.json (with the chat
template) and generation_config.json.

Three things differ from a Hugging Face checkpoint and are undone here:
- tensor names (`blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight`);
- quantization (Q4_1, Q8_0, ... are dequantized to fp32 with the `gguf` package);
- llama.cpp's converter permutes the rows of q_proj and k_proj of Llama models from HF's rotary
  layout (halves) to its own (interleaved pairs); we apply the inverse permutation. (Its Qwen2
  converter leaves them as they are.)
The tokenizer is stored as metadata (tokens, merges, token types); we rebuild the byte-level BPE
tokenizer the way transformers' GGUF loader does.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from backbone.atomic_folder import replace_folder
from backbone.errors import ModelLoadError, UnsupportedArchitectureError

# llama.cpp names -> Hugging Face names; `{i}` is the block index.
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF architecture -> HF architecture. llama.cpp also files Mistral, SmolLM and TinyLlama under "llama".
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROTARY_PERMUTED_ARCHITECTURES = ("llama",)  # whose q/k rows llama.cpp's converter permutes

# llama.cpp token types (gguf.TokenType): CONTROL tokens are special, USER_DEFINED are added tokens.
CONTROL_TOKEN, USER_DEFINED_TOKEN = 3, 4

# How llama.cpp's `tokenizer.ggml.pre` names split text before BPE, as in transformers' GGUF loader;
# a name not listed uses GPT-2's split (the ByteLevel pre-tokenizer's own regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")},
}

_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def import_gguf(gguf_path: str | Path, output_folder: str | Path, *, progress: bool = True) -> Path:
    """Write the HF folder for `gguf_path` to `output_folder` (replacing it) and return the folder.

    The folder appears complete or not at all: it is written under a temporary name beside the
    destination and renamed into place.
    """
    from gguf import GGUFReader

    gguf_path, output_folder = Path(gguf_path), Path(output_folder)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as err:  # the reader raises ValueError/IndexError/... on a damaged file
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file ({type(err).__name__}: {err})") from None
    metadata = read_metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama, Mistral, SmolLM, TinyLlama, Qwen2)"
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    config = hf_config(metadata, tensor_names, gguf_path)
    tokenizer_files = build_tokenizer_files(metadata, config)
    state = read_tensors(reader, config, progress=progress, source=gguf_path)

    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_folder.name}.", dir=output_folder.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, content in tokenizer_files.items():
            (staging / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        # mkdtemp makes a private folder; the model folder is as readable as any other.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        replace_folder(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_folder


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/values as Python values (strings, numbers, lists); the tensors are left out."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata


def hf_config(metadata: dict[str, Any], tensor_names: set[str], source: Path) -> dict[str, Any]:
    """The config.json of the model the GGUF metadata describes."""
    arch = metadata["general.architecture"]

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{name}; the file is incomplete")
        return value

    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedArchitectureError(
            f"{source}: the GGUF carries `rope_freqs` (Llama 3.1-style rope scaling), which the importer does not "
            "reconstruct; convert the original Hugging Face folder instead"
        )
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // heads)
    rotary_dims = metadata.get(f"{arch}.rope.dimension_count")
    if rotary_dims is not None and int(rotary_dims) != head_dim:
        raise UnsupportedArchitectureError(
            f"{source}: partial rotary embedding ({rotary_dims} of {head_dim} dims) is not supported"
        )
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(metadata.get(f"{arch}.vocab_size") or len(tokens) or 0),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(metadata.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": _shortest_float32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float32(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        # Qwen2 always biases q/k/v; a Llama file with biases has `attention_bias`.
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise UnsupportedArchitectureError(f"{source}: rope scaling {scaling!r} is not supported; supported: linear")
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")):
        value = metadata.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[name] = int(value)
    return config


def read_tensors(reader: Any, config: dict[str, Any], *, progress: bool, source: Path) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its HF name, q/k rows restored to HF's layout."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress):
        name = hf_tensor_name(tensor.name, source)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        try:
            # A copy: F32 tensors come back as read-only views of the memory-mapped file.
            values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        except NotImplementedError:
            raise ModelLoadError(
                f"{source}: tensor {tensor.name} uses {tensor.tensor_type.name}, which the gguf package cannot "
                "dequantize; use a GGUF quantized as F32/F16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K or similar"
            ) from None
        if config["model_type"] in ROTARY_PERMUTED_ARCHITECTURES:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                values = unpermute_rows(values, config["num_attention_heads"])
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                values = unpermute_rows(values, config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.ascontiguousarray(values))
    embed = state.get("model.embed_tokens.weight")
    if embed is None:
        raise ModelLoadError(f"{source}: the GGUF has no token_embd tensor; the file is incomplete")
    config["vocab_size"] = int(embed.shape[0])  # the embedding is the authority; metadata may omit it
    return state


def hf_tensor_name(gguf_name: str, source: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[base]}.{suffix}"
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    raise UnsupportedArchitectureError(
        f"{source}: GGUF tensor {gguf_name!r} has no Llama counterpart; the file is not a plain Llama model"
    )


def unpermute_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: per head, rows (pairs interleaved) -> (halves)."""
    rows = values.shape[0]
    head_half = rows // num_heads // 2
    return values.reshape(num_heads, head_half, 2, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def permute_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `permute(w, n_head)` (HF rotary halves -> interleaved pairs), for writing GGUFs."""
    rows = values.shape[0]
    head_half = rows // num_heads // 2
    return values.reshape(num_heads, 2, head_half, *values.shape[1:]).swapaxes(1, 2).reshape(values.shape)


def _shortest_float32(value: Any) -> float:
    """GGUF stores floats as float32; 1e-5 reads back as 9.999999747378752e-06. numpy prints the
    shortest decimal that round-trips through float32, which is the number the model was made with."""
    return float(str(np.float32(value)))


def build_tokenizer_files(metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer.json, tokenizer_config.json and generation_config.json from GGUF tokenizer metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedArchitectureError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [])
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Every real byte-level token is spelled in the byte alphabet; respell any that is not.
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(
        models.BPE(
            vocab={token: index for index, token in enumerate(spelled)},
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it would
    # grow the vocabulary past the embedding, so it is skipped (as transformers does).
    backend.add_special_tokens(
        [
            AddedToken(token, normalized=False, special=True)
            for token, respelled, token_type in zip(tokens, spelled, token_types)
            if token_type == CONTROL_TOKEN and token == respelled
        ]
    )
    backend.add_tokens(
        [
            AddedToken(token, normalized=False, special=False)
            for token, token_type in zip(spelled, token_types)
            if token_type == USER_DEFINED_TOKEN
        ]
    )

    def token_of(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    special = {
        "bos_token": token_of("bos_token_id"),
        "eos_token": token_of("eos_token_id"),
        "unk_token": token_of("unknown_token_id"),
        "pad_token": token_of("padding_token_id"),
    }
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    single = (f"{special['bos_token']}:0 " if add_bos else "") + "$A:0" + (f" {special['eos_token']}:0" if add_eos else "")
    pair = single + (f" {special['bos_token']}:1" if add_bos else "") + " $B:1" + (f" {special['eos_token']}:1" if add_eos else "")
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(special[name], backend.token_to_id(special[name])) for name, on in (("bos_token", add_bos), ("eos_token", add_eos)) if on],
    )
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        **{name: token for name, token in special.items() if token is not None},
    }
    if metadata.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    generation_config = {
        key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config
    }
    return {
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": generation_config,
    }


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    printable += list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars
