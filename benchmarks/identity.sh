#!/usr/bin/env bash
# Same seeds, same bytes: a short demo.sh run plus loop steps with the non-default settings,
# then the sha256 of every rollout file and every weight file. Run it at two commits and
# diff the outputs: a restructuring that changes no behaviour prints the same hashes.
#
#   bash benchmarks/identity.sh /tmp/id_new > new.txt   (about 20 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/identity.sh OUT_DIR}
rm -rf "$OUT"
export THREADS=1 EVAL_EVERY=0

# 1. a short demo: 300 SFT steps, 3 loop steps, held-out accuracy at both ends (2 samples per prompt)
RUN=$OUT/demo STEPS=3 SFT_ARGS="--steps 300 --save-every 150" ROLLOUT_ARGS="--num-prompts 64" \
  EVAL_ARGS="--group-size 2" bash demo.sh > "$OUT.demo.log"

# 2. two loop steps per setting, each from the demo's SFT policy
variant() {  # name, rollout flags, dipo flags
  local run=$OUT/$1
  mkdir -p "$run/policy"
  cp -r "$OUT/demo/policy/step_000000" "$run/policy/"
  echo step_000000 > "$run/policy/latest"
  for _ in 1 2; do
    python rollout.py --run "$run" --threads 1 --num-prompts 64 $2 > /dev/null
    python dipo.py --run "$run" --threads 1 $3 > /dev/null || [ $? -eq 3 ]
  done
}
variant beta "" "--beta 0.01"
variant epochs "" "--ppo-epochs 2"
variant exact "" "--estimator exact --diagnostics"
variant sequence "" "--loss-norm sequence"
variant dynamic "--dynamic-sampling --max-sample-rounds 2" ""

cd "$OUT"
find . \( -name '*.jsonl' ! -name metrics.jsonl \) -o -name '*.safetensors' | sort | xargs sha256sum
