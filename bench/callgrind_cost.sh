#!/bin/sh
# Instructions per request of bench/request_cost.py, under callgrind: two runs of different lengths,
# the difference divided by the difference in requests (start-up and set-up cancel out).
# usage: bench/callgrind_cost.sh STACK OP [ARGS...]   (e.g. raw/file write --through server --batch 16);
# ARGS go to request_cost.py.  PYTHON defaults to .venv/bin/python
set -eu
py=${PYTHON:-.venv/bin/python}
stack=$1 op=$2
shift 2
run() {
    n=$1
    shift
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" bench/request_cost.py \
        --only "$stack" --op "$op" --count "$n" --repeat 1 "$@" 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(run 1008 "$@")
b=$(run 6048 "$@")
echo "$op $stack $*: $(( (b - a) / 5040 )) instructions/request"
