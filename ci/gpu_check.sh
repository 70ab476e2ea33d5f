#!/usr/bin/env bash
# The GPU host's whole check in one command (planned for 9 minutes on an H200): install the carried
# wheels, then `python3 ci/gpu_check.py` runs the gpu-marked tests, the benchmark suite with --gpu,
# the large spiking network, bytes per step against the roofline, memory at T = 1,000 and 10,000,
# and this package against the published braintrace when its wheels are carried; each part has a
# time budget. Results: $OUT (default ./gpu_out): gpu_check.json, gpu_check.log, one log per part,
# bench.json, measure.json, published.json and performance.md (docs/performance.md with this run's
# tables) with its plots.
#
#   bash ci/gpu_check.sh                     # on the GPU host, from a checkout with .whl/ beside it
#   bash ci/gpu_check.sh --smoke             # the same parts at tiny sizes on a CPU, under a minute
#   bash ci/gpu_check.sh --fetch-wheels      # on a machine with a package index: fill .whl/ first
#
# Wheels: .whl/*.whl (from ../shared/gpu/wheels.sh: this package's dependencies that the GPU host
# lacks) go to /tmp/site; .whl/published/*.whl (the published braintrace and the dependencies it
# adds) go to /tmp/pubsite and are used only by the published package's worker. The device tool
# must carry .whl (it is ignored by git). Extra arguments go to ci/gpu_check.py (e.g. --skip bench);
# $PYTHON (default python3) is the interpreter.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PUBLISHED_VERSION="${PUBLISHED_VERSION:-0.2.6}"
if [ "${1:-}" = "--fetch-wheels" ]; then
    shift
    bash ../shared/gpu/wheels.sh "$@" || exit 1
    # brainstate 0.6.0 imports typing_extensions, which a bare Python 3.12 with jax lacks
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl typing_extensions || exit 1
    # The published package and what it adds for Python 3.12; jax, numpy, scipy, matplotlib and tqdm
    # are on the GPU host already.
    mkdir -p .whl/published
    # jax is pinned to the GPU host's (its jaxlib wheel is tagged manylinux_2_27: without that
    # platform the resolver finds no jaxlib at all); both are removed below.
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl/published "braintrace==$PUBLISHED_VERSION" "jax==0.11.2" || exit 1
    (cd .whl/published && rm -f jax-* jaxlib-* numpy-* scipy-* matplotlib-* ml_dtypes-* opt_einsum-* \
        nvidia_* jax_cuda* contourpy-* fonttools-* kiwisolver-* pillow-* pyparsing-* cycler-* \
        python_dateutil-* six-* packaging-* tqdm-*)
    # brainstate, saiunit, brainunit, brainevent come from .whl/ at the versions this package runs with
    (cd .whl/published && rm -f brainstate-* saiunit-* brainunit-* brainevent-* array_api_compat-*)
    ls -1 .whl/published
    exit 0
fi

SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"

if [ "$SMOKE" = 0 ]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
            .whl/*.whl || { echo "installing .whl/*.whl failed" >&2; exit 1; }
        export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no .whl/*.whl: using the installed packages" >&2
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if compgen -G ".whl/published/*.whl" > /dev/null && [ -z "${PUBLISHED_PYTHON:-}" ]; then
        if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pubsite \
            .whl/published/*.whl; then
            export PUBLISHED_PYTHON=python3 PUBLISHED_PYTHONPATH=/tmp/pubsite
        else
            echo "installing .whl/published/*.whl failed: the published comparison is skipped" >&2
        fi
    fi
fi
exec "${PYTHON:-python3}" ci/gpu_check.py "$@"
