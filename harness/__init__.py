"""The plumbing the four experiment scripts share, one concern per module; importing the package loads no torch.
The code behind the techniques is in techniques/, one module per switch.

- cli: the flags every script takes, technique switches (`on("nf4")`), validation, exit codes
- session: one training run from the command line to summary.json (`with session(...) as run`)
- training: the measuring Trainer's wiring, training, and what it measured
- outcome: how a run ends: summary.json, the W&B run's end, the exit code
- sources: where weights and tokenizer come from (hub, offline random init, tiny)
- measure: the Trainer that measures tokens/s, memory and MFU; metrics.jsonl
- wandb_run: the W&B run
- budget: the GPU memory budget, what a recipe's states need, and the out-of-memory report
- cpu_memory: a step's memory on the CPU, activations included, and the micro-batch that fits it
- signals: Ctrl-C / SIGTERM, checkpoints to resume from, no resumable checkpoint at the end
- checkpoints: checkpoints (and every file a run writes) whole or not at all, checked before a resume
- lock: one run per output folder
- profile, step_size, clock: --profile, accumulation and steps per epoch, seconds since the process started
"""
import logging

from harness.cli import Technique
from harness.session import session

__all__ = ["Technique", "session"]

# bitsandbytes, imported on a CPU with AVX512-BF16, warns that an optional kernel package (`kernels`, from the hub) is
# missing; it then uses its own CPU kernels, which the tiny CPU runs need. Only that notice is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in str(record.msg))
