"""Per-step train losses and the final eval loss of each script on the tiny CPU model, as JSON.

Used to show that a refactor changes no behaviour: run it before and after, and compare the two files.

    python scripts/tiny_losses.py OUT.json
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {  # name: (script, extra argv)
    "before_small": ("before_small", []),
    "lightweight_small": ("lightweight_small", []),
    "lightweight_small-no-packing": ("lightweight_small", ["--off", "packing"]),
    "before_big": ("before_big", []),
    "lightweight_big": ("lightweight_big", []),
    "lightweight_big-no-lora_autocast": ("lightweight_big", ["--off", "lora_autocast"]),
}


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="tiny-losses-"))
    corpus = work / "corpus.json"
    corpus.write_text(json.dumps(json.loads((REPO / "corpus.json").read_text())[:200]))
    results = {}
    for name, (script, extra) in RUNS.items():
        run_dir = work / name
        argv = ["--model", "tiny", "--corpus", str(corpus), "--seq-len", "64", "--micro-batch", "4",
                "--tokens-per-step", "512", "--max-steps", "6", "--eval-every", "3", "--lr", "3e-3",
                "--wandb", "off", "--no-checkpoints", "--cache-dir", str(work / "cache"),
                "--output-dir", str(run_dir), *extra]
        subprocess.run([sys.executable, str(REPO / f"{script}.py"), *argv], check=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"train": [r["loss"] for r in rows if "loss" in r],
                         "eval": [r["eval_loss"] for r in rows if "eval_loss" in r]}
        print(name, results[name], file=sys.stderr)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
