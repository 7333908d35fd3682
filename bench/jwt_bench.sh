#!/usr/bin/env bash
# jwt_bench.sh: JWT issuance and verification per second through SQL, for
# RS256, ES256 and EdDSA, beside `openssl speed` for the same algorithms in
# the same run. Starts a throwaway cluster (as user postgres when run as
# root), runs pgbench -c 2 -j 2 -T 10 -n -M prepared per case, prints a
# table, and stops the cluster. Uses the installed extension (make install).
#
#   bash bench/jwt_bench.sh            # all cases, 10 s each
#   DURATION=5 bash bench/jwt_bench.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

DURATION=${DURATION:-10}
CLIENTS=2
bench_start_cluster "shared_buffers = 128MB"
echo "==> cluster in $BENCH_WORK (port $PGPORT)"
bench_psql -c "SELECT eventshop.rotate_signing_keys(a) FROM unnest(ARRAY['RS256', 'ES256', 'EdDSA']) a" >/dev/null

declare -A sql_rate ossl_rate
claims="jsonb_build_object('iss', 'eventshop', 'aud', 'eventshop', 'sub', 'user-1', 'iat', 1700000000, 'nbf', 1700000000, 'exp', 4102444800, 'jti', 'j1', 'sid', 's1', 'typ', 'access', 'roles', jsonb_build_array('customer'))"


# openssl's sign and verify rates for one algorithm ("RS256" ...), added to
# the named array: `openssl speed -seconds 5 -multi 2 <rsa2048|ecdsap256|ed25519>`.
openssl_baseline() {
	local alg=$1
	local -n into=$2
	local name pattern speed
	case $alg in
		RS256) name=rsa2048 pattern='^rsa 2048 bits' ;;
		ES256) name=ecdsap256 pattern='ecdsa \(nistp256\)' ;;
		EdDSA) name=ed25519 pattern='EdDSA \(Ed25519\)' ;;
	esac
	echo "==> openssl speed -seconds 5 -multi $CLIENTS $name"
	speed=$(openssl speed -seconds 5 -multi "$CLIENTS" "$name" 2>/dev/null)
	read -r into[$alg-sign] into[$alg-verify] <<<"$(echo "$speed" | awk "/$pattern/ {print \$(NF-1), \$NF}")"
}

# The machine may be shared, so each algorithm's openssl baseline is taken
# right before and right after its SQL runs, and the two are averaged (both
# are printed: far apart means a busy machine, so rerun).
declare -A ossl_before ossl_after
for alg in RS256 ES256 EdDSA; do
	lower=$(echo "$alg" | tr 'A-Z' 'a-z')
	openssl_baseline "$alg" ossl_before
	echo "==> $alg issuance"
	sql_rate[$alg-sign]=$(bench_pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -f "$here/jwt_sign_$lower.sql")
	token=$(bench_psql -c "SELECT eventshop._jwt_sign($claims, '$alg')")
	bench_psql -c "SELECT eventshop._jwt_verify('$token')->>'sub'" >/dev/null
	echo "==> $alg verification"
	sql_rate[$alg-verify]=$(bench_pgbench -n -M prepared -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" -f "$here/jwt_verify.sql" -D token="$token")
	openssl_baseline "$alg" ossl_after
done
for key in "${!ossl_before[@]}"; do
	ossl_rate[$key]=$(awk -v a="${ossl_before[$key]}" -v b="${ossl_after[$key]}" 'BEGIN {print (a + b) / 2}')
done

# In-backend cost per call, without the client round trip: one statement
# signing or verifying many times on one core.
echo "==> per-call cost inside one backend"
declare -A backend_us
# Prints microseconds per call of a statement that makes n calls.
per_call_us() {
	local n=$1 sql=$2 t0 t1
	t0=$(date +%s%N)
	bench_psql -c "$sql" >/dev/null
	t1=$(date +%s%N)
	awk -v d=$((t1 - t0)) -v n="$n" 'BEGIN {printf "%.1f", d / 1000 / n}'
}
for alg in RS256 ES256 EdDSA; do
	n=$([ "$alg" = RS256 ] && echo 1000 || echo 10000)
	backend_us[$alg-sign]=$(per_call_us "$n" "SELECT count(eventshop._jwt_sign($claims, '$alg')) FROM generate_series(1, $n)")
	token=$(bench_psql -c "SELECT eventshop._jwt_sign($claims, '$alg')")
	backend_us[$alg-verify]=$(per_call_us 10000 "SELECT count(eventshop._jwt_verify(t.tok)) FROM (SELECT '$token'::text AS tok OFFSET 0) t, generate_series(1, 10000)")
done

echo
echo "JWT through SQL (pgbench -M prepared -c $CLIENTS -j $CLIENTS -T $DURATION) vs openssl speed -multi $CLIENTS, $(nproc) CPUs"
printf '%-22s %10s %14s %7s %12s   %s\n' case 'SQL /s' 'openssl /s' ratio 'backend us' target
for alg in RS256 ES256 EdDSA; do
	for op in sign verify; do
		key=$alg-$op
		case $key in
			RS256-sign) target='ratio >= 0.90' ;;
			EdDSA-sign) target='SQL >= 10000/s' ;;
			RS256-verify) target='SQL >= 15000/s' ;;
			*) target='' ;;
		esac
		label="$alg $([ $op = sign ] && echo issuance || echo verification)"
		printf '%-22s %10.0f %14.0f %7.2f %12s   %s\n' "$label" "${sql_rate[$key]}" "${ossl_rate[$key]}" \
			"$(awk -v a="${sql_rate[$key]}" -v b="${ossl_rate[$key]}" 'BEGIN {print (b > 0 ? a / b : 0)}')" "${backend_us[$key]}" \
			"$target (openssl before/after: ${ossl_before[$key]%.*}/${ossl_after[$key]%.*})"
	done
done
echo "openssl /s is the total of $CLIENTS processes, so ratio = SQL rate / openssl rate for the same $CLIENTS cores."
echo "backend us: microseconds per call inside one backend (one statement calling it in a loop, one core)."
