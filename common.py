"""Shared machinery for the four experiment scripts.

A script names a `Recipe` (model, techniques, sizes) and calls `run(recipe, argv)`.
Everything else lives here, once: command line, corpus, tokenizer, data blocks,
model loading (hub or offline random init), the Trainer subclass that measures
tokens/s and memory, W&B and metrics files, the memory budget and the
out-of-memory report.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
CONFIGS = REPO / "configs"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightweight-finetune"
WANDB_PROJECT = "lightweight-finetune"
EVAL_BLOCK = 512  # held-out tokens are packed into blocks of this length, the same for every script
EVAL_EVERY_RECORD = 20  # every 20th corpus record is held out (5%), whatever the seed
GIB = 2**30
H200_BF16_TFLOPS = 790.0  # bf16 matrix rate measured on the benchmark H200 (8192^3 matmuls, random data)

EXIT_BAD_INPUT = 2
EXIT_OOM = 3

# What each technique switch does. A recipe turns some on; `--off NAME` turns one off (the ablation).
TECHNIQUES = {
    "bf16": "bf16 mixed precision (fp16 where the GPU lacks bf16); off: fp32",
    "tf32": "TF32 tensor cores for the matmuls left in fp32",
    "packing": "concatenate the corpus into full blocks (no pad tokens); off: one record per row, padded",
    "sdpa": "fused scaled-dot-product attention (GPT-Neo: this repo's SDPA port); off: eager attention",
    "fast_gelu": "GPT-Neo's tanh GELU as one fused kernel (same function); off: the 8-op Python version",
    "fused_ce": "liger fused linear cross-entropy, never materializes the logits (CUDA only)",
    "compile": "torch.compile of the transformer body (CUDA only)",
    "fused_adamw": "fused AdamW, one kernel for all parameters; off: for-each AdamW",
    "grad_checkpointing": "recompute activations in backward instead of storing them",
    "nf4": "base weights in 4-bit NF4 with double quantization and bf16 compute (bitsandbytes)",
    "lora": "train LoRA adapters on every attention and MLP projection, base frozen (peft)",
    "lora_autocast": "LoRA layers run under bf16 autocast: adapters compute in bf16 from their fp32 weights "
                     "(otherwise peft copies every input to fp32 for them)",
    "paged_adamw_8bit": "bitsandbytes paged 8-bit AdamW (optimizer states in 8 bits, paged to CPU under pressure)",
    "auto_micro_batch": "with a budget, the largest micro-batch that fits; accumulation keeps tokens/step",
    "kbit_prep": "peft's prepare_model_for_kbit_training: norms and embeddings upcast to fp32 (the QLoRA reference)",
}

# Projections LoRA adapts, per architecture: every attention and MLP linear layer.
LORA_TARGETS = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
}


class InputError(Exception):
    """A problem the user can fix (bad corpus, bad flag value): one line, exit code 2."""


@dataclass(frozen=True)
class Recipe:
    """What a script trains and how. Sizes are defaults; the command line can override them."""

    script: str
    model: str
    techniques: tuple[str, ...]
    micro_batch: int
    seq_len: int
    tokens_per_step: int  # optimizer step size in token slots, equal within a pair (accumulation makes it up)
    learning_rate: float = 5e-5
    lora_rank: int = 16
    lora_alpha: int = 32
    optimizer: str = "adamw_torch"  # used when no optimizer technique is on


# ----------------------------------------------------------------------------- command line


def parse_args(recipe: Recipe, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"{recipe.script}.py",
        description=f"{recipe.script}: fine-tune {recipe.model} with: {', '.join(recipe.techniques) or 'no extra techniques'}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--corpus", default=str(REPO / "corpus.json"), help="JSON list (or JSON Lines) of {'text': ...}")
    p.add_argument("--model", default=recipe.model, help="hub id, local path, or 'tiny' (2-layer CPU smoke model)")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: exact architecture from configs/, random weights (automatic when the hub is unreachable)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--output-dir", default=str(REPO / "runs" / recipe.script), help="metrics.jsonl, summary.json, checkpoints")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="cap this process's CUDA memory (simulates a smaller GPU)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--micro-batch", type=int, default=recipe.micro_batch, help="sequences per forward pass")
    p.add_argument("--seq-len", type=int, default=recipe.seq_len, help="tokens per sequence")
    p.add_argument("--tokens-per-step", type=int, default=recipe.tokens_per_step,
                   help="token slots per optimizer step (micro-batch x seq-len x accumulation)")
    p.add_argument("--lr", type=float, default=recipe.learning_rate, help="peak learning rate (linear decay)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: about four times per run); always at the end")
    p.add_argument("--logging-steps", type=int, default=1, help="log every N optimizer steps")
    p.add_argument("--checkpoint-layers", type=int, default=None,
                   help="with grad_checkpointing: how many transformer layers to checkpoint (default: all)")
    if recipe.techniques:
        p.add_argument("--off", action="append", default=[], metavar="TECHNIQUE", choices=sorted(recipe.techniques),
                       help="switch one of this recipe's techniques off (repeatable): " + ", ".join(recipe.techniques))
    p.add_argument("--on", action="append", default=[], metavar="TECHNIQUE",
                   choices=sorted(set(TECHNIQUES) - set(recipe.techniques)),
                   help="switch on a technique this recipe does not use (for experiments)")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "off"], default="auto",
                   help="auto: online with credentials, else offline; WANDB_PROJECT names the project")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="tokenizer, tokenized corpus and random-init checkpoints")
    p.add_argument("--save-every", type=int, default=100,
                   help="save a checkpoint every N optimizer steps (0: only at the end); LoRA runs save adapters only")
    p.add_argument("--no-checkpoints", action="store_true", help="save no checkpoints (benchmarks)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir: same data order, optimizer, schedule, "
                        "metrics.jsonl and W&B run")
    args = p.parse_args(argv)
    args.off = getattr(args, "off", [])
    args.techniques = tuple(t for t in recipe.techniques if t not in args.off) + tuple(dict.fromkeys(args.on))
    args.script, args.recipe_model, args.recipe_techniques = recipe.script, recipe.model, recipe.techniques
    args.lora_rank, args.lora_alpha = recipe.lora_rank, recipe.lora_alpha
    # torchrun and `accelerate launch` describe the process group in the environment; one process: 1, 0, 0
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank, args.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    args.half_dtype = torch.bfloat16 if (not cuda or torch.cuda.is_bf16_supported()) else torch.float16
    return args


def validate_args(args) -> None:
    """Refuse values that cannot work before any work is done (InputError: one line, exit 2)."""
    problems = []
    for name in ("micro_batch", "seq_len", "tokens_per_step", "logging_steps"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.epochs <= 0 and args.max_steps <= 0:
        problems.append(f"--epochs must be positive (got {args.epochs:g}) unless --max-steps is given")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max-steps must be positive (got {args.max_steps})")
    if args.save_every < 0:
        problems.append(f"--save-every must be 0 or positive (got {args.save_every})")
    if args.resume and args.no_checkpoints:
        problems.append("--resume and --no-checkpoints exclude each other")
    if args.eval_every < 0:
        problems.append(f"--eval-every must be 0 or positive (got {args.eval_every})")
    if args.lr <= 0:
        problems.append(f"--lr must be positive (got {args.lr:g})")
    if args.gpu_memory_gib is not None and args.gpu_memory_gib <= 0:
        problems.append(f"--gpu-memory-gib must be positive (got {args.gpu_memory_gib:g})")
    nearest = next((p for p in (Path(args.output_dir), *Path(args.output_dir).parents) if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        problems.append(f"--output-dir {args.output_dir}: {nearest} is a file")
    if "nf4" in args.techniques and "lora" not in args.techniques:
        problems.append("nf4 needs lora: 4-bit weights cannot be trained directly")
    if "lora_autocast" in args.techniques and "lora" not in args.techniques:
        problems.append("lora_autocast needs lora")
    if "kbit_prep" in args.techniques and "lora" not in args.techniques:
        problems.append("kbit_prep needs lora: it freezes the base model")
    if args.checkpoint_layers is not None and (args.checkpoint_layers < 0 or "grad_checkpointing" not in args.techniques):
        problems.append("--checkpoint-layers takes a count >= 0 and needs the grad_checkpointing technique")
    if args.micro_batch > 0 and args.seq_len > 0 and args.tokens_per_step % (args.micro_batch * args.seq_len * args.world_size):
        processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
        problems.append(f"--tokens-per-step {args.tokens_per_step} is not a multiple of --micro-batch x --seq-len{processes} "
                        f"({args.micro_batch} x {args.seq_len}{processes}): accumulation could not keep it")
    if args.gpu_memory_gib is not None and "auto_micro_batch" in args.techniques and args.world_size > 1:
        problems.append("auto_micro_batch under --gpu-memory-gib works in one process only (each process could choose "
                        "another size): pass --micro-batch, or --off auto_micro_batch")
    if problems:
        raise InputError("; ".join(problems))


# ----------------------------------------------------------------------------- corpus


def load_corpus(path) -> list[str]:
    """The `text` of every record of a JSON list (or JSON Lines) file; InputError on anything malformed."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"corpus {path}: is a directory, not a file")
    if not path.is_file():
        raise InputError(f"corpus {path}: no such file")
    try:
        raw = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is harmless
    except UnicodeDecodeError as e:
        raise InputError(f"corpus {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"corpus {path}: cannot be read ({e.strerror})") from None
    if not raw.strip():
        raise InputError(f"corpus {path}: the file is empty")
    try:
        records = json.loads(raw)
    except json.JSONDecodeError as first_error:
        lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
        if len(lines) < 2 or not lines[0][1].lstrip().startswith("{"):
            raise InputError(f"corpus {path}: invalid or truncated JSON ({first_error})") from None
        records = []  # JSON Lines: one object per non-empty line
        for n, line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"corpus {path}: invalid JSON Lines, line {n}: {e.msg}") from None
    if not isinstance(records, list):
        raise InputError(f"corpus {path}: the top level must be a list of {{\"text\": ...}} objects, not {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"corpus {path}: record {i} has no string 'text' field")
    texts = [r["text"] for r in records]
    if not any(t.strip() for t in texts):
        raise InputError(f"corpus {path}: every text is empty")
    return [t for t in texts if t.strip()]


def split_heldout(records: list) -> tuple[list, list]:
    """Every EVAL_EVERY_RECORD-th record is held out: the same split for every script and seed."""
    train = [r for i, r in enumerate(records) if i % EVAL_EVERY_RECORD != 0]
    held = [r for i, r in enumerate(records) if i % EVAL_EVERY_RECORD == 0]
    return train, held


# ----------------------------------------------------------------------------- tokenizer and data


def _sha(*parts) -> str:
    """A short content hash; parts are JSON-encoded, so ("ab", "c") and ("a", "bc") differ."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def corpus_tokenizer(texts: list[str], vocab_size: int, cache_dir: Path):
    """Byte-level BPE trained on the corpus (the offline fallback when the hub's tokenizer is unreachable), cached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(cache_dir) / "tokenizers" / f"bpe-{_sha(*texts)}-{vocab_size}.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic: processes of one launch may race here
        tok.save(str(tmp))
        tmp.replace(path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tokenize_records(tokenizer, texts: list[str], cache_dir: Path) -> list[np.ndarray]:
    """Token ids of each record followed by EOS; cached on disk by corpus and tokenizer, so it happens once."""
    key = _sha(tokenizer.backend_tokenizer.to_str(), *texts)
    path = Path(cache_dir) / "tokenized" / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return np.split(f["ids"], f["ends"][:-1])
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    records = [np.asarray(r + [tokenizer.eos_token_id], dtype=np.int32) for r in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")  # atomic, as above
    np.savez(tmp, ids=np.concatenate(records), ends=np.cumsum([len(r) for r in records]))
    tmp.replace(path)
    return records


def pack(records: list[np.ndarray], block: int) -> np.ndarray:
    """run_clm's group_texts: concatenate every record and cut full blocks (the remainder < block is dropped)."""
    ids = np.concatenate(records)
    n = len(ids) // block
    return ids[: n * block].reshape(n, block)


def pad_pieces(records: list[np.ndarray], block: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's way: each record on its own, split into `block`-token pieces, each padded to `block`.

    Returns (input_ids, attention_mask); no token is dropped.
    """
    pieces = [r[i : i + block] for r in records for i in range(0, len(r), block)]
    ids = np.full((len(pieces), block), pad_id, dtype=np.int32)
    mask = np.zeros((len(pieces), block), dtype=np.int32)
    for row, piece in enumerate(pieces):
        ids[row, : len(piece)] = piece
        mask[row, : len(piece)] = 1
    return ids, mask


def whole_eval_steps(blocks: np.ndarray, processes: int) -> np.ndarray:
    """The held-out blocks, cut to a multiple of the number of processes (at most processes - 1 fewer).

    With several processes each evaluates one block per step (batch 1, see run); where the blocks do not fill
    the last step, accelerate fills it with blocks from the start, and those would count twice in the eval loss.
    """
    return blocks[: len(blocks) // processes * processes]


def make_dataset(input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    """A `datasets.Dataset` of causal-LM rows; labels are the inputs with padding set to -100 (ignored)."""
    import datasets

    labels = input_ids.astype(np.int64).copy()
    columns = {"input_ids": input_ids.astype(np.int64)}
    if attention_mask is not None:
        labels[attention_mask == 0] = -100
        columns["attention_mask"] = attention_mask.astype(np.int64)
    columns["labels"] = labels
    return datasets.Dataset.from_dict(columns).with_format("torch")


# ----------------------------------------------------------------------------- models


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


def hub_reachable(model_id: str) -> tuple[bool, str]:
    """(True, '') when `model_id`'s config can be had from the local cache or the hub; else (False, why).

    Without a network the hub client retries for about half a minute; a 3-second connection probe first
    keeps an offline start quick. An id the reachable hub does not know is an InputError.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id, local_files_only=True)
        return True, ""
    except OSError:
        pass
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(flag, "0").lower() in ("1", "true", "yes", "on"):
            return False, f"{flag} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"))
    if not proxied:  # through a proxy only the hub client itself can tell
        try:
            port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
            socket.create_connection((endpoint.hostname, port), timeout=3).close()
        except OSError as e:
            return False, f"cannot connect to {endpoint.hostname}: {e}"
    try:
        AutoConfig.from_pretrained(model_id)
        return True, ""
    except OSError as e:  # transformers wraps the hub's errors in OSError
        if isinstance(e.__cause__, RepositoryNotFoundError) and not isinstance(e.__cause__, GatedRepoError):
            raise InputError(f"model {model_id}: the hub does not know it (check the id, or pass a local path)") from None
        return False, str(e).splitlines()[0]


def random_init_checkpoint(config, seed: int, cache_dir: Path) -> Path:
    """Save a randomly initialized model of `config` once and return its folder, loadable by `from_pretrained`.

    Loading through `from_pretrained` (not `from_config`) keeps one code path for pretrained and random weights,
    so 4-bit quantization runs the real loading code.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(cache_dir) / "random-init" / f"{config.model_type}-{_sha(config.to_json_string(), seed)}"
    if not (folder / "config.json").exists():
        torch.manual_seed(seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # initializing 1.3B weights is much faster there
        with torch.device(device):
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

    def materialize(self, seed: int, cache_dir) -> str | Path:
        """The folder or id to load with `from_pretrained`; a random-init checkpoint is written here, once."""
        return self.path if self.path is not None else random_init_checkpoint(self.config, seed, cache_dir)


def resolve_model(args, texts: list[str]) -> ModelSource:
    """Decide where weights and tokenizer come from, writing nothing but the (cached) corpus tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    cache = Path(args.cache_dir)
    if args.model == "tiny":
        tokenizer = corpus_tokenizer(texts, 1024, cache)
        return ModelSource(tiny_config(args.recipe_model, len(tokenizer)), None, tokenizer, "random",
                           "tiny 2-layer model, random weights")
    if args.init == "pretrained":
        ok, why = hub_reachable(args.model)
        if ok:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return ModelSource(AutoConfig.from_pretrained(args.model), args.model, tokenizer, "pretrained",
                               "pretrained weights")
        if not config_file(args.model).exists() and not (Path(args.model) / "config.json").exists():
            raise InputError(f"model {args.model}: not on the hub's reach and not cached ({why}); download it once "
                             f"where the hub is reachable, pass a local folder, or add its config.json to configs/ "
                             f"and use --init random")
        print(f"\n{'!' * 78}\n!! {args.model} is not reachable on the hub and not cached ({why}).\n"
              f"!! Falling back to --init random: the exact architecture with RANDOM weights.\n"
              f"!! Speed and memory are the real model's; the loss is NOT a pretrained model's.\n{'!' * 78}\n",
              file=sys.stderr)
    local = Path(args.model) / "config.json"
    if local.exists():
        config = AutoConfig.from_pretrained(local.parent)
    elif config_file(args.model).exists():
        config = AutoConfig.for_model(**json.loads(config_file(args.model).read_text()))
    else:
        raise InputError(f"--init random: configs/ has no architecture for {args.model} "
                         f"(known: {', '.join(p.stem.replace('--', '/') for p in sorted(CONFIGS.glob('*.json')))})")
    note = "random weights (hub unreachable: automatic fallback)" if args.init == "pretrained" else "random weights"
    return ModelSource(config, None, corpus_tokenizer(texts, config.vocab_size, cache), "random", note)


class GPTNeoSDPAttention(torch.nn.Module):
    """GPT-Neo self-attention through `F.scaled_dot_product_attention`.

    Written by hand because transformers 5.17 gives GPT-Neo only eager attention (fp32 B x H x T x T scores)
    or flash-attn. Same weights and function as eager: no 1/sqrt(d) scaling (scale=1.0) and, on local layers,
    a sliding window of `config.window_size` tokens. Swapped in by `__class__` so the weights (4-bit or LoRA
    wrapped) stay where they are. Training only: no KV cache.
    """

    def forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                output_attentions=False, **kwargs):
        if layer_past is not None:
            raise NotImplementedError("GPTNeoSDPAttention is for training: no KV cache")
        bsz, length, _ = hidden_states.shape
        shape = (bsz, length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        mask = None  # None: plain causal attention (is_causal below)
        if self.attention_type == "local" or attention_mask is not None:
            mask = self.bias[:, :, :length, :length]  # causal, and within the window on local layers (True: attend)
        if attention_mask is not None:  # padding: eager passes an additive mask (0 keep, min drop)
            mask = mask & (attention_mask >= 0 if attention_mask.dtype != torch.bool else attention_mask)
        dropout = self.attn_dropout.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                             is_causal=mask is None, scale=1.0)
        out = out.transpose(1, 2).reshape(bsz, length, self.num_heads * self.head_dim)
        return self.resid_dropout(self.out_proj(out)), None


def use_gpt_neo_sdpa(model) -> int:
    """Swap every GPT-Neo eager self-attention for GPTNeoSDPAttention; returns how many."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    sdpa_class = type("GPTNeoSDPAttention", (GPTNeoSDPAttention, GPTNeoSelfAttention), {})
    swapped = 0
    for module in model.modules():
        if type(module) is GPTNeoSelfAttention:
            module.__class__ = sdpa_class
            swapped += 1
    # masks as for SDPA: None without padding (global layers then take the flash kernel through is_causal),
    # else a boolean B x 1 x T x T, instead of eager's float mask built at every step
    model.config._attn_implementation = "sdpa"
    return swapped


def unwrap_peft(model):
    """The transformers model itself: under peft, the model it wraps."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_parts(model):
    """(body, lm_head) of a causal LM, unwrapping peft: the body returns hidden states, lm_head maps them to logits."""
    hf = unwrap_peft(model)
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def put_loss_in_forward(model, fused: bool) -> None:
    """Make the model's forward return this repo's loss (fused or plain, see `lm_loss_sum`) and no logits.

    Replaces the causal LM's own forward (under peft, the wrapped model's), so that `model(input_ids=...,
    labels=...)` through peft, accelerate's autocast, DistributedDataParallel or FSDP runs it: DDP synchronizes
    gradients, and FSDP gathers the sharded weights (the tied output embedding too), only for work done inside
    a forward call. The loss is summed over predicted tokens and divided by `num_items_in_batch` (the Trainer's
    count over the whole accumulated step and all processes) or, without it, by this batch's count.
    """
    from transformers.modeling_outputs import CausalLMOutput

    hf = unwrap_peft(model)

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **unused):
        body, head = causal_lm_parts(hf)  # looked up per call: FSDP swaps in gathered weights during forward
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss = lm_loss_sum(hidden, head.weight, labels, fused)
        count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        return CausalLMOutput(loss=loss / count)

    hf.forward = forward


def load_model(source, config, args, device):
    """Load `source` (of architecture `config`) through `from_pretrained` with the recipe's precision,
    attention and adapters."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tech = set(args.techniques)
    kwargs = dict(dtype=torch.float32, use_cache=False)
    if "lora" in tech:
        kwargs["dtype"] = torch.bfloat16 if args.half_dtype == torch.bfloat16 else torch.float16
    if "nf4" in tech:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": device}  # this process's GPU (one per process under torchrun)
    if config.model_type == "gpt_neo":
        kwargs["attn_implementation"] = "eager"  # the only one transformers has here; sdpa is swapped in below
        if "fast_gelu" in tech:  # gelu_new == tanh-approximated GELU; gelu_pytorch_tanh is PyTorch's fused kernel
            kwargs["activation_function"] = "gelu_pytorch_tanh"
    elif "sdpa" in args.recipe_techniques:  # the recipe chooses attention; the baseline keeps the library default
        kwargs["attn_implementation"] = "sdpa" if "sdpa" in tech else "eager"
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "nf4" not in tech:
        model.to(device)
    if config.model_type == "gpt_neo" and "sdpa" in tech:
        use_gpt_neo_sdpa(model)
    if "kbit_prep" in tech:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if "lora" in tech:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
            target_modules=LORA_TARGETS[config.model_type], task_type="CAUSAL_LM"))
    if "lora_autocast" in tech:
        # Without autocast, peft casts each adapted layer's input to the adapters' fp32 and their output back:
        # two full-size copies per projection, 6 per block, in forward and again in recompute. Under autocast it
        # skips them and the adapters' matmuls run in bf16 (fp32 weights and optimizer kept). Only these layers:
        # whole-model autocast would also run layer norms and softmax in fp32.
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.forward = torch.autocast(device.type, dtype=args.half_dtype)(module.forward)
    put_loss_in_forward(model, fused="fused_ce" in tech and device.type == "cuda")
    if "grad_checkpointing" in tech:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is not None
                  and m.__class__.__name__.endswith(("Block", "DecoderLayer"))]
        keep = len(layers) if args.checkpoint_layers is None else max(0, min(args.checkpoint_layers, len(layers)))
        for layer in layers[keep:]:  # checkpoint only as many layers as the memory needs
            layer.gradient_checkpointing = False
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as its unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def flops_per_token(config, seq_len: int, frozen_base: bool) -> float:
    """Training FLOPs per token: 6N (4N with a frozen base) + 12 L d T, N without position embeddings."""
    layers = getattr(config, "num_hidden_layers", None) or config.num_layers
    d = config.hidden_size
    n = config.vocab_size * getattr(config, "word_embed_proj_dim", d)  # embeddings (tied head counts once)
    if config.model_type == "opt":
        proj = d * config.word_embed_proj_dim * 2 if config.word_embed_proj_dim != d else 0
        n += proj + layers * (4 * d * d + 2 * d * config.ffn_dim)
    else:
        n += layers * (4 * d * d + 2 * d * (config.intermediate_size or 4 * d))
    return (4 if frozen_base else 6) * n + 12 * layers * d * seq_len


# ----------------------------------------------------------------------------- loss


def lm_loss_sum(hidden, weight, labels, fused: bool):
    """Summed next-token cross-entropy over labels != -100, from hidden states and the output embedding.

    fused: liger's fused linear cross-entropy (chunks the vocabulary projection; the B x T x V logits never exist).
    Liger does not patch OPT or GPT-Neo, so the loss is wired here. Plain: logits in fp32, F.cross_entropy.
    """
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = labels[:, 1:].reshape(-1)
    weight = weight.to(hidden.dtype)
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, labels)
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100, reduction="sum")


# ----------------------------------------------------------------------------- trainer


def cuda_memory_gib() -> dict:
    """Allocated, reserved and peak CUDA memory in GiB (peak since the start: never reset); None on the CPU."""
    if not torch.cuda.is_available():
        return dict.fromkeys(("memory_allocated_gib", "memory_reserved_gib", "peak_memory_gib"))
    return {"memory_allocated_gib": torch.cuda.memory_allocated() / GIB,
            "memory_reserved_gib": torch.cuda.memory_reserved() / GIB,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB}


def make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class ExperimentTrainer(Trainer):
        """Trainer with this repo's loss (optionally fused) and its measurements at every log.

        tokens/s counts tokens that carry loss (not padding) over the wall time since the last log,
        evaluation and checkpoint-saving time excluded; step_seconds is that time per optimizer step.
        """

        def __init__(self, *a, flops_per_token=None, peak_tflops=None, metrics_path=None, **kw):
            super().__init__(*a, **kw)
            self.model_accepts_loss_kwargs = True  # our forward divides by the tokens of the whole accumulated step
            self.flops_per_token = flops_per_token
            self.peak_tflops = peak_tflops
            self.metrics_path = metrics_path  # None on every process but the first
            self.tokens_trained = 0
            self.windows = []  # (end_step, tokens, seconds) per training log
            self._pending_tokens = torch.zeros((), dtype=torch.long, device=self.args.device)
            self._window_start = None
            self._window_step = 0
            self._paused_seconds = 0.0  # evaluation and checkpoint saving inside the current window
            trainer = self

            class WindowStart(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):  # after a resumed state is loaded
                    trainer._window_start, trainer._window_step = time.perf_counter(), state.global_step

            self.add_callback(WindowStart())

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:  # the loss itself is the model's forward (put_loss_in_forward)
                self._pending_tokens += (inputs["labels"][:, 1:] != -100).sum()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        @contextlib.contextmanager
        def _paused(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # queued training kernels belong to the training window
            start = time.perf_counter()
            try:
                yield
            finally:
                self._paused_seconds += time.perf_counter() - start

        def evaluate(self, *a, **kw):
            with self._paused():
                return super().evaluate(*a, **kw)

        def _save_checkpoint(self, *a, **kw):
            with self._paused():
                return super()._save_checkpoint(*a, **kw)

        def log(self, logs, start_time=None):
            logs = dict(logs)
            if "loss" in logs and self._window_start is not None:  # a training log: close the window
                # every process logs here; tokens are summed over them (.item() waits for the window's work)
                tokens = int(self.accelerator.gather(self._pending_tokens.view(1)).sum().item())
                now = time.perf_counter()
                seconds = now - self._window_start - self._paused_seconds
                steps = max(1, self.state.global_step - self._window_step)
                self._pending_tokens.zero_()
                self._window_start, self._window_step, self._paused_seconds = now, self.state.global_step, 0.0
                self.tokens_trained += tokens
                self.windows.append((self.state.global_step, tokens, seconds))
                logs.update(tokens_per_second=tokens / seconds, step_seconds=seconds / steps,
                            tokens_trained=self.tokens_trained)
                mfu = self.mfu(tokens / seconds)
                if mfu is not None:
                    logs["mfu"] = mfu
            logs.update(self._memory_over_processes())
            if self.metrics_path is not None:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")
            super().log(logs, start_time)

        def _memory_over_processes(self) -> dict:
            """cuda_memory_gib(), each value the maximum over processes (every process calls log)."""
            memory = cuda_memory_gib()
            if self.args.world_size > 1 and memory["peak_memory_gib"] is not None:
                values = torch.tensor(list(memory.values()), device=self.args.device).view(1, -1)
                memory = dict(zip(memory, self.accelerator.gather(values).amax(0).tolist()))
            return memory

        def mfu(self, tokens_per_second: float) -> float | None:
            """Model FLOPs utilization: tokens/s x FLOPs per token / the GPU's peak (None where it is unknown)."""
            if not (self.flops_per_token and self.peak_tflops):
                return None
            return tokens_per_second * self.flops_per_token / (self.peak_tflops * 1e12 * self.args.world_size)

        def steady_tokens_per_second(self, warmup_steps: int) -> float | None:
            """tokens/s over the windows that end after `warmup_steps` (compilation and allocator warm-up)."""
            steady = [(t, s) for step, t, s in self.windows if step > warmup_steps] or \
                [(t, s) for _, t, s in self.windows]
            seconds = sum(s for _, s in steady)
            return sum(t for t, _ in steady) / seconds if seconds > 0 else None

    return ExperimentTrainer


# ----------------------------------------------------------------------------- W&B


def wandb_credentials() -> bool:
    """Whether W&B has an API key here: WANDB_API_KEY, or a netrc entry for its host (where `wandb login` writes)."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    for path in (os.environ.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"):
        try:
            if path and Path(path).exists() and netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue
    return False


def start_wandb(args, config: dict, id_file: Path):
    """Start the run (project WANDB_PROJECT or WANDB_PROJECT default, group = script) or return None.

    Without credentials the run is offline, so it never waits at a login prompt.
    """
    if args.wandb == "off":
        return None
    try:
        import wandb
    except ImportError:
        print(f"{args.script}: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    mode = None if args.wandb == "auto" else args.wandb
    if mode is None and "WANDB_MODE" not in os.environ:  # an explicit WANDB_MODE is the user's choice
        mode = "online" if wandb_credentials() else "offline"
    run_id = id_file.read_text().strip() if args.resume and id_file.exists() else uuid.uuid4().hex[:8]
    kwargs = dict(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=args.script, job_type="train",
                  name=f"{args.script}-{run_id}", id=run_id, resume="allow", config=config, dir=args.output_dir)
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # W&B trouble never stops training
        print(f"{args.script}: warning: W&B unavailable ({type(e).__name__}: {e}); logging offline", file=sys.stderr)
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as e:
            print(f"{args.script}: warning: W&B offline failed too ({type(e).__name__}); "
                  "logging to metrics.jsonl only", file=sys.stderr)
            return None
    id_file.write_text(run_id + "\n")
    return run


# ----------------------------------------------------------------------------- budget and out-of-memory


def check_memory_budget(gib: float | None) -> None:
    """Refuse a budget that cannot be applied. Without CUDA there is nothing to cap: an error, not a silent no-op."""
    if gib is None:
        return
    if not torch.cuda.is_available():
        raise InputError("--gpu-memory-gib needs a CUDA GPU (none is visible); drop the flag on the CPU")
    total = torch.cuda.get_device_properties(0).total_memory
    if gib * GIB > total:
        raise InputError(f"--gpu-memory-gib {gib:g} is more than this GPU has ({total / GIB:.1f} GiB)")


def apply_memory_budget(gib: float | None) -> None:
    """Cap this process's CUDA caching allocator at `gib` GiB (None: the whole GPU) and reset the peak counter.

    Under a cap the allocator uses expandable segments: with fixed-size segments, fragmentation alone made
    lightweight_big fail under 2 GiB (1.3 GiB allocated at its peak). Set both ways, since one process may run
    several recipes (the tests do); a PYTORCH_CUDA_ALLOC_CONF that names expandable_segments is left as it is.
    """
    if not torch.cuda.is_available():
        return
    gc.collect()
    torch.cuda.empty_cache()
    if "expandable_segments" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # the runtime form of PYTORCH_CUDA_ALLOC_CONF; it applies to segments allocated from now on
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
            torch.cuda.memory._set_allocator_settings  # the older name (deprecated in torch 2.11)
        setter(f"expandable_segments:{gib is not None}")
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else gib * GIB / total, device)
    torch.cuda.reset_peak_memory_stats()


def state_memory_estimate_gib(model, techniques) -> dict:
    """What the recipe holds before activations: weights, gradients and optimizer states, in GiB."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads = trainable * 4 / GIB
    optimizer = trainable * (2 if "paged_adamw_8bit" in techniques else 8) / GIB
    return {"weights": weights, "gradients": grads, "optimizer states": optimizer}


# ----------------------------------------------------------------------------- the run


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel", "datasets", "wandb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def choose_micro_batch(model, args, device, largest: int) -> int:
    """The largest micro-batch (halving from `largest`) whose forward and backward fit the budget.

    Optimizer states do not exist yet, so their estimated size is held in a placeholder during the trial.
    Transformers' `auto_find_batch_size` retries after a failure but changes tokens per step; this keeps them.
    """
    estimate = state_memory_estimate_gib(model, args.techniques)["optimizer states"]
    headroom = 0.9 * args.gpu_memory_gib * GIB  # the trial must leave 10% for fragmentation and evaluation

    def trial_peak(micro: int) -> int:
        # a function, so that a trial's tensors (its graph too, when backward ran out of memory) are freed
        # once it ends, before the next, smaller trial starts
        placeholder = torch.empty(int(estimate * GIB), dtype=torch.uint8, device=device)
        ids = torch.randint(0, 100, (micro, args.seq_len), device=device)
        with torch.autocast(device.type, dtype=args.half_dtype, enabled="bf16" in args.techniques):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        del placeholder
        return torch.cuda.max_memory_allocated()

    model.train()  # from_pretrained returns eval mode, where gradient checkpointing is inactive
    micro = largest
    while True:
        torch.cuda.reset_peak_memory_stats()
        try:
            if trial_peak(micro) <= headroom or micro == 1:
                return micro
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        micro //= 2


def complete_checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out`, oldest first, that were written to the end (trainer_state.json is last)."""
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if out.is_dir() else []
    return sorted((p for p in found if (p / "trainer_state.json").exists()), key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(args) -> str | None:
    """For --resume, the newest complete checkpoint in --output-dir; without --resume, make sure there is none
    (a fresh run there would leave an older run's checkpoints for a later --resume to pick up)."""
    out = Path(args.output_dir)
    checkpoints = complete_checkpoints(out)
    if args.resume and not checkpoints:
        raise InputError(f"--resume: no complete checkpoint-N folder in {out} to resume from (run without --resume first)")
    if not args.resume and checkpoints:
        raise InputError(f"--output-dir {out} holds checkpoints of an earlier run: pass --resume to continue it, "
                         f"or choose another --output-dir (or delete them)")
    return str(checkpoints[-1]) if args.resume else None


def restart_metrics(path: Path, resume_step: int | None) -> int:
    """Start metrics.jsonl afresh, or on resume keep the rows up to the checkpoint's step (later rows will be
    logged again). Returns the tokens trained up to there."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    kept = [r for r in rows if resume_step is not None and r["step"] <= resume_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return max((r["tokens_trained"] for r in kept if "tokens_trained" in r), default=0)


class StopOnSignal:
    """Ctrl-C or SIGTERM during training: finish the optimizer step, save a checkpoint, stop cleanly.

    A second Ctrl-C exits at once. Used as a context manager around `trainer.train()`; `callback()` is the
    TrainerCallback that turns the request into `should_save` and `should_training_stop`.
    """

    def __init__(self, script: str, save: bool, quiet: bool = False, launched: bool = False):
        self.script, self.save, self.quiet, self.signum, self._previous = script, save, quiet, None, {}
        self.launched = launched  # under torchrun / accelerate launch, which forward the signal

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            os._exit(128 + signum)  # second Ctrl-C: no checkpoint, no cleanup
        self.signum = signum
        message = (f"\n{self.script}: {signal.Signals(signum).name}: stopping after this optimizer step"
                   + (" and saving a checkpoint" if self.save else "")
                   + (" (Ctrl-C again to quit at once)\n" if not self.launched else
                      " (the launcher kills the processes after TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, default 30)\n"))
        if not self.quiet:  # under torchrun every process gets the signal: one message is enough
            os.write(sys.stderr.fileno(), message.encode())  # not print: the signal may interrupt a stderr write

    def callback(self):
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if args.world_size > 1:  # all processes stop after the same step, or the others would wait forever
                    signum = torch.tensor([stopper.signum or 0], device=args.device)
                    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
                    stopper.signum = stopper.signum or int(signum.item()) or None
                if stopper.signum is not None:
                    control.should_training_stop = True
                    control.should_save = stopper.save
                if control.should_training_stop or state.global_step >= state.max_steps:
                    control.should_log = True  # the steps since the last log are counted, not lost

        return StopCallback()


def run(recipe: Recipe, argv=None) -> dict:
    """Train `recipe` as the command line says; return the summary (also in OUTPUT_DIR/summary.json)."""
    script_start = time.perf_counter()
    args = parse_args(recipe, argv)
    main_process = args.rank == 0  # the one that writes metrics.jsonl, summary.json and the W&B run
    try:
        validate_args(args)
        checkpoint = find_checkpoint(args)
        texts = load_corpus(args.corpus)
        check_memory_budget(args.gpu_memory_gib)
        model_source = resolve_model(args, texts)
        tokenizer, init, init_note, model_config = (model_source.tokenizer, model_source.init, model_source.note,
                                                    model_source.config)
        max_positions = model_config.max_position_embeddings
        if args.seq_len > max_positions:
            raise InputError(f"--seq-len {args.seq_len} is beyond {args.model}'s {max_positions} positions")
        records = tokenize_records(tokenizer, texts, args.cache_dir)
        train_records, held_records = split_heldout(records)
        eval_block = min(EVAL_BLOCK, args.seq_len)
        n_train = sum(len(r) for r in train_records)
        eval_ids = whole_eval_steps(pack(held_records, eval_block), args.world_size)
        if n_train < args.seq_len or len(eval_ids) == 0:
            raise InputError(f"corpus {args.corpus}: too short ({n_train} training tokens, {len(eval_ids)} held-out "
                             f"blocks): needs at least one {args.seq_len}-token training block and "
                             f"{args.world_size} {eval_block}-token held-out block(s), one per process "
                             f"(every {EVAL_EVERY_RECORD}th record is held out)")
    except InputError as e:
        print(f"{recipe.script}: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

    from transformers import TrainingArguments, set_seed

    tech = set(args.techniques)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", args.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # one GPU per process (torchrun: LOCAL_RANK)
    if cuda:  # set both ways: a process that runs several recipes (the tests) must not inherit TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in tech
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl" if main_process else None
    resume_step = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else None
    tokens_before = restart_metrics(metrics_path, resume_step) if main_process else 0

    if "packing" in tech:
        train_ds = make_dataset(pack(train_records, args.seq_len))
    else:
        train_ds = make_dataset(*pad_pieces(train_records, args.seq_len, tokenizer.pad_token_id))
    eval_ds = make_dataset(eval_ids)

    summary = {"script": recipe.script, "model": args.model, "init": init, "oom": False,
               "budget_gib": args.gpu_memory_gib, "techniques": list(args.techniques), "seq_len": args.seq_len,
               "processes": args.world_size, "eval_blocks": len(eval_ids)}
    if args.world_size > 1:
        summary["how_measured"] = ("tokens, tokens/s and MFU: total over the processes (MFU per GPU); "
                                   "memory: the maximum over the processes, each on its own GPU")
    wandb_run = model = trainer = crash = None
    trainable = total = None
    try:
        source = model_source.materialize(args.seed, args.cache_dir)  # before the cap: it may build on the GPU
        apply_memory_budget(args.gpu_memory_gib)
        model = load_model(source, model_config, args, device)
        if "auto_micro_batch" in tech and args.gpu_memory_gib is not None and cuda:
            largest, args.micro_batch = args.micro_batch, None  # unknown (None in the summary) until a trial fits
            args.micro_batch = choose_micro_batch(model, args, device, largest)
        tokens_per_micro = args.micro_batch * args.seq_len * args.world_size  # over all processes
        accumulation = max(1, args.tokens_per_step // tokens_per_micro)
        if "compile" in tech and cuda:
            causal_lm_parts(model)[0].compile()
        trainable, total = parameter_counts(model)
        run_config = {
            "script": recipe.script, "model": args.model, "init": init, "init_note": init_note,
            "corpus": str(args.corpus), "corpus_records": len(texts), "train_tokens_per_epoch": n_train,
            "techniques": {t: (t in tech) for t in dict.fromkeys(recipe.techniques + args.techniques)}, "micro_batch": args.micro_batch,
            "seq_len": args.seq_len, "gradient_accumulation": accumulation, "processes": args.world_size,
            "tokens_per_step": tokens_per_micro * accumulation, "epochs": args.epochs, "max_steps": args.max_steps,
            "learning_rate": args.lr, "seed": args.seed, "budget_gib": args.gpu_memory_gib,
            "checkpoint_layers": args.checkpoint_layers, "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
            "versions": versions(), "trainable_params": trainable, "total_params": total,
        }
        if main_process:
            processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
            print(f"{recipe.script}: {args.model} ({init_note}), {trainable:,} of {total:,} parameters train; "
                  f"micro-batch {args.micro_batch} x {args.seq_len} x {accumulation} accumulation{processes}; "
                  f"techniques: {', '.join(args.techniques) or 'none'}", file=sys.stderr)
            wandb_run = start_wandb(args, run_config, out / "wandb_run_id.txt")
        steps_per_epoch = math.ceil(len(train_ds) / (args.micro_batch * accumulation * args.world_size))
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
        eval_every = args.eval_every or math.ceil(total_steps / 4)
        optim = ("paged_adamw_8bit" if "paged_adamw_8bit" in tech
                 else "adamw_torch_fused" if "fused_adamw" in tech else recipe.optimizer)
        drop_last = "compile" in tech and cuda  # a smaller last micro-batch would trigger a recompile
        training_args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=args.micro_batch,
            # drop_last must drop no held-out block, nor may several processes share a last step (whole_eval_steps)
            per_device_eval_batch_size=1 if drop_last or args.world_size > 1 else args.micro_batch,
            gradient_accumulation_steps=accumulation, num_train_epochs=args.epochs, max_steps=args.max_steps,
            learning_rate=args.lr, lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed,
            bf16="bf16" in tech and args.half_dtype == torch.bfloat16 and cuda,
            fp16="bf16" in tech and args.half_dtype == torch.float16,
            optim=optim, logging_steps=args.logging_steps, eval_strategy="steps", eval_steps=eval_every,
            save_strategy="no" if args.no_checkpoints else "steps", save_steps=args.save_every or total_steps,
            save_total_limit=2, report_to=["wandb"] if wandb_run is not None else "none",
            prediction_loss_only=True, use_cpu=not cuda, dataloader_pin_memory=cuda,
            disable_tqdm=False, remove_unused_columns=False,
            dataloader_drop_last=drop_last,
            ddp_find_unused_parameters=False,  # every trainable parameter is used; the search costs a graph walk
        )
        training_args._n_gpu = min(training_args.n_gpu, 1)  # one GPU per run: no DataParallel over the others
        trainer = make_trainer_class()(
            model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
            flops_per_token=flops_per_token(model_config, args.seq_len, "lora" in tech),
            peak_tflops=H200_BF16_TFLOPS if cuda and "H200" in torch.cuda.get_device_name(0) else None,
            metrics_path=metrics_path)
        trainer.tokens_trained = tokens_before
        summary["parallelism"] = trainer.accelerator.distributed_type.value  # NO, MULTI_GPU (DDP), FSDP, ...
        stopper = StopOnSignal(recipe.script, save=not args.no_checkpoints, quiet=not main_process,
                               launched="TORCHELASTIC_RUN_ID" in os.environ)
        trainer.add_callback(stopper.callback())
        if cuda:
            torch.cuda.reset_accumulated_memory_stats()  # count the allocator's retries in training only
        with stopper:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        if stopper.signum is not None:
            summary["interrupted"] = signal.Signals(stopper.signum).name
        train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
        summary.update(
            train_seconds=result.metrics["train_runtime"], tokens_trained=trainer.tokens_trained,
            tokens_per_second=(trainer.tokens_trained - tokens_before) / result.metrics["train_runtime"],
            steady_tokens_per_second=trainer.steady_tokens_per_second(warmup_steps=min(5, total_steps // 3)),
            final_train_loss=train_losses[-1] if train_losses else None,
            final_eval_loss=eval_losses[-1] if eval_losses else None, steps=trainer.state.global_step)
    except Exception as e:  # out of memory or a crash: summary.json and the W&B run still end consistent
        if isinstance(e, torch.OutOfMemoryError):
            summary["oom"] = True
        else:
            crash = e  # re-raised below, with its traceback
            summary["error"] = f"{type(e).__name__}: {e}"
        if trainer is not None:
            summary.update(steps=trainer.state.global_step, tokens_trained=trainer.tokens_trained)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    if peak is not None and args.world_size > 1 and not summary["oom"] and crash is None:
        peak_over_processes = torch.tensor([peak], device=device)  # a failed process would not join this
        torch.distributed.all_reduce(peak_over_processes, op=torch.distributed.ReduceOp.MAX)
        peak = peak_over_processes.item()
    if trainer is not None and summary.get("steady_tokens_per_second"):
        summary["mfu"] = trainer.mfu(summary["steady_tokens_per_second"])
    if model is not None:
        summary["trainable_params"], summary["total_params"] = trainable, total
        estimate = state_memory_estimate_gib(model, args.techniques)
    if cuda:  # times the allocator hit the cap (or the GPU's end), freed its cache and retried: slow
        summary["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries")
    summary.update(micro_batch=args.micro_batch, peak_memory_gib=peak,
                   script_seconds=time.perf_counter() - script_start)
    if summary["oom"]:
        budget = f"a {args.gpu_memory_gib:g} GiB budget" if args.gpu_memory_gib else "the GPU's memory"
        need = ""
        if model is not None:
            need = (f"; before activations this recipe needs about {sum(estimate.values()):.1f} GiB: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in estimate.items()))
        where = f" in process {args.rank} of {args.world_size}" if args.world_size > 1 else ""
        summary["oom_message"] = (f"{recipe.script}: out of CUDA memory{where} under {budget} "
                                  f"(peak {peak or 0:.1f} GiB reached){need}")
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    elif summary["oom"] or crash is not None:  # the first process may never get to write its summary
        (out / f"summary-rank{args.rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if wandb_run is not None:
        wandb_run.summary.update(summary)
        offline = wandb_run.settings.mode == "offline"
        run_dir = Path(wandb_run.dir).parent
        wandb_run.finish(exit_code=1 if crash or summary["oom"] else 0)
        if offline:
            print(f"{recipe.script}: W&B run saved offline; upload it with: wandb sync {run_dir}", file=sys.stderr)
    del trainer, model
    if crash is not None:
        raise crash
    if summary["oom"]:
        print(summary["oom_message"], file=sys.stderr)
        raise SystemExit(EXIT_OOM)
    if "interrupted" in summary:
        again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        command = f"python {recipe.script}.py" if args.world_size == 1 else "the same launcher command"
        if main_process:
            print(f"{recipe.script}: stopped by {summary['interrupted']} after step {summary.get('steps')}"
                  + (f"; resume with: {command} {' '.join(again + ['--resume'])}"
                     if not args.no_checkpoints else " (no checkpoints: --no-checkpoints)"), file=sys.stderr)
        raise SystemExit(128 + getattr(signal, summary["interrupted"]))
    if main_process:
        print(f"{recipe.script}: done: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
            if k in ("tokens_per_second", "steady_tokens_per_second", "mfu", "peak_memory_gib", "train_seconds",
                     "final_train_loss", "final_eval_loss") and v is not None), file=sys.stderr)
    return summary


def main_for(recipe: Recipe):
    """The `main(argv=None)` of a script: run and translate the outcome to an exit code."""
    def main(argv=None):
        try:
            return run(recipe, argv)
        except KeyboardInterrupt:  # Ctrl-C before or after training: nothing to save
            print(f"\n{recipe.script}: interrupted", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None
    return main
