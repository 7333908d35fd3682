-- pgbench: verify one pre-signed token passed as -D token=... (bench/jwt_bench.sh)
SELECT eventshop._jwt_verify(:token);
