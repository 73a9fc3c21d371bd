#!/usr/bin/env bash
# What can be checked without a Docker engine: that the Dockerfile's `pip install -c <image constraints> .`
# resolves, i.e. nemo_toolkit[asr], lhotse and the plugin install around a frozen torch and megatron-core.
# Usage: docker/check-deps.sh [TORCH_VERSION] [MCORE_VERSION]   (defaults: the versions the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
torch_v=${1:-$($py -c 'from importlib.metadata import version as v; print(v("torch").split("+")[0])')}
mcore_v=${2:-$($py -c 'from importlib.metadata import version as v; print(v("megatron-core").split("+")[0])')}
c=$(mktemp)
printf 'torch==%s\nmegatron-core==%s\n' "$torch_v" "$mcore_v" > "$c"
echo "image constraints: torch==$torch_v megatron-core==$mcore_v"
r=$(mktemp); e=$(mktemp); trap 'rm -f "$c" "$r" "$e"' EXIT
if ! $py -m pip install --dry-run --ignore-installed --quiet --report "$r" -c "$c" -e '.[test]' 2>"$e"; then
  grep -v '^WARNING: Location' "$e" | tail -n 15 >&2
  echo "FAIL: the plugin's requirements do not install around torch==$torch_v megatron-core==$mcore_v" >&2
  exit 1
fi
$py - "$r" <<'PY'
import json, sys
got = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
keys = ("torch", "megatron-core", "nemo-toolkit", "lhotse", "lightning", "hydra-core", "omegaconf", "transformers")
print("OK, resolves to:", ", ".join(f"{k}=={got[k]}" for k in keys if k in got))
PY
