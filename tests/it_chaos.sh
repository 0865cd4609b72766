#!/bin/sh
# The short form of the standing chaos test (tests/chaos.sh, `make chaos`):
# 80 steps under 6 worker SIGKILLs, 2 server SIGKILLs with resume and the
# rogue peer, on a new seed each run (printed, with how to replay it),
# bit-identical to `peftps train`. Needs build/tests/chaos_rogue (`make test`
# builds it).
exec sh tests/chaos.sh --steps 80 --worker-kills 6 --server-kills 2 --timeout 120 "$@"
