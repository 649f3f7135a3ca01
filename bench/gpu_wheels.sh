#!/usr/bin/env bash
# On the CPU machine, before a GPU session: put in the git-ignored .whl/ the wheels of what the GPU host lacks
# (it has torch, transformers, triton, pytest, but no deepspeed, megatron-core, pydantic, ... and no package index:
# ../shared/notes/gpu-h200.md). Versions = this venv's; Python 3.12 manylinux wheels (the GPU host's Python).
#
#   bash bench/gpu_wheels.sh            # then: device `run` with carry [".whl"] (docs/benchmarks.md, "GPU session")
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
specs=()
for name in megatron-core webdataset braceexpand orjson pydantic pydantic_core annotated-types typing-inspection \
            hjson zstandard torchao; do
  specs+=("$name==$(version "$name")")
done
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "${specs[@]}"
# deepspeed has no wheel on PyPI (an sdist): the wheel pip built when it installed deepspeed here, else build one
# without build isolation (isolation would pull a CUDA torch into the build environment).
ds="deepspeed==$(version deepspeed)"
cached=$(find ~/.cache/pip -name "deepspeed-$(version deepspeed)-*.whl" 2>/dev/null | head -1)
if [ -n "$cached" ]; then cp "$cached" .whl/; else pip wheel -q --no-deps --no-build-isolation -w .whl "$ds"; fi
ls -la .whl
du -sh .whl
