-- pgbench: issue one RS256 access token with realistic claims (bench/jwt_bench.sh)
\set n random(1, 100000000)
SELECT eventshop._jwt_sign(jsonb_build_object('iss', 'eventshop', 'aud', 'eventshop', 'sub', 'user-' || :n,
       'iat', 1700000000 + :n, 'nbf', 1700000000 + :n, 'exp', 1700000900 + :n, 'jti', 'j' || :n, 'sid', 's' || :n,
       'typ', 'access', 'roles', jsonb_build_array('customer')), 'RS256');
