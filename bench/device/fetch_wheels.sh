#!/bin/sh
# Wheels a lent GPU machine needs (see README, "Figures from a GPU"): it has Python 3.12 with CUDA
# torch, transformers, accelerate, safetensors, Pillow and PyYAML, no network, and lacks the rest of
# previewd's needs or holds other versions. Fetched here at requirements.lock's versions into .whl/
# (ignored by git; the device tool carries it, within its 64 MiB).
#   sh bench/device/fetch_wheels.sh            # in the repository root
set -eu
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
NAMES="diffusers transformers huggingface_hub httpx2 httpcore2 truststore h11 peft optimum-quanto tokenizers
pydantic pydantic_core annotated-types typing-inspection typing_extensions SQLAlchemy alembic Mako watchdog
importlib_metadata lazy-importer"
rm -rf .whl && mkdir .whl
for name in $NAMES; do
    pin=$(grep -i -E "^${name}==" requirements.lock || true)
    [ -n "$pin" ] || { echo "$name: not in requirements.lock" >&2; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
du -sh .whl
