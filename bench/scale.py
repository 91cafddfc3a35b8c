"""benchmark.py's `scale` group: one and two processes (DDP through torchrun, FSDP through accelerate launch) at
the same tokens per optimizer step, so that speed, per-GPU memory and the per-step losses can be compared."""
from __future__ import annotations

import sys


def scale_rows() -> list[dict]:
    """1 and 2 processes at the same tokens per step, 20 steps logged each (lightweight_small: the fewest it
    compiles): speed, per-GPU memory, and the per-step losses that must agree (DDP for the lightweight scripts, FSDP
    for before_big). The lightweight scripts' steps are two of their default micro-batches (32 x 1024), so that
    each GPU runs the same one."""
    from lightweight_small import COMPILE_PAYS_FROM_STEPS

    fsdp = ["accelerate", "--config_file", "configs/accelerate/fsdp.yaml"]
    rows = []
    for script, launcher, steps, argv in (("lightweight_small", ["torchrun"], COMPILE_PAYS_FROM_STEPS,
                                           ["--tokens-per-step", "65536"]),
                                          ("lightweight_big", ["torchrun"], 20, ["--tokens-per-step", "65536"]),
                                          ("before_big", fsdp, 20,
                                           ["--micro-batch", "4", "--tokens-per-step", "4096"])):
        logged = ["--max-steps", str(steps), "--logging-steps", "1", "--eval-every", str(steps)]
        for processes in (1, 2):
            rows.append(dict(name=f"scale-{script}-{processes}gpu", script=script, processes=processes,
                             launcher=launcher if processes > 1 else ["torchrun"], argv=[*logged, *argv]))
    rows.append(dict(name="scale-before_big-2gpu-16gib", script="before_big", processes=2, launcher=fsdp,
                     argv=["--max-steps", "2", "--micro-batch", "1", "--tokens-per-step", "4096", "--gpu-memory-gib", "16"]))
    return rows


def launch_command(spec: dict) -> list[str]:
    """python SCRIPT.py, or under torchrun / accelerate launch with spec["processes"] processes."""
    launcher, processes = spec.get("launcher"), spec.get("processes", 1)
    if launcher is None:
        return [sys.executable, f"{spec['script']}.py"]
    if launcher[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                f"{spec['script']}.py"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher[1:], "--num_processes", str(processes),
            f"{spec['script']}.py"]


# per-step losses of 1 and 2 processes compared over the first 20 steps (lightweight_small's rows run 64, the fewest
# it compiles; later, at its epoch boundaries every 5 steps of 65,536 tokens, they differ by up to 1.2e-3 in bf16)
COMPARED_STEPS = 20


def scale_table(runs: dict) -> list[str]:
    """scale.md's table: tokens/s against processes and the largest per-step loss difference."""
    lines = ["Same tokens per step on 1 and 2 processes.\n",
             "| script | parallelism | processes | micro-batch | steps | tokens/s | vs 1 | per-GPU peak GiB | eval loss "
             f"| largest relative per-step loss difference vs 1, first {COMPARED_STEPS} steps | all steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in runs.items():
        if not name.startswith("scale-"):
            continue
        one = runs.get(f"scale-{row['script']}-1gpu") or {}
        if row.get("micro_batch") != one.get("micro_batch"):
            one = {}  # another micro-batch splits each step's rows differently: neither speed nor losses compare
        speedup = (row["tokens_per_second"] / one["tokens_per_second"]
                   if row.get("tokens_per_second") and one.get("tokens_per_second") else None)
        compared = row is not one and not row.get("oom")
        difference = loss_difference(one, row, COMPARED_STEPS) if compared else None
        difference_all = loss_difference(one, row) if compared else None
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"| {name} | {row.get('parallelism')} | {row.get('processes')} | {fmt(row.get('micro_batch'), 'd')} "
                     f"| {fmt(row.get('steps'), 'd')} | {fmt(row.get('tokens_per_second'), ',.0f')} | {fmt(speedup, '.2f')} "
                     f"| {fmt(row.get('peak_memory_gib'), '.2f')} | {fmt(row.get('eval_loss'), '.4f')} "
                     f"| {fmt(difference, '.1e')} | {fmt(difference_all, '.1e')} |"
                     + (" out of memory" if row.get("oom") else "")
                     + (f" {row['error']}" if row.get("error") else ""))
    return lines


def loss_difference(one: dict, other: dict, first_steps: int | None = None) -> float | None:
    """The largest relative difference of the per-step train losses of two runs, over the steps both logged (up
    to `first_steps`)."""
    a = dict(map(tuple, (one.get("curves") or {}).get("train") or []))
    b = dict(map(tuple, (other.get("curves") or {}).get("train") or []))
    steps = sorted(s for s in set(a) & set(b) if first_steps is None or s <= first_steps)
    return max(abs(b[s] - a[s]) / abs(a[s]) for s in steps) if steps else None
