#!/usr/bin/env bash
# Wheels for a GPU machine that has Python 3.12, torch 2.11 (CUDA 13.0), torchvision, triton, transformers 5.17,
# peft 0.21, accelerate 1.15, huggingface-hub 1.33 and the common scientific stack, to run both
# peers/unsloth_peer.py and this repo's scripts (--wandb off), offline:
#
#     bash peers/unsloth_wheels.sh OUTDIR        # here, where PyPI is reachable
#     source OUTDIR/install.sh                   # there: installs into /tmp/site, exports PYTHONPATH
#
# Everything unsloth, unsloth_zoo, trl, datasets, bitsandbytes and liger-kernel require that such a machine lacks
# (their Requires-Dist, extras left out), one version each. datasets is 4.x because unsloth asks for < 5; the repo's
# scripts run on it too. Left out:
# - wandb: 20 MB, and these runs log with --wandb off;
# - xformers: PyPI's only build (0.0.35) is linked against CUDA 12 (libcudart.so.12) and torch 2.10; beside
#   torch 2.11+cu130 it cannot load, and unsloth then uses PyTorch's SDPA attention (unsloth/models/_utils.py);
# - fsspec's http extra (aiohttp): datasets reads local files here.
# torchao is 0.17, released beside torch 2.11: 0.18 imports torch symbols that 2.11 lacks (unsloth_zoo's own advice is
# torchao<0.18), and transformers imports torchao in every run once it is installed.
# Two wheels are trimmed, to keep the folder near 31 MB: unsloth without studio/ (its 26 MB web app, which the library
# never imports) and bitsandbytes with only its CPU, CUDA 13.0 and 13.2 libraries (those a torch for CUDA 13 loads).
set -euo pipefail
OUT=${1:?usage: $0 OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$OUT" \
  unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 liger-kernel==0.8.5 trl==1.15.0 \
  datasets==4.8.5 fsspec==2026.2.0 dill==0.4.1 multiprocess==0.70.19 \
  torchao==0.17.0 diffusers==0.42.1 importlib_metadata==10.0.0 zipp==4.1.2 cut_cross_entropy==25.1.1 \
  tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 hf_transfer==0.1.9 msgspec==0.23.0 \
  structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0 wheel==0.48.0 certifi==2026.10.19.post1 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0

# drop members under the given prefixes from a wheel, and their lines from its RECORD
"$PY" - "$OUT" <<'EOF'
import pathlib, sys, zipfile

TRIM = {"unsloth-": ("studio/",),
        "bitsandbytes-": tuple(f"bitsandbytes/libbitsandbytes_{lib}" for lib in
                               ("cuda11", "cuda12", "rocm", "xpu"))}
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    drop = next((d for prefix, d in TRIM.items() if wheel.name.startswith(prefix)), None)
    if not drop:
        continue
    trimmed = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(drop):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(tuple(d.encode() for d in drop)))
            dst.writestr(item, data)
    trimmed.replace(wheel)
EOF

cat > "$OUT/install.sh" <<'EOF'
#!/usr/bin/env bash
# Use:  source OUTDIR/install.sh      (installs the wheels beside it into /tmp/site and exports PYTHONPATH)
D="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site "$D"/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
EOF
du -sh "$OUT"
