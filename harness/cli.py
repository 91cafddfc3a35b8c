"""The command line every script shares: flags, technique switches, validation and exit codes.

Nothing here imports torch, so `--help` and a bad flag answer at once.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightweight-finetune"

EXIT_BAD_INPUT = 2
EXIT_OOM = 3
EXIT_SAVE_FAILED = 4  # a file of the run could not be written (full disk, any OSError): what was whole stays
EXIT_DIVERGED = 5  # the loss turned NaN or infinite


class InputError(Exception):
    """A problem the user can fix (bad corpus, bad flag value): one line, exit code 2."""


def say(line: str) -> None:
    """`line` on stderr on a line of its own, where a progress bar may be on the last one (a run that fails or
    stops mid-training leaves the Trainer's bar open): tqdm's write() clears the bar's line first."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


class RunEnded(Exception):
    """A run that cannot go on, for the reason its one line gives: no traceback, exit `exit_code`. The line is
    printed (first process) as it is raised, above the progress bar rather than onto its line; the run then ends
    as any failure does (summary.json with the error, where the disk still takes it; W&B finished)."""

    exit_code = 1

    def __init__(self, message: str, main_process: bool = True):
        super().__init__(message)
        self.message = message
        if main_process:
            say(f"error: {message}")

    def __str__(self):
        return self.message


@dataclass(frozen=True)
class Technique:
    """One switchable technique of a script: on by default unless `default=False` (then `--on NAME`)."""

    help: str
    default: bool = True
    cuda_only: bool = False  # on the CPU it is skipped, and the run's record says so
    needs: tuple[str, ...] = ()  # techniques it cannot work without
    at_start: Callable[[], object] | None = None  # run as soon as the command line is read, before torch is imported

    def __post_init__(self):
        if self.at_start is not None and self.cuda_only:
            raise ValueError("at_start runs before the device is known: not for a CUDA-only technique")


REFUSAL_WAIT_SECONDS = 30


def refuse(message: str):
    """Exit 2 with `message` on stderr, printed once under torchrun or `accelerate launch`, where every process
    refuses alike: by the first (RANK 0). The others wait, for the launcher ends them as soon as the first has
    exited; had they exited first, it could end the first before it printed. A process still there after
    REFUSAL_WAIT_SECONDS (a refusal of its own) prints the message itself."""
    if os.environ.get("RANK", "0") != "0":
        time.sleep(REFUSAL_WAIT_SECONDS)
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


class RankZeroParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are refused once under a launcher (`refuse`)."""

    def error(self, message):  # argparse documents error() as the method to override
        refuse(f"{self.format_usage()}{self.prog}: error: {message}")


class Switches:
    """Which techniques this run uses. `on("nf4")` is the test a script's guarded block asks.

    A technique asked for but skipped (a CUDA-only one on the CPU) answers False, and `record()` says why.
    """

    def __init__(self, declared: dict[str, Technique], off=(), on=()):
        self.declared = declared
        self.chosen = {name: (t.default and name not in off) or name in on for name, t in declared.items()}
        self.skipped: dict[str, str] = {}

    def __call__(self, name: str) -> bool:
        if name not in self.declared:  # a typo in a script must not read as "off"
            raise KeyError(f"unknown technique {name!r}; this script has: {', '.join(self.declared)}")
        return self.chosen[name] and name not in self.skipped

    def skip_cuda_only(self, reason: str) -> None:
        for name, technique in self.declared.items():
            if technique.cuda_only:
                self.skip(name, reason)

    def skip(self, name: str, reason: str) -> None:
        """Leave out a chosen technique for this run (`on(name)` answers False from now on); record() says why."""
        if self(name):
            self.skipped[name] = reason

    def names_on(self) -> list[str]:
        return [name for name in self.declared if self(name)]

    def record(self) -> dict[str, str]:
        """Every technique of the script: 'on', 'off', or 'skipped: why'."""
        return {name: f"skipped: {self.skipped[name]}" if name in self.skipped else "on" if chosen else "off"
                for name, chosen in self.chosen.items()}


def build_parser(script: str, model: str, techniques: dict[str, Technique], sizes: dict) -> argparse.ArgumentParser:
    # each help names its default once, where there is one (%(default)s), so argparse's plain formatter;
    # ArgumentDefaultsHelpFormatter also printed "(default: None)" and "(default: [])" after helps that said it
    p = RankZeroParser(prog=f"{script}.py", description=f"{script}: fine-tune {model}.", allow_abbrev=False)
    p.add_argument("--corpus", default=str(REPO / "corpus.json"),
                   help="JSON list (or JSON Lines) of {'text': ...} (default: %(default)s)")
    p.add_argument("--model", default=model,
                   help="hub id, local path, or 'tiny' (2-layer CPU smoke model) (default: %(default)s)")
    p.add_argument("--init", choices=["pretrained", "random"], default="pretrained",
                   help="random: exact architecture from configs/, random weights (automatic when the hub is "
                        "unreachable) (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=-1,
                   help="optimizer steps; overrides --epochs when > 0 (default: none, --epochs decides)")
    p.add_argument("--output-dir", default=str(REPO / "runs" / script),
                   help="metrics.jsonl, summary.json, checkpoints (default: %(default)s)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="cap this process's CUDA memory (simulates a smaller GPU; default: no cap)")
    p.add_argument("--seed", type=int, default=42,
                   help="seed of the data order, random init and adapters (default: %(default)s)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"sequences per forward pass (default: {sizes['micro_batch']}; with auto_micro_batch the largest "
                        f"that fits, at most that)")
    p.add_argument("--seq-len", type=int, default=sizes["seq_len"], help="tokens per sequence (default: %(default)s)")
    p.add_argument("--tokens-per-step", type=int, default=sizes["tokens_per_step"],
                   help="token slots per optimizer step (micro-batch x seq-len x accumulation) (default: %(default)s)")
    p.add_argument("--lr", type=float, default=sizes["learning_rate"],
                   help="peak learning rate, linear decay (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N steps, and always at the end (default: 0, about four times per run)")
    p.add_argument("--logging-steps", type=int, default=1, help="log every N optimizer steps (default: %(default)s)")
    if "grad_checkpointing" in techniques:
        p.add_argument("--checkpoint-layers", type=int, default=None,
                       help="with grad_checkpointing: how many transformer layers to checkpoint (default: all)")
    add_switches(p, techniques)
    p.add_argument("--wandb", choices=["auto", "online", "offline", "off"], default="auto",
                   help="auto: online with credentials, else offline; WANDB_PROJECT names the project "
                        "(default: %(default)s)")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                   help="tokenizer, tokenized corpus and random-init checkpoints (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=100,
                   help="save a checkpoint to resume from every N optimizer steps (0: none; Ctrl-C and SIGTERM "
                        "still save one); LoRA runs save adapters only. The trained model is saved to --output-dir "
                        "at the end (default: %(default)s)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="save nothing: no checkpoints, no final model (benchmarks)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="CUDA: profile two optimizer steps with torch.profiler into DIR (profile.md, trace.json.gz)")
    p.add_argument("--profile-first", metavar="STEP", type=int, default=6,
                   help="the first of the two profiled optimizer steps (1-based; default: 6)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output-dir: same data order, optimizer, schedule, "
                        "metrics.jsonl and W&B run")
    return p


def add_switches(p: argparse.ArgumentParser, techniques: dict[str, Technique]) -> None:
    """--off for the techniques on by default, --on for the others, each listed with what it does."""
    for flag, default in (("--off", True), ("--on", False)):
        names = [name for name, t in techniques.items() if t.default == default]
        if names:
            p.add_argument(flag, action="append", default=[], metavar="TECHNIQUE", choices=names,
                           help=f"switch {'off one of the techniques on' if default else 'on a technique off'} by "
                                f"default (repeatable): " + "; ".join(f"{n}: {techniques[n].help}" for n in names))


def parse_args(script: str, model: str, techniques: dict[str, Technique], sizes: dict, argv=None):
    """(args, switches). Unknown flags and bad choices end in argparse's usage line and exit 2.

    args.micro_batch is --micro-batch, or the script's default capped so that a step of --tokens-per-step still
    splits over the processes of a launch (args.micro_batch_given says which).
    """
    args = build_parser(script, model, techniques, sizes).parse_args(argv)
    args.micro_batch_given = args.micro_batch is not None
    if not args.micro_batch_given:
        rows_per_process = args.tokens_per_step // (args.seq_len * processes_in_launch()) if args.seq_len > 0 else 1
        args.micro_batch = max(1, min(sizes["micro_batch"], rows_per_process))
    return args, Switches(techniques, off=getattr(args, "off", []), on=getattr(args, "on", []))


def processes_in_launch() -> int:
    """Processes in this launch: torchrun and `accelerate launch` set WORLD_SIZE; a plain run is one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_launch() -> bool:
    """Launched by `accelerate launch` with an FSDP config (configs/accelerate/fsdp.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def validate_args(args, on: Switches, world_size: int) -> None:
    """Refuse values that cannot work before any work is done (InputError: one line, exit 2), every problem
    found at once: each flag's bounds, then each folder the run writes, tried."""
    problems = bound_problems(args)
    for name, technique in on.declared.items():
        problems += [f"{name} needs {need}" for need in technique.needs if on.chosen[name] and not on.chosen[need]]
    checkpoint_layers = getattr(args, "checkpoint_layers", None)
    if checkpoint_layers is not None and (checkpoint_layers < 0 or not on.chosen["grad_checkpointing"]):
        problems.append("--checkpoint-layers takes a count >= 0 and needs the grad_checkpointing technique")
    slots = args.micro_batch * args.seq_len * world_size
    if on.chosen.get("packing") and slots > 0 and args.tokens_per_step % slots:  # padded rows: see Run.accumulation
        processes = f" x {world_size} processes" if world_size > 1 else ""
        problems.append(f"--tokens-per-step {args.tokens_per_step} is not a multiple of --micro-batch x --seq-len"
                        f"{processes} ({args.micro_batch} x {args.seq_len}{processes}): accumulation could not keep it")
    if args.resume and args.no_checkpoints:
        problems.append("--resume and --no-checkpoints exclude each other")
    problems += [p for flag, folder in (("--output-dir", args.output_dir), ("--cache-dir", args.cache_dir),
                                        ("--profile", args.profile)) if folder is not None
                 for p in [folder_problem(flag, Path(folder))] if p]
    if problems:
        raise InputError("\n".join(problems))  # one line each


SEED_LIMIT = 2**32  # numpy's seeds (transformers' set_seed seeds numpy too): 0 to 2**32 - 1


def bound_problems(args) -> list[str]:
    """Each numeric flag outside the values that can work (a NaN compares False to every bound: finite first)."""
    problems = []
    for name in ("micro_batch", "seq_len", "tokens_per_step", "logging_steps"):
        if getattr(args, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.seq_len == 1:  # a label is the next token: a one-token row has none
        problems.append("--seq-len must be at least 2 (got 1)")
    if not math.isfinite(args.epochs) or (args.epochs <= 0 and args.max_steps <= 0):
        problems.append(f"--epochs must be positive and finite (got {args.epochs:g}) unless --max-steps is given")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max-steps must be positive (got {args.max_steps})")
    for name in ("save_every", "eval_every"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be 0 or positive (got {getattr(args, name)})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr must be positive and finite (got {args.lr:g})")
    if args.profile_first < 1:
        problems.append(f"--profile-first must be positive (got {args.profile_first})")
    if args.gpu_memory_gib is not None and not (math.isfinite(args.gpu_memory_gib) and args.gpu_memory_gib > 0):
        problems.append(f"--gpu-memory-gib must be positive and finite (got {args.gpu_memory_gib:g})")
    if not 0 <= args.seed < SEED_LIMIT:
        problems.append(f"--seed must be from 0 to {SEED_LIMIT - 1} (got {args.seed})")
    return problems


def folder_problem(flag: str, folder: Path) -> str | None:
    """Why the run could not write into `folder`, tried up front (None: it can): a file written and removed there,
    or, where it does not exist yet, a folder made and removed beside where it will be. Nothing is left behind, and
    the names are this process's own, so the processes of a launch can try the same folder at once."""
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        return f"{flag} {folder}: {nearest} is a file"
    try:
        if nearest == folder:
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=nearest))
    except OSError as e:
        return f"{flag} {folder}: cannot write there ({e.strerror or e})"
    for name in ("metrics.jsonl", "summary.json") if flag == "--output-dir" else ():
        if (folder / name).is_dir():
            return f"{flag} {folder}: {folder / name} is a folder, not a file the run can write"
    return None
