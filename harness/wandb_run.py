"""The W&B run: one project, the script's name as the group, offline without credentials."""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

WANDB_PROJECT = "lightweight-finetune"


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


def run_config(run, training_args) -> dict:
    """Everything about a run that its W&B config shows: model, data, techniques, sizes, step, GPU, versions."""
    import torch

    from harness.measure import versions

    args, micro_batch = run.args, training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    return {
        "script": run.script, "model": args.model, "init": run.source.init, "init_note": run.source.note,
        "corpus": str(args.corpus), "corpus_records": len(run.corpus), "train_tokens_per_epoch": run.train_tokens,
        "techniques": run.on.record(), "micro_batch": micro_batch, "micro_batch_reason": run.micro_batch_reason,
        "seq_len": args.seq_len, "gradient_accumulation": accumulation, "processes": run.world_size,
        "tokens_per_step": args.tokens_per_step, "epochs": args.epochs,
        "token_slots_per_step": micro_batch * args.seq_len * run.world_size * accumulation,
        "max_steps": args.max_steps, "learning_rate": args.lr, "seed": args.seed, "budget_gib": args.gpu_memory_gib,
        "checkpoint_layers": getattr(args, "checkpoint_layers", None), "optimizer": run.optim,
        "lr_scheduler": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "autocast": str(run.autocast_dtype), "tf32": training_args.tf32, "torch_compile": training_args.torch_compile,
        "eval_steps": training_args.eval_steps, "save_steps": training_args.save_steps,
        "gpu": torch.cuda.get_device_name(0) if run.cuda else "cpu", "versions": versions(),
        "trainable_params": run.summary["trainable_params"], "total_params": run.summary["total_params"],
    }


def start_wandb(script: str, mode: str, resume: bool, config: dict, output_dir: Path):
    """Start the run (project $WANDB_PROJECT or WANDB_PROJECT, group = script) or return None.

    mode is --wandb's: auto is online with credentials, else offline, so it never waits at a login prompt.
    On --resume the run id kept in OUTPUT_DIR/wandb_run_id.txt continues the same run.
    """
    if mode == "off":
        return None
    try:
        import wandb
    except ImportError:
        print(f"{script}: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    id_file = Path(output_dir) / "wandb_run_id.txt"
    mode = None if mode == "auto" else mode
    if mode is None and "WANDB_MODE" not in os.environ:  # an explicit WANDB_MODE is the user's choice
        mode = "online" if wandb_credentials() else "offline"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
    kwargs = dict(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=script, job_type="train",
                  name=f"{script}-{run_id}", id=run_id, resume="allow", config=config, dir=str(output_dir))
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # W&B trouble never stops training
        print(f"{script}: warning: W&B unavailable ({type(e).__name__}: {e}); logging offline", file=sys.stderr)
        try:
            run = wandb.init(mode="offline", **kwargs)
        except Exception as e:
            print(f"{script}: warning: W&B offline failed too ({type(e).__name__}); "
                  "logging to metrics.jsonl only", file=sys.stderr)
            return None
    id_file.write_text(run_id + "\n")
    return run


def finish_wandb(run, summary: dict, failed: bool, script: str) -> None:
    """Record the summary, end the run, and say how to upload an offline one.

    A resumed offline run has one folder per start, all with the run id (offline-run-<time>-<id>): the command
    names them all, oldest first; `wandb sync` uploads the folders of one run in order of start time.
    """
    run.summary.update(summary)
    offline = run.settings.mode == "offline"
    run_dir = Path(run.dir).parent
    run.finish(exit_code=1 if failed else 0)
    if offline:
        folders = sorted(run_dir.parent.glob(f"offline-run-*-{run.id}")) or [run_dir]
        print(f"{script}: W&B run saved offline; upload it with: wandb sync {' '.join(map(str, folders))}",
              file=sys.stderr)


def wandb_callback():
    """transformers' W&B callback: it logs train/ and eval/ metrics to the run already started."""
    from transformers.integrations import WandbCallback

    return WandbCallback()
