#!/usr/bin/env bash
# The whole default pipeline, as a user runs it: SFT, the DiPO loop (rollout.py && dipo.py,
# talking only through files in the run directory), then held-out accuracy of the SFT policy
# and the final policy side by side. Killed at any moment, the same command picks up where it
# stopped (each stage writes atomically and resumes; see README, "Resume").
#
#   bash demo.sh                       # runs/arith, the defaults
#   RUN=runs/s1 SEED=1 bash demo.sh    # another seed
#   STEPS=5 EVAL_EVERY=0 bash demo.sh  # a shorter loop, held-out accuracy only at both ends
#
# Any other stage flags go through SFT_ARGS, ROLLOUT_ARGS, DIPO_ARGS and EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")"
RUN=${RUN:-runs/arith}
SEED=${SEED:-0}
STEPS=${STEPS:-90}            # DiPO steps (what one costs: the README's "Speed")
EVAL_EVERY=${EVAL_EVERY:-20}  # held-out accuracy every this many steps (0 = only before and after)
THREADS=${THREADS:-0}         # torch CPU threads (0 = torch's default)
TEST=${TEST:-data/arith_test.jsonl}
common="--threads $THREADS"

step() { sed 's/step_0*//; s/^$/0/' "$RUN/policy/latest"; }

held_out() {  # sample the test split with policy step $1, then grade it into metrics.jsonl
  local name; name=$(printf "step_%06d" "$1")
  python rollout.py --policy "$RUN/policy/$name" --data "$TEST" --num-prompts 0 --out "$RUN/eval/$name.jsonl" \
    --seed "$SEED" $common ${EVAL_ARGS:-}
  grep -q "/eval/$name.jsonl\"" "$RUN/metrics.jsonl" 2>/dev/null ||
    python eval.py "$RUN/eval/$name.jsonl" --run "$RUN" > /dev/null
}

# 1. SFT: done if the run has a policy, resumed if it has a save, else started
if [ ! -f "$RUN/policy/latest" ]; then
  if [ -d "$RUN/sft" ]; then resume=--resume; else resume=; fi
  python sft.py --run "$RUN" --seed "$SEED" $resume $common ${SFT_ARGS:-}
fi
# 2. the loop, with held-out accuracy at step 0, every EVAL_EVERY steps and at the end (each
#    checked at the top, so a kill between an update and its evaluation loses nothing);
#    dipo.py exits 3 when no group had a learning signal (policy carried over)
while :; do
  k=$(step)
  if [ "$k" -eq 0 ] || [ "$k" -ge "$STEPS" ] || { [ "$EVAL_EVERY" -gt 0 ] && [ $((k % EVAL_EVERY)) -eq 0 ]; }; then
    held_out "$k"
  fi
  [ "$k" -lt "$STEPS" ] || break
  python rollout.py --run "$RUN" --seed "$SEED" $common ${ROLLOUT_ARGS:-}
  python dipo.py --run "$RUN" --seed "$SEED" $common ${DIPO_ARGS:-} || [ $? -eq 3 ]
done

# 3. before and after, side by side
python eval.py "$RUN/eval/step_000000.jsonl" "$(printf "$RUN/eval/step_%06d.jsonl" "$k")"
