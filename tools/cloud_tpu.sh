#!/usr/bin/env bash
# Trains hhjax on a Cloud TPU VM (one host) or a multi-host TPU slice, resuming after preemption.
#
#   tools/cloud_tpu.sh [--dry-run] [OPTIONS] STEP... [-- MAIN_PY_FLAGS...]
#
# STEPs, in the order of a run: create, install, data, train, tensorboard, delete; `all` is
# create install data train. --dry-run prints the commands of the steps instead of running them:
# the README's runbook is that output, and tests/test_runbook.py keeps the two the same.
#
#   create       a spot TPU through a queued resource, then waits until it is ACTIVE
#   install      this repository (git HEAD) on every host, Python 3.11, requirements + jax[tpu]
#   data         the data and weights into the bucket: TFDS prepared there by host 0, or an image
#                folder copied there (--data=DIR); a local Keras .h5 copied there (--weights=FILE)
#   train        main.py on every host at once, workdir in the bucket. Repeated while the run
#                ends with exit status 3 (preempted: it checkpointed) or 4 (a host was lost), or a
#                host stops answering; a TPU that was preempted is deleted, created again and
#                installed first. Exit status 0 ends the loop, and so does 2 (a mistake to fix).
#   tensorboard  TensorBoard over the bucket's runs (from this machine)
#   delete       deletes the TPU and its queued resource
#
# Options (or the environment variables named):
#   --project=ID           HHJAX_PROJECT        (required)
#   --zone=ZONE            HHJAX_ZONE           (required)
#   --bucket=NAME          HHJAX_BUCKET         (required) everything goes to gs://NAME/hhjax/
#   --name=NAME            HHJAX_TPU_NAME       default hhjax
#   --accelerator-type=T   HHJAX_ACCELERATOR    default v5litepod-8 (one host); v4-32 is 4 hosts
#   --runtime-version=V    HHJAX_RUNTIME        default: the TPU software for the accelerator
#   --run=NAME             HHJAX_RUN            default default: the workdir gs://BUCKET/hhjax/runs/NAME
#   --config=FILE          HHJAX_CONFIG         default configs/default.py
#   --data=tfds|DIR        HHJAX_DATA           default tfds (horses_or_humans); DIR: an image folder
#   --validation-split=S   HHJAX_VALIDATION_SPLIT  default validation (with --data=DIR: the folder's
#                          split that chooses; no test split unless the flags after -- name one)
#   --weights=FILE.h5      HHJAX_WEIGHTS        default: none ('imagenet', downloaded on each host)
#   --on-demand            HHJAX_SPOT=0         an on-demand TPU instead of a spot one
#   --attempts=N           HHJAX_ATTEMPTS       default 20: train runs at most N times
#                          HHJAX_RETRY_PAUSE_S  default 10: seconds between two attempts
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

DRY_RUN=0
PROJECT=${HHJAX_PROJECT:-}
ZONE=${HHJAX_ZONE:-}
BUCKET=${HHJAX_BUCKET:-}
NAME=${HHJAX_TPU_NAME:-hhjax}
ACCELERATOR=${HHJAX_ACCELERATOR:-v5litepod-8}
RUNTIME=${HHJAX_RUNTIME:-}
RUN=${HHJAX_RUN:-default}
CONFIG=${HHJAX_CONFIG:-configs/default.py}
DATA=${HHJAX_DATA:-tfds}
VALIDATION_SPLIT=${HHJAX_VALIDATION_SPLIT:-${HHJAX_EVAL_SPLIT:-validation}}
WEIGHTS=${HHJAX_WEIGHTS:-}
SPOT=${HHJAX_SPOT:-1}
ATTEMPTS=${HHJAX_ATTEMPTS:-20}
PAUSE=${HHJAX_RETRY_PAUSE_S:-10}
STEPS=()
EXTRA=()

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --project=*) PROJECT=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --bucket=*) BUCKET=${1#*=} ;;
    --name=*) NAME=${1#*=} ;;
    --accelerator-type=*) ACCELERATOR=${1#*=} ;;
    --runtime-version=*) RUNTIME=${1#*=} ;;
    --run=*) RUN=${1#*=} ;;
    --config=*) CONFIG=${1#*=} ;;
    --data=*) DATA=${1#*=} ;;
    --validation-split=*|--eval-split=*) VALIDATION_SPLIT=${1#*=} ;;
    --weights=*) WEIGHTS=${1#*=} ;;
    --on-demand) SPOT=0 ;;
    --attempts=*) ATTEMPTS=${1#*=} ;;
    -h|--help) usage ;;
    --) shift; EXTRA=("$@"); break ;;
    create|install|data|train|tensorboard|delete) STEPS+=("$1") ;;
    all) STEPS+=(create install data train) ;;
    *) echo "error: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done

fail() { echo "error: $*" >&2; exit 2; }
((${#STEPS[@]})) || fail 'no step given: create, install, data, train, tensorboard, delete or all'
[[ -n $PROJECT ]] || fail 'the Google Cloud project is missing: --project=ID (or HHJAX_PROJECT)'
[[ -n $ZONE ]] || fail 'the zone is missing: --zone=ZONE (or HHJAX_ZONE)'
[[ -n $BUCKET ]] || fail 'the bucket is missing: --bucket=NAME (or HHJAX_BUCKET)'
if [[ -z $RUNTIME ]]; then
  case "$ACCELERATOR" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) fail "no default TPU software for $ACCELERATOR: give --runtime-version" ;;
  esac
fi

STORE=gs://$BUCKET/hhjax
WORKDIR=$STORE/runs/$RUN
WHERE="--project=$PROJECT --zone=$ZONE"
SSH="gcloud compute tpus tpu-vm ssh $NAME --worker=all $WHERE"

# main.py's flags: the config, the workdir, and where the data and weights are in the bucket.
TRAIN_FLAGS="--config=$CONFIG --workdir=$WORKDIR"
if [[ $DATA == tfds ]]; then
  TRAIN_FLAGS+=" --config.data.dir=$STORE/tensorflow_datasets"
else
  TRAIN_FLAGS+=" --config.data.source=folder --config.data.dir=$STORE/data/$(basename "$DATA")"
  TRAIN_FLAGS+=" --config.data.validation_split=$VALIDATION_SPLIT --config.data.test_split=None"
fi
[[ -z $WEIGHTS ]] || TRAIN_FLAGS+=" --config.model.pretrained=$STORE/weights/$(basename "$WEIGHTS")"
((${#EXTRA[@]} == 0)) || TRAIN_FLAGS+=" ${EXTRA[*]}"

# Each command is one line of shell: printed as it is by --dry-run, run by bash otherwise.
run() {
  if ((DRY_RUN)); then
    echo "$1"
  else
    echo "+ $1" >&2
    bash -c "$1"
  fi
}

step_create() {
  run "gcloud compute tpus queued-resources create $NAME --node-id=$NAME $WHERE\
 --accelerator-type=$ACCELERATOR --runtime-version=$RUNTIME$( ((SPOT)) && echo ' --spot')"
  run "until [ \"\$(gcloud compute tpus queued-resources describe $NAME $WHERE\
 --format='value(state.state)')\" = ACTIVE ]; do sleep 30; done"
}

step_install() {
  run "git archive --format=tar.gz --output=/tmp/hhjax.tar.gz HEAD"
  run "gcloud compute tpus tpu-vm scp /tmp/hhjax.tar.gz $NAME:hhjax.tar.gz --worker=all $WHERE"
  run "$SSH --command='set -e; sudo add-apt-repository -y ppa:deadsnakes/ppa;\
 sudo apt-get -qq update; sudo apt-get -qq install -y python3.11-venv;\
 rm -rf hhjax; mkdir hhjax; tar -xzf hhjax.tar.gz -C hhjax; python3.11 -m venv hhjax/.venv;\
 hhjax/.venv/bin/pip install -q -r hhjax/requirements.txt \"jax[tpu]==0.10.2\"'"
}

step_data() {
  if [[ $DATA == tfds ]]; then   # prepared once, by one host, before the hosts read it
    run "gcloud compute tpus tpu-vm ssh $NAME --worker=0 $WHERE\
 --command='hhjax/.venv/bin/tfds build horses_or_humans --data_dir=$STORE/tensorflow_datasets'"
  else
    run "gcloud storage cp -r $DATA $STORE/data/"
  fi
  [[ -z $WEIGHTS ]] || run "gcloud storage cp $WEIGHTS $STORE/weights/"
}

TRAIN_COMMAND="$SSH --command='cd hhjax && .venv/bin/python main.py $TRAIN_FLAGS;\
 echo \"hhjax exit status \$?\"'"

queued_state() {
  gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format='value(state.state)' 2>/dev/null || echo MISSING
}

hosts() {
  gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' '\n' | grep -c .
}

step_train() {
  if ((DRY_RUN)); then
    run "$TRAIN_COMMAND"
    return
  fi
  local attempt log statuses count expected
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    if [[ $(queued_state) != ACTIVE ]]; then   # preempted (SUSPENDED, FAILED) or deleted
      echo "The TPU $NAME is not ACTIVE: creating it again." >&2
      [[ $(queued_state) == MISSING ]] || run "gcloud compute tpus queued-resources delete\
 $NAME $WHERE --force --quiet"
      step_create
      step_install
    fi
    expected=$(hosts)
    log=$(mktemp)
    run "$TRAIN_COMMAND" 2>&1 | tee "$log" || true
    statuses=$( (grep -oE 'hhjax exit status [0-9]+' "$log" || true) | awk '{print $4}' |
               sort -n | xargs)
    rm -f "$log"
    count=$(wc -w <<<"$statuses")
    echo "Attempt $attempt: exit statuses ${statuses:-none} ($count of $expected hosts)." >&2
    if ((count == expected)) && [[ -z ${statuses//[0 ]/} ]]; then
      echo "Training finished: $WORKDIR" >&2
      return 0
    fi
    if [[ " $statuses " == *" 2 "* ]]; then
      fail "main.py stopped with a mistake to fix (exit status 2): see its error above."
    fi
    # 3: preempted after a checkpoint; 4: a host was lost; none: a host's connection dropped.
    echo "Resuming from the last checkpoint in $WORKDIR." >&2
    sleep "$PAUSE"
  done
  fail "training did not finish in $ATTEMPTS attempts (--attempts=N allows more)."
}

step_tensorboard() {
  run "tensorboard --logdir=$STORE/runs"
}

step_delete() {
  run "gcloud compute tpus queued-resources delete $NAME $WHERE --force --quiet"
}

if ((!DRY_RUN)); then
  cd "$(dirname "$0")/.."   # git archive and the relative paths are the repository's
fi
for step in "${STEPS[@]}"; do
  "step_$step"
done
