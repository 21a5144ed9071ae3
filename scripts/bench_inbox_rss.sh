#!/usr/bin/env bash
# Peak RSS of one night (3 facts of the demo's night-01, covariance and anchor cached) with and
# without a 2 GiB sparse file in the inbox: the file must add nothing (it is hashed in chunks).
# Usage: bash scripts/bench_inbox_rss.sh [--repeat N] [--set SECTION.KEY=VALUE] [OTHER_TREE]
#   OTHER_TREE: a checkout of another commit (`git worktree add /tmp/before REV`, with ../shared
#   beside it), run with this venv; --set: also run this tree with that params.yaml value (e.g.
#   runtime.heap_trim_every_s=0). The variants take turns, N rounds, so they share the machine's state.
set -euo pipefail
REPEAT=1 SET="" OTHER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --repeat) REPEAT=$2; shift 2 ;;
    --set) SET=$2; shift 2 ;;
    *) OTHER=$1; shift ;;
  esac
done
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120  # beside other work the 20 s default can pass
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); bf16:" \
     "$(grep -o -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | xargs || echo none); $(nproc) cores"
echo "commit: $(git rev-parse --short HEAD)"
run() {  # run NAME TREE WITH_FILE [SECTION.KEY=VALUE]
  local d="/tmp/nas-rss-${1//[^a-zA-Z0-9]/_}" tree=$2
  rm -rf "$d"; mkdir -p "$d/inbox"
  .venv/bin/python - "$d" "$tree" "${4:-}" <<'PY'
import sys, yaml
d, tree, setting = sys.argv[1:]
p = yaml.safe_load(open(f"{tree}/params.yaml"))
if setting:
    key, value = setting.split("=", 1)
    section, field = key.split(".")
    p.setdefault(section, {})[field] = yaml.safe_load(value)
for k in ("inbox", "accepted", "quarantine", "checkpoints", "reports"):
    p["paths"][k] = f"{d}/{k}"
p["paths"]["ledger"] = f"{d}/ledger.jsonl"
p["tracking"]["uri"] = f"sqlite:///{d}/mlflow.db"
open(f"{d}/params.yaml", "w").write(yaml.safe_dump(p))
PY
  head -3 data/demo/batches/night-01.jsonl > "$d/inbox/night-a.jsonl"
  [ "$3" = yes ] && .venv/bin/python -c "open('$d/inbox/night-b.jsonl', 'wb').truncate(2 * 2**30)"
  (cd "$tree" && PYTHONPATH="$tree" PREFECT_HOME="$d/prefect" /usr/bin/time -v "$OLDPWD/.venv/bin/python" \
      -c "from flows.cli.app import app; app()" refresh --params "$d/params.yaml" > "$d/night.log" 2>&1) || true
  printf '%-52s peak RSS %6.0f MB, wall %s\n' "$1" \
      "$(awk '/Maximum resident/ {print $6 / 1024}' "$d/night.log")" "$(awk '/Elapsed/ {print $8}' "$d/night.log")"
}
for round in $(seq "$REPEAT"); do
  run "this tree, 2 GiB file" "$PWD" yes
  if [ -n "$SET" ]; then run "this tree + $SET, 2 GiB file" "$PWD" yes "$SET"; fi
  if [ -n "$OTHER" ]; then run "$(basename "$OTHER"), 2 GiB file" "$(cd "$OTHER" && pwd)" yes; fi
  if [ "$round" = 1 ]; then run "this tree, no file" "$PWD" no; fi
done
