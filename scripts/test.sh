#!/usr/bin/env bash
# test.sh: `make test`. Installs dependencies, builds and installs eventshop,
# then runs every test as an unprivileged user: the pg_regress/pgTAP suite on
# a preloaded temporary instance, and the TAP tests (t/*.pl) that start their
# own clusters, dev Kafka broker and SMTP server.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

es_install_dependencies
es_build_and_install

run_dir=$(es_copy_tree_for_run_user)
trap 'rm -rf "$run_dir"' EXIT
echo "==> running the test suite in $run_dir as $(es_run_user)"
status=0
(cd "$run_dir" && es_as_run_user make installcheck PROVE_FLAGS='--timer') || status=$?
if [ "$status" != 0 ]; then
	# keep the evidence next to the sources
	rm -rf test-output && mkdir -p test-output
	cp -r "$run_dir"/regression.diffs "$run_dir"/results "$run_dir"/tmp_check/log test-output/ 2>/dev/null || true
	for f in "$run_dir"/regression.diffs "$run_dir"/tmp_check/log/regress_log_*; do
		[ -f "$f" ] && { echo "==> $f"; tail -n 80 "$f"; }
	done
	echo "==> tests FAILED (logs in test-output/)"
	exit "$status"
fi
echo "==> all tests passed"
