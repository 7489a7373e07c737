#!/usr/bin/env bash
# A node of the small node-loss job (tests/test_multinode.py): launch/multinode.sh's torchrun (the c10d
# rendezvous, through launch/torchrun_wrapper.py) with tests/support/node_worker.py in tools/train.py's place.
source "$(dirname "$0")/../../launch/multinode.sh"
run_torchrun tests/support/node_worker.py "$@"
