#!/usr/bin/env bash
# The whole default pipeline, as a user runs it: SFT, the DiPO loop (rollout.py && dipo.py,
# talking only through files in the run directory), then held-out accuracy of the SFT policy
# and the final policy side by side. Killed at any moment, the same command picks up where it
# stopped (each stage writes atomically and resumes; see README, "Resume").
#
#   bash demo.sh                       # runs/arith, the defaults
#   RUN=runs/s1 SEED=1 bash demo.sh    # another seed
#   STEPS=5 EVAL_EVERY=0 bash demo.sh  # a shorter loop, held-out accuracy only at both ends
#   TASK=teacher bash demo.sh          # RL where the demonstrations run out (README, "When
#                                      # demonstrations run out"): SFT on 1,000 worked solutions
#                                      # of an imperfect teacher to its plateau, then MINUTES of
#                                      # the loop against the same minutes of more SFT (the
#                                      # control, in ${RUN}_control); TASK=scarce: the same with
#                                      # correct solutions
#
# Any other stage flags go through SFT_ARGS, ROLLOUT_ARGS, DIPO_ARGS and EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")"
TASK=${TASK:-arith}
case "$TASK" in
  arith) RUN=${RUN:-runs/arith}; SFT_DATA=data/arith_sft.jsonl; SFT_STEPS=2000
    STEPS=${STEPS:-90}; MINUTES=${MINUTES:-0} ;;
  scarce) RUN=${RUN:-runs/scarce}; SFT_DATA=data/arith_scarce_sft.jsonl; SFT_STEPS=3000
    STEPS=${STEPS:-100000}; MINUTES=${MINUTES:-30} ;;
  teacher) RUN=${RUN:-runs/teacher}; SFT_DATA=data/arith_scarce_teacher_sft.jsonl; SFT_STEPS=3000
    STEPS=${STEPS:-100000}; MINUTES=${MINUTES:-30} ;;
  *) echo "demo.sh: TASK=$TASK: choose arith, scarce or teacher" >&2; exit 2 ;;
esac
SEED=${SEED:-0}
EVAL_EVERY=${EVAL_EVERY:-20}  # held-out accuracy every this many steps (0 = only before and after)
THREADS=${THREADS:-0}         # torch CPU threads (0 = torch's default)
TEST=${TEST:-data/arith_test.jsonl}
common="--threads $THREADS"

step() { sed 's/step_0*//; s/^$/0/' "$RUN/policy/latest"; }
loop_seconds() { cat "$RUN/loop_seconds" 2>/dev/null || echo 0; }
out_of_time() { [ "$MINUTES" -gt 0 ] && [ "$(loop_seconds)" -ge $((MINUTES * 60)) ]; }

held_out() {  # sample the test split with the policy dir $1, into $2, then grade it into run $3's metrics
  python rollout.py --policy "$1" --data "$TEST" --num-prompts 0 --out "$2" --seed "$SEED" $common ${EVAL_ARGS:-}
  grep -q "$2\"" "$3/metrics.jsonl" 2>/dev/null || python eval.py "$2" --run "$3" > /dev/null
}
sft() {  # SFT into run $1 (done if it has a policy, resumed if it has a save, else started)
  local run=$1 resume=; shift
  [ ! -f "$run/policy/latest" ] || return 0
  [ ! -d "$run/sft" ] || resume=--resume
  python sft.py --run "$run" --data "$SFT_DATA" --seed "$SEED" $resume $common "$@" ${SFT_ARGS:-}
}

# 1. SFT (long enough on the 1,000 solutions to reach the plateau: the held-out curve every 100 steps)
sft "$RUN" --steps "$SFT_STEPS" --eval-every 100
# 2. the loop, with held-out accuracy at step 0, every EVAL_EVERY steps and at the end (each
#    checked at the top, so a kill between an update and its evaluation loses nothing);
#    dipo.py exits 3 when no group had a learning signal (policy carried over). The loop's
#    own seconds (rollout.py and dipo.py, not the evaluations) add up in $RUN/loop_seconds.
while :; do
  k=$(step)
  if [ "$k" -eq 0 ] || [ "$k" -ge "$STEPS" ] || out_of_time || { [ "$EVAL_EVERY" -gt 0 ] && [ $((k % EVAL_EVERY)) -eq 0 ]; }; then
    held_out "$RUN/policy/$(printf step_%06d "$k")" "$RUN/eval/$(printf step_%06d "$k").jsonl" "$RUN"
  fi
  [ "$k" -lt "$STEPS" ] && ! out_of_time || break
  start=$SECONDS
  python rollout.py --run "$RUN" --seed "$SEED" $common ${ROLLOUT_ARGS:-}
  python dipo.py --run "$RUN" --seed "$SEED" $common ${DIPO_ARGS:-} || [ $? -eq 3 ]
  echo $(($(loop_seconds) + SECONDS - start)) > "$RUN/loop_seconds.tmp" && mv "$RUN/loop_seconds.tmp" "$RUN/loop_seconds"
done
last=$(printf "$RUN/eval/step_%06d.jsonl" "$k")

# 3. before and after side by side; for the 1,000-solution tasks, also the control: from the same SFT
#    policy, the loop's minutes spent on more SFT on the same demonstrations, at SFT's last lr
if [ "$TASK" = arith ]; then
  python eval.py "$RUN/eval/step_000000.jsonl" "$last"
  exit 0
fi
control=${RUN}_control
minutes=$(awk -v s="$(loop_seconds)" 'BEGIN { print (s > 0.6 ? s / 60 : 0.01) }')
sft "$control" --model "$RUN/policy/step_000000" --steps 1000000 --minutes "$minutes" --lr 2e-4 \
  --warmup-steps 0 --min-lr-ratio 1 --eval-every 100
held_out "$control/policy/step_000000" "$control/eval/more_sft.jsonl" "$control"
echo "held-out, $TASK task: the SFT policy, the loop after $minutes minutes, more SFT for as long"
python eval.py "$RUN/eval/step_000000.jsonl" "$last" "$control/eval/more_sft.jsonl"
