#!/bin/sh
# Instructions per request of bench/request_cost.py, under callgrind: two runs of different lengths,
# the difference divided by the difference in requests (start-up and set-up cancel out).
# usage: bench/callgrind_cost.sh STACK OP   (e.g. raw/file write); PYTHON defaults to .venv/bin/python
set -eu
py=${PYTHON:-.venv/bin/python}
run() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" bench/request_cost.py \
        --only "$1" --op "$2" --count "$3" --repeat 1 2>&1 | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
a=$(run "$1" "$2" 1000)
b=$(run "$1" "$2" 6000)
echo "$2 $1: $(( (b - a) / 5000 )) instructions/request"
