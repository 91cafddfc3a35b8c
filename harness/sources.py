"""Where weights and tokenizer come from: the hub, a local folder, the offline random-init path, or `tiny`.

The offline path builds the exact architecture from the real config.json kept in configs/, saves it once with
random weights and loads it through the same `from_pretrained` as pretrained weights.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from common import content_hash, corpus_tokenizer
from harness.cli import REPO, InputError

CONFIGS = REPO / "configs"


def config_file(model_id: str) -> Path:
    return CONFIGS / (model_id.replace("/", "--") + ".json")


def tiny_config(model_id: str, vocab_size: int):
    """A 2-layer, narrow model of the same architecture as `model_id` (for CPU smoke runs)."""
    from transformers import AutoConfig

    base = json.loads(config_file(model_id).read_text())
    if base["model_type"] == "opt":
        base.update(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                    max_position_embeddings=1024)
    elif base["model_type"] == "gpt_neo":
        base.update(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    attention_layers=["global", "local"], window_size=16, max_position_embeddings=1024)
    base.update(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return AutoConfig.for_model(**base)


HUB_PROBE_SECONDS = 2.0


def hub_reachable(model_id: str) -> tuple[bool, str]:
    """(True, '') when `model_id`'s config can be had from the local cache or the hub; else (False, why).

    Where the hub does not answer, its client retries a download 5 times, 1 to 8 s apart, each try waiting up to
    10 s: half a minute (through a dead proxy) to minutes (an endpoint that accepts and never answers). So one
    metadata request first, without retries, through the same client (its proxy, token and endpoint): an offline
    start is decided within HUB_PROBE_SECONDS or so. An id the answering hub does not know is an InputError.
    """
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        readable_config(model_id, local_files_only=True)
        return True, ""
    except OSError:
        pass
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(flag, "0").lower() in ("1", "true", "yes", "on"):
            return False, f"{flag} is set"
    endpoint = os.environ.get("HF_ENDPOINT")  # None: the client's default; read now, as the flags above are
    try:
        HfApi(endpoint=endpoint).model_info(model_id, timeout=HUB_PROBE_SECONDS)
    except RepositoryNotFoundError:  # also a private repo without access: the hub answers alike
        raise InputError(f"model {model_id}: the hub does not know it (check the id, log in for a private model, "
                         f"or pass a local path)") from None
    except HFValidationError:
        raise InputError(f"model {model_id}: no such folder, and not a hub id (namespace/name)") from None
    except (httpx.HTTPError, OSError) as e:  # no connection, a timeout, a proxy or server error
        return False, f"no answer from {endpoint or 'the hub'}: {e}"
    try:
        readable_config(model_id)
        return True, ""
    except OSError as e:  # transformers wraps the hub's errors in OSError (a gated model, say)
        return False, str(e).splitlines()[0]


def readable_config(model: str, **kwargs):
    """AutoConfig.from_pretrained(model); a model_type this transformers does not know is an InputError.

    OSError (not found, not cached, a hub error) is left to the caller."""
    import transformers
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, **kwargs)
    except HFValidationError:  # a ValueError too: not a hub id, which the caller reports
        raise OSError(f"{model} is not a hub id") from None
    except (ValueError, KeyError) as e:  # transformers' answer to an unknown or missing model_type
        local = Path(model) / "config.json"
        kind = json.loads(local.read_text()).get("model_type") if local.exists() else None
        why = (f"transformers {transformers.__version__} does not know its model_type {kind!r} (a newer one may; "
               f"models with their own code, trust_remote_code, are not run)" if kind else
               f"transformers cannot read its config ({str(e).splitlines()[0]})")
        raise InputError(f"model {model}: {why}") from None


def folder_config(folder: Path):
    """The config of a local model folder; InputError where config.json cannot be read."""
    try:
        return readable_config(str(folder))
    except OSError as e:  # config.json is not valid JSON, or not readable
        raise InputError(f"model {folder}: config.json cannot be read ({str(e).splitlines()[0]})") from None


def refuse_untrainable(model: str, config) -> None:
    """InputError for a model these scripts cannot train as a causal LM: an encoder-decoder (T5, BART), a model
    type with no causal-LM class in transformers, or a bidirectional encoder (BERT, RoBERTa)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"model {model}: {kind} is an encoder-decoder model; these scripts train decoder-only "
                         f"causal LMs")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"model {model}: transformers has no causal-LM class for model type {kind}")
    # BERT and RoBERTa have a causal-LM class too (transformers maps them to both), but it attends both ways unless
    # the config says is_decoder: a masked-LM family without it is an encoder, and would see the tokens it predicts
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise InputError(f"model {model}: {kind} is a bidirectional encoder (its config does not say is_decoder); "
                         f"these scripts train decoder-only causal LMs")


def random_init_checkpoint(config, seed: int, cache_dir: Path) -> Path:
    """Save a randomly initialized model of `config` once and return its folder, loadable by `from_pretrained`.

    Loading through `from_pretrained` (not `from_config`) keeps one code path for pretrained and random weights,
    so 4-bit quantization runs the real loading code.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(cache_dir) / "random-init" / f"{config.model_type}-{content_hash(config.to_json_string(), seed)}"
    if not (folder / "config.json").exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"  # initializing 1.3B weights is much faster there
        # forked random state: the run that builds the checkpoint must draw its LoRA adapters, dropout and data
        # order from the same state as every later run that finds it saved
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []), \
                torch.device(device):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)  # keeps the key
        tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        model.to(torch.bfloat16).save_pretrained(tmp)  # bf16 on disk halves the write; loading upcasts as asked
        del model
        try:
            tmp.replace(folder)
        except OSError:  # another process of the same launch finished first: same seed, same weights
            if not (folder / "config.json").exists():
                raise
            shutil.rmtree(tmp)
    return folder


@dataclass
class ModelSource:
    """Where weights and tokenizer come from: a hub id or folder (`path`), or a config to build with random weights."""

    config: object
    path: str | Path | None
    tokenizer: object
    init: str
    note: str

    def from_pretrained_path(self, seed: int, cache_dir) -> str | Path:
        """The id or folder to give `from_pretrained`; for random weights, the checkpoint saved on first use."""
        return self.path if self.path is not None else random_init_checkpoint(self.config, seed, cache_dir)


def resolve_model(model: str, init: str, architecture: str, corpus, cache_dir) -> ModelSource:
    """Where `model` (a hub id, folder or 'tiny') comes from; writes nothing but the (cached) corpus tokenizer.

    `architecture` is the script's own model id: 'tiny' is a 2-layer version of it. A model the scripts cannot train
    is an InputError (refuse_untrainable).
    """
    cache = Path(cache_dir)
    if model == "tiny":
        tokenizer = corpus_tokenizer(corpus, 1024, cache)
        return ModelSource(tiny_config(architecture, len(tokenizer)), None, tokenizer, "random",
                           "tiny 2-layer model, random weights")
    local = Path(model) / "config.json"
    config = folder_config(local.parent) if local.exists() else None  # a folder's own, read before any hub request
    if init == "pretrained":
        ok, why = hub_reachable(model)
        if ok:
            from transformers import AutoTokenizer  # here: its first import takes seconds a refusal need not wait

            config = config or readable_config(model)
            refuse_untrainable(model, config)
            try:
                tokenizer = AutoTokenizer.from_pretrained(model)
            except (OSError, ValueError) as e:  # a folder saved without its tokenizer (save_pretrained of a model)
                why = ("the folder holds no tokenizer that transformers can load; save it there with "
                       "tokenizer.save_pretrained(FOLDER)" if local.exists() else str(e).splitlines()[0].strip())
                raise InputError(f"model {model}: its tokenizer cannot be loaded: {why}") from None
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return ModelSource(config, model, tokenizer, "pretrained", "pretrained weights")
        if config is None and not config_file(model).exists():
            raise InputError(f"model {model}: not on the hub's reach and not cached ({why}); download it once "
                             f"where the hub is reachable, pass a local folder, or add its config.json to configs/ "
                             f"and use --init random")
    if config is None and not config_file(model).exists():
        raise InputError(f"--init random: configs/ has no architecture for {model} "
                         f"(known: {', '.join(p.stem.replace('--', '/') for p in sorted(CONFIGS.glob('*.json')))})")
    config = config or architecture_config(model)
    refuse_untrainable(model, config)
    if init == "pretrained":
        print(f"\n{'!' * 78}\n!! {model} is not reachable on the hub and not cached ({why}).\n"
              f"!! Falling back to --init random: the exact architecture with RANDOM weights.\n"
              f"!! Speed and memory are the real model's; the loss is NOT a pretrained model's.\n{'!' * 78}\n",
              file=sys.stderr)
    note = "random weights (hub unreachable: automatic fallback)" if init == "pretrained" else "random weights"
    return ModelSource(config, None, corpus_tokenizer(corpus, config.vocab_size, cache), "random", note)


def architecture_config(model_id: str):
    """The config kept in configs/ for `model_id`; InputError for a model_type this transformers does not know."""
    from transformers import AutoConfig

    fields = json.loads(config_file(model_id).read_text())
    try:
        return AutoConfig.for_model(**fields)
    except (ValueError, KeyError):
        raise InputError(f"{config_file(model_id)}: transformers does not know its model_type "
                         f"{fields.get('model_type')!r}") from None
