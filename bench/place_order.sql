-- place_order.sql: one customer order of 3 distinct random products
-- (quantity 1-3 each), placed as an application places it: one call of
-- eventshop.place_order(access_token, items), which verifies the access
-- token exactly as eventshop.authenticate does and places the order, in one
-- round trip and one transaction (autocommit).
-- Used by bench/orders_bench.sh with -M prepared (string variables are sent
-- as parameters), -D nproducts=N (SKUs B0 .. B<N-1>) and -D tok_ready=0.
-- Each pgbench client fetches its own pre-issued access token once, on its
-- first transaction (bench_tokens, filled by the runner); the variable
-- lives as long as the client, so later transactions send it like a client
-- that keeps its token in memory.
\if :tok_ready = 0
SELECT access_token AS tok FROM bench_tokens WHERE client_id = :client_id \gset
\set tok_ready 1
\endif
-- three distinct products: p1 anywhere, p2 within the half after it, p3 in the other half
\set p1 random(0, :nproducts - 1)
\set p2 (:p1 + random(1, :nproducts / 2 - 1)) % :nproducts
\set p3 (:p1 + random(:nproducts / 2, :nproducts - 1)) % :nproducts
\set q1 random(1, 3)
\set q2 random(1, 3)
\set q3 random(1, 3)
SELECT order_id, total_minor FROM eventshop.place_order(:tok, jsonb_build_array(
	jsonb_build_object('sku', 'B' || :p1::integer, 'quantity', :q1::integer),
	jsonb_build_object('sku', 'B' || :p2::integer, 'quantity', :q2::integer),
	jsonb_build_object('sku', 'B' || :p3::integer, 'quantity', :q3::integer)));
