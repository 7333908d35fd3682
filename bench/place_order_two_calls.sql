-- place_order_two_calls.sql: the same order as place_order.sql, placed the
-- other way an application may: BEGIN, eventshop.authenticate(access_token),
-- eventshop.place_order(items), END (four round trips). Run it with
-- SCRIPT=place_order_two_calls.sql bash bench/orders_bench.sh.
\if :tok_ready = 0
SELECT access_token AS tok FROM bench_tokens WHERE client_id = :client_id \gset
\set tok_ready 1
\endif
\set p1 random(0, :nproducts - 1)
\set p2 (:p1 + random(1, :nproducts / 2 - 1)) % :nproducts
\set p3 (:p1 + random(:nproducts / 2, :nproducts - 1)) % :nproducts
\set q1 random(1, 3)
\set q2 random(1, 3)
\set q3 random(1, 3)
BEGIN;
SELECT user_id FROM eventshop.authenticate(:tok);
SELECT order_id, total_minor FROM eventshop.place_order(jsonb_build_array(
	jsonb_build_object('sku', 'B' || :p1::integer, 'quantity', :q1::integer),
	jsonb_build_object('sku', 'B' || :p2::integer, 'quantity', :q2::integer),
	jsonb_build_object('sku', 'B' || :p3::integer, 'quantity', :q3::integer)));
END;
