-- 60_orders: catalog, inventory, cart, orders, payments and the admin
-- reports, as an application (eventshop_app), the payment gateway
-- (eventshop_gateway) and operators (eventshop_admin) call them: every
-- function, every order status transition (allowed and refused), and the bad
-- input of the issue (unknown SKU, bad quantities, empty orders, someone
-- else's order, paying a cancelled or expired order, double payment, price or
-- stock smuggled in through JSON), each refused with its SQLSTATE, with
-- nothing written and no event emitted.
-- Runs after 00..50 in the same database; creates and drops its own roles.
-- Order ids, timestamps and tokens are random: they are only compared, never
-- printed.
\set VERBOSITY terse
\set ON_ERROR_STOP 0
\pset format unaligned
\pset tuples_only on

SELECT plan(315);

CREATE ROLE regress_orders_app NOLOGIN IN ROLE eventshop_app;
CREATE ROLE regress_orders_gw NOLOGIN IN ROLE eventshop_gateway;
CREATE ROLE regress_orders_ops NOLOGIN IN ROLE eventshop_admin;
CREATE SCHEMA regress_orders;
GRANT USAGE ON SCHEMA regress_orders TO PUBLIC;

-- The error a statement raises, as 'SQLSTATE: message', with ' / detail'
-- appended when asked for.
CREATE FUNCTION regress_orders.error_of(sql text, with_detail boolean DEFAULT false) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_state text; v_message text; v_detail text;
BEGIN
	EXECUTE sql;
	RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE, v_message = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL;
	RETURN v_state || ': ' || v_message || CASE WHEN with_detail THEN ' / ' || v_detail ELSE '' END;
END
$$;
-- The error of place_order(access_token, items), with its detail.
CREATE FUNCTION regress_orders.place_order_error(access_token text, items text) RETURNS text LANGUAGE sql AS $$
	SELECT regress_orders.error_of(format('SELECT eventshop.place_order(%L, %L)', access_token, items), true)
$$;
-- Test-only peeks at the tables, usable under SET ROLE (the tables are
-- closed to the application roles).
CREATE FUNCTION regress_orders.stock(sku text) RETURNS text LANGUAGE sql SECURITY DEFINER AS $$
	SELECT p.stock_on_hand || '/' || p.reserved FROM eventshop.products p WHERE p.sku = stock.sku
$$;
CREATE FUNCTION regress_orders.outbox_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER AS $$
	SELECT count(*) FROM eventshop.outbox WHERE topic IN ('orders.events', 'payments.events')
$$;
CREATE FUNCTION regress_orders.row_counts() RETURNS text LANGUAGE sql SECURITY DEFINER AS $$
	SELECT format('orders %s, lines %s, payments %s, products %s, events %s',
				  (SELECT count(*) FROM eventshop.orders), (SELECT count(*) FROM eventshop.order_items),
				  (SELECT count(*) FROM eventshop.payments), (SELECT count(*) FROM eventshop.products),
				  regress_orders.outbox_count())
$$;
CREATE FUNCTION regress_orders.order_status(id uuid) RETURNS text LANGUAGE sql SECURITY DEFINER AS $$
	SELECT o.status FROM eventshop.orders o WHERE o.id = order_status.id
$$;
CREATE FUNCTION regress_orders.last_event(order_id uuid) RETURNS text LANGUAGE sql SECURITY DEFINER AS $$
	SELECT o.event_type FROM eventshop.outbox o WHERE o.message_key = order_id::text ORDER BY o.id DESC LIMIT 1
$$;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA regress_orders TO PUBLIC;

-- Accounts: two customers and an administrator, each with an access token
-- (signed by a fresh key, so that this file also runs right after 00_install).
SELECT eventshop._login_throttle_clear() >= 0 AS throttle_cleared \gset
SELECT eventshop.rotate_signing_keys() IS NOT NULL AS key_rotated \gset
SELECT eventshop.register('alice.orders@example.com', 'alice orders passphrase') AS alice_id \gset
SELECT eventshop.register('bob.orders@example.com', 'bob orders passphrase') AS bob_id \gset
SELECT eventshop.register('admin.orders@example.com', 'admin orders passphrase') AS admin_id \gset
UPDATE eventshop.users SET roles = '{customer,admin}' WHERE id = :'admin_id';
SELECT access_token AS alice FROM eventshop.login('alice.orders@example.com', 'alice orders passphrase') \gset
SELECT access_token AS bob FROM eventshop.login('bob.orders@example.com', 'bob orders passphrase') \gset
SELECT access_token AS admin FROM eventshop.login('admin.orders@example.com', 'admin orders passphrase') \gset
SELECT count(*) AS outbox_start FROM eventshop.outbox \gset

-- ---------------------------------------------------------------------------
-- Schema
-- ---------------------------------------------------------------------------
SELECT has_table('eventshop', t, format('table eventshop.%s exists', t))
FROM unnest(ARRAY['products', 'orders', 'order_items', 'payments', 'cart_items']) AS t;
SELECT has_role('eventshop_gateway', 'role eventshop_gateway exists');
SELECT is((SELECT rolcanlogin FROM pg_roles WHERE rolname = 'eventshop_gateway'), false, 'eventshop_gateway is NOLOGIN');
SELECT col_type_is('eventshop', 'products', 'price_minor', 'eventshop.price_minor', 'prices are integer minor units (a bigint domain)');
SELECT col_type_is('eventshop', 'orders', 'total_minor', 'eventshop.amount_minor', 'order totals are integer minor units (a bigint domain)');
SELECT is_empty($$SELECT c.oid::regclass || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                  WHERE c.relnamespace = 'eventshop'::regnamespace AND c.relname IN ('products', 'orders', 'order_items', 'payments')
                    AND a.attnum > 0 AND a.atttypid IN ('real'::regtype, 'double precision'::regtype, 'numeric'::regtype, 'money'::regtype)$$,
                'no floating point, numeric or money column holds money');
SELECT has_trigger('eventshop', 'orders', 'orders_status_transition', 'every order status change is checked by a trigger');
SELECT is(current_setting('eventshop.reservation_ttl'), '15min', 'reservations last 15 minutes by default');

-- ---------------------------------------------------------------------------
-- Catalog: create_product, update_product, get_product
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 100, 'EUR')$$, '28000', 'authentication required',
                 'create_product needs an authenticated caller');
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 100, 'EUR')$$, '42501', 'administrator role required',
                 'create_product refuses a customer');
SELECT throws_ok($$SELECT eventshop.update_product(1, 1, '{"title": "x"}')$$, '42501', 'administrator role required',
                 'update_product refuses a customer');
COMMIT;

BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT results_eq($$SELECT sku, title, description, category, price_minor, currency, stock_on_hand, reserved, available, active, version
                    FROM eventshop.create_product('TEE-RED-M', 'Red T-shirt', 1999, 'EUR', 10, 'apparel', 'A red cotton t-shirt, size M')$$,
                  $$VALUES ('TEE-RED-M', 'Red T-shirt', 'A red cotton t-shirt, size M', 'apparel', 1999::bigint, 'EUR', 10, 0, 10, true, 1)$$,
                  'create_product returns the new product at version 1');
SELECT lives_ok($$SELECT eventshop.create_product('MUG-1', 'Coffee mug', 899, 'EUR', 5, 'kitchen', 'A ceramic mug for strong coffee')$$,
                'create_product: a mug');
SELECT lives_ok($$SELECT eventshop.create_product('BOOK-PG', 'PostgreSQL internals', 4500, 'EUR', 3, 'books', 'How the planner and the executor work')$$,
                'create_product: a book');
SELECT lives_ok($$SELECT eventshop.create_product('LAST-1', 'The last lamp', 2500, 'EUR', 1, 'kitchen')$$,
                'create_product: a product with one unit in stock');
SELECT lives_ok($$SELECT eventshop.create_product('CAP-US', 'Baseball cap', 1500, 'USD', 20, 'apparel')$$,
                'create_product: a product priced in another currency');
SELECT lives_ok($$SELECT eventshop.create_product('OLD-1', 'Discontinued kettle', 3000, 'EUR', 4)$$,
                'create_product: a product without category');
SELECT throws_ok($$SELECT eventshop.create_product('MUG-1', 'Another mug', 100, 'EUR')$$, '23505',
                 'a product with SKU "MUG-1" already exists', 'create_product refuses an existing SKU');
SELECT throws_ok($$SELECT eventshop.create_product('bad sku', 'X', 100, 'EUR')$$, '22023', 'invalid SKU',
                 'create_product refuses a malformed SKU');
SELECT throws_ok($$SELECT eventshop.create_product(NULL, 'X', 100, 'EUR')$$, '22004', 'SKU is required',
                 'create_product refuses a NULL SKU');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', -1, 'EUR')$$, '22023', 'invalid price',
                 'create_product refuses a negative price');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 100, 'eur')$$, '22023', 'invalid currency',
                 'create_product refuses a currency that is not an ISO code');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', '  ', 100, 'EUR')$$, '22023', 'invalid title',
                 'create_product refuses a blank title');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 100, 'EUR', -5)$$, '22023', 'invalid stock_on_hand',
                 'create_product refuses negative stock');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 100, 'EUR', 1, E'bad\ncategory')$$, '22023', 'invalid category',
                 'create_product refuses a category with control characters');
SELECT throws_ok($$SELECT eventshop.create_product('X-1', 'X', 19.99, 'EUR')$$, '42883', NULL,
                 'create_product has no floating-point or decimal price: 19.99 does not even resolve');

SELECT (eventshop.get_product('OLD-1')).product_id AS old_id \gset
SELECT (eventshop.get_product('MUG-1')).product_id AS mug_id \gset
SELECT results_eq(format($$SELECT title, category, version FROM eventshop.update_product(%s, 1, '{"title": "Old kettle", "category": "kitchen"}')$$, :'old_id'),
                  $$VALUES ('Old kettle', 'kitchen', 2)$$,
                  'update_product applies the changes and increments the version');
SELECT results_eq(format($$SELECT category, version FROM eventshop.update_product(%s, 2, '{"category": null}')$$, :'old_id'),
                  $$VALUES (NULL::text, 3)$$,
                  'update_product can clear the category');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 1, '{"title": "Stale"}')$$, :'old_id'), '40001',
                 'product OLD-1 was changed by someone else', 'update_product with a stale version is a serialization failure');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"price": 1}')$$, :'old_id'), '22023',
                 'unknown field "price" in changes', 'update_product refuses an unknown field');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"reserved": 0}')$$, :'old_id'), '22023',
                 'unknown field "reserved" in changes', 'update_product cannot touch the reserved counter');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"price_minor": "12"}')$$, :'old_id'), '22023',
                 'price_minor must be an integer', 'update_product refuses a price given as a string');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"price_minor": 12.5}')$$, :'old_id'), '22023',
                 'price_minor must be an integer', 'update_product refuses a fractional price');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"stock_on_hand": -1}')$$, :'old_id'), '22023',
                 'stock_on_hand must be between 0 and 1000000000', 'update_product refuses negative stock');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{"active": "no"}')$$, :'old_id'), '22023',
                 'active must be true or false', 'update_product refuses a non-boolean active');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '{}')$$, :'old_id'), '22023',
                 'changes must be a non-empty JSON object', 'update_product refuses empty changes');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 3, '[1]')$$, :'old_id'), '22023',
                 'changes must be a non-empty JSON object', 'update_product refuses changes that are not an object');
SELECT throws_ok($$SELECT eventshop.update_product(999999, 1, '{"title": "x"}')$$, 'P0002', 'no such product',
                 'update_product refuses an unknown product');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, NULL, '{"title": "x"}')$$, :'old_id'), '22004',
                 'product_id, expected_version and changes are required', 'update_product needs the expected version');
SELECT results_eq(format($$SELECT active, version FROM eventshop.update_product(%s, 3, '{"active": false}')$$, :'old_id'),
                  $$VALUES (false, 4)$$, 'update_product can take a product off sale');
COMMIT;
RESET ROLE;

-- get_product and search_products need no caller.
SET ROLE regress_orders_app;
SELECT results_eq($$SELECT sku, price_minor, currency, available FROM eventshop.get_product('BOOK-PG')$$,
                  $$VALUES ('BOOK-PG', 4500::bigint, 'EUR', 3)$$, 'get_product works without authentication');
SELECT throws_ok($$SELECT eventshop.get_product('NOPE-1')$$, 'P0002', 'unknown SKU "NOPE-1"', 'get_product: unknown SKU');
SELECT throws_ok($$SELECT eventshop.get_product('no pe')$$, '22023', 'invalid SKU', 'get_product: malformed SKU');

-- ---------------------------------------------------------------------------
-- Catalog: search_products (full text, category, keyset pagination)
-- ---------------------------------------------------------------------------
SELECT results_eq($$SELECT sku FROM eventshop.search_products('shirt')$$, $$VALUES ('TEE-RED-M')$$,
                  'search finds a product by a word of its title (English stemming: shirt ~ t-shirt)');
SELECT results_eq($$SELECT sku FROM eventshop.search_products('planner')$$, $$VALUES ('BOOK-PG')$$,
                  'search finds a product by its description');
SELECT results_eq($$SELECT sku FROM eventshop.search_products('coffee OR shirt') ORDER BY sku$$,
                  $$VALUES ('MUG-1'), ('TEE-RED-M')$$, 'search understands web search syntax (OR)');
SELECT results_eq($$SELECT sku FROM eventshop.search_products('shirt OR cap', category => 'apparel') ORDER BY sku$$,
                  $$VALUES ('CAP-US'), ('TEE-RED-M')$$, 'search filters by category');
SELECT is_empty($$SELECT sku FROM eventshop.search_products('kettle')$$, 'search does not show products off sale');
SELECT is_empty($$SELECT sku FROM eventshop.search_products('zebra')$$, 'search with no match returns nothing');
SELECT results_eq($$SELECT sku FROM eventshop.search_products()$$,
                  $$VALUES ('CAP-US'), ('MUG-1'), ('BOOK-PG'), ('TEE-RED-M'), ('LAST-1')$$,
                  'without a query, every product on sale, ordered by title');
SELECT results_eq($$SELECT sku FROM eventshop.search_products(category => 'kitchen')$$,
                  $$VALUES ('MUG-1'), ('LAST-1')$$, 'without a query, one category');
-- Walk all products two at a time, each page after the last row's cursor.
SELECT string_agg(sku, ',') AS page1, (array_agg(cursor))[2] AS cur1 FROM eventshop.search_products(page_size => 2) \gset
SELECT string_agg(sku, ',') AS page2, (array_agg(cursor))[2] AS cur2 FROM eventshop.search_products(page_size => 2, cursor => :'cur1') \gset
SELECT string_agg(sku, ',') AS page3, count(*) AS page3_rows FROM eventshop.search_products(page_size => 2, cursor => :'cur2') \gset
SELECT is(:'page1' || '|' || :'page2' || '|' || :'page3', 'CAP-US,MUG-1|BOOK-PG,TEE-RED-M|LAST-1',
          'keyset pagination walks the catalog without gaps or repeats');
SELECT string_agg(sku, ',') AS fts_page1, (array_agg(cursor))[1] AS fts_cur FROM eventshop.search_products('coffee OR shirt OR cap', page_size => 1) \gset
SELECT is((SELECT count(*) FROM eventshop.search_products('coffee OR shirt OR cap', page_size => 1, cursor => :'fts_cur')), 1::bigint,
          'a ranked search pages too');
SELECT is((SELECT string_agg(sku, ',' ORDER BY sku) FROM
           (SELECT sku FROM eventshop.search_products('coffee OR shirt OR cap', page_size => 1)
            UNION ALL SELECT sku FROM eventshop.search_products('coffee OR shirt OR cap', page_size => 5, cursor => :'fts_cur')) s),
          'CAP-US,MUG-1,TEE-RED-M', 'ranked pages together hold every match once');
SELECT throws_ok(format($$SELECT * FROM eventshop.search_products('mug', cursor => %L)$$, :'cur1'), '22023',
                 'cursor does not belong to this query', 'a cursor only works with the search it came from');
SELECT throws_ok($$SELECT * FROM eventshop.search_products(cursor => 'bm90LWEtY3Vyc29y')$$, '22023', 'invalid cursor',
                 'a forged cursor is refused');
SELECT throws_ok($$SELECT * FROM eventshop.search_products(cursor => '%%%')$$, '22023', 'invalid cursor',
                 'a cursor that is not base64url is refused');
SELECT throws_ok($$SELECT * FROM eventshop.search_products(page_size => 0)$$, '22023', 'page_size must be between 1 and 100',
                 'search refuses page_size 0');
SELECT throws_ok($$SELECT * FROM eventshop.search_products(page_size => 101)$$, '22023', 'page_size must be between 1 and 100',
                 'search refuses page_size 101');
SELECT throws_ok(format('SELECT * FROM eventshop.search_products(%L)', repeat('x', 201)), '22023', 'query is too long',
                 'search refuses a query over 200 characters');
SELECT lives_ok($$SELECT * FROM eventshop.search_products($q$'); DROP TABLE eventshop.products; --$q$)$$,
                'search text is data, never SQL');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- place_order: the happy path
-- ---------------------------------------------------------------------------
SELECT regress_orders.outbox_count() AS events_before \gset
SET ROLE regress_orders_app;
SELECT throws_ok($$SELECT eventshop.place_order('[{"sku": "MUG-1", "quantity": 1}]')$$, '28000', 'authentication required',
                 'place_order needs an authenticated caller');
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "TEE-RED-M", "quantity": 2}, {"sku": "MUG-1", "quantity": 1}]') \gset o1_
COMMIT;
SELECT is(:'o1_status' || ' ' || :'o1_currency' || ' ' || :'o1_total_minor' || ' ' || :'o1_item_count', 'reserved EUR 4897 2',
          'place_order returns a reserved order with the total computed in the database (2 x 1999 + 899)');
SELECT ok(:'o1_order_id' ~ '^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$', 'order ids are UUIDv7');
SELECT is(regress_orders.stock('TEE-RED-M') || ' ' || regress_orders.stock('MUG-1'), '10/2 5/1',
          'the units are reserved, not taken from the stock on hand');
SELECT results_eq($$SELECT available FROM eventshop.get_product('TEE-RED-M')$$, $$VALUES (8)$$,
                  'available = on hand - reserved');
SELECT is(regress_orders.outbox_count(), :events_before + 1::bigint, 'placing an order emits one event');
RESET ROLE;
SELECT results_eq(format($$SELECT topic, event_type, payload->'data'->>'status', (payload->'data'->>'total_minor')::bigint,
                                  payload->'data'->>'user_id' = %L, (payload->'data'->>'item_count')::int,
                                  (payload->'data'->>'unit_count')::int
                           FROM eventshop.outbox WHERE message_key = %L$$, :'alice_id', :'o1_order_id'),
                  $$VALUES ('orders.events', 'order.created', 'reserved', 4897::bigint, true, 2, 3)$$,
                  'order.created on orders.events, keyed by the order id');
SELECT results_eq(format($$SELECT sku, title, category, unit_price_minor, quantity::int FROM eventshop.order_items WHERE order_id = %L ORDER BY sku$$, :'o1_order_id'),
                  $$VALUES ('MUG-1', 'Coffee mug', 'kitchen', 899::bigint, 1), ('TEE-RED-M', 'Red T-shirt', 'apparel', 1999::bigint, 2)$$,
                  'the lines snapshot SKU, title, category and price');
SELECT ok((SELECT reserved_until = created_at + interval '15 minutes' FROM eventshop.orders WHERE id = :'o1_order_id'),
          'the reservation expires eventshop.reservation_ttl after placement');

-- ---------------------------------------------------------------------------
-- place_order: bad input, each refused with nothing written and no event
-- ---------------------------------------------------------------------------
SELECT regress_orders.row_counts() AS counts_before \gset
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok(format('SELECT eventshop.place_order(%L)', i), e, m, 'place_order refuses ' || d)
FROM (VALUES
	(NULL::text, '22004', 'items are required', 'NULL items'),
	('[]', '22023', 'an order needs at least one item', 'an empty order'),
	('{"sku": "MUG-1", "quantity": 1}', '22023', 'items must be a JSON array', 'an object instead of an array'),
	('"MUG-1"', '22023', 'items must be a JSON array', 'a string instead of an array'),
	('[1]', '22023', 'item 1 is not a JSON object', 'an item that is not an object'),
	('[{"sku": "MUG-1", "quantity": 1, "price": 1}]', '22023', 'item 1 has an unknown field "price"', 'a price sent by the client'),
	('[{"sku": "MUG-1", "quantity": 1, "unit_price_minor": 1}]', '22023', 'item 1 has an unknown field "unit_price_minor"', 'a unit price sent by the client'),
	('[{"sku": "MUG-1", "quantity": 1}, {"sku": "TEE-RED-M", "quantity": 1, "stock": 99}]', '22023', 'item 2 has an unknown field "stock"', 'a stock level sent by the client'),
	('[{"sku": "MUG-1", "quantity": 1, "total_minor": 0}]', '22023', 'item 1 has an unknown field "total_minor"', 'a total sent by the client'),
	('[{"sku": "MUG-1", "quantity": 0}]', '22023', 'item 1 has a quantity outside 1 to 1000', 'quantity 0'),
	('[{"sku": "MUG-1", "quantity": -3}]', '22023', 'item 1 has a quantity outside 1 to 1000', 'a negative quantity'),
	('[{"sku": "MUG-1", "quantity": 1001}]', '22023', 'item 1 has a quantity outside 1 to 1000', 'an absurdly large quantity'),
	('[{"sku": "MUG-1", "quantity": 1e30}]', '22023', 'item 1 has a quantity outside 1 to 1000', 'a quantity of 1e30'),
	('[{"sku": "MUG-1", "quantity": 1.5}]', '22023', 'item 1 has a quantity that is not an integer', 'a fractional quantity'),
	('[{"sku": "MUG-1", "quantity": "2"}]', '22023', 'item 1 has a missing quantity or one that is not a number', 'a quantity given as a string'),
	('[{"sku": "MUG-1"}]', '22023', 'item 1 has a missing quantity or one that is not a number', 'a missing quantity'),
	('[{"quantity": 1}]', '22023', 'item 1 has a missing or invalid sku', 'a missing SKU'),
	('[{"sku": 42, "quantity": 1}]', '22023', 'item 1 has a missing or invalid sku', 'a SKU that is not a string'),
	('[{"sku": "MUG 1", "quantity": 1}]', '22023', 'item 1 has a missing or invalid sku', 'a malformed SKU'),
	('[{"sku": "MUG-1", "quantity": 1}, {"sku": "MUG-1", "quantity": 2}]', '22023', 'each SKU may appear only once in an order', 'a SKU listed twice'),
	('[{"sku": "NOPE-9", "quantity": 1}]', 'P0002', 'unknown SKU "NOPE-9"', 'an unknown SKU'),
	('[{"sku": "MUG-1", "quantity": 1}, {"sku": "NOPE-9", "quantity": 1}]', 'P0002', 'unknown SKU "NOPE-9"', 'an unknown SKU next to a known one'),
	('[{"sku": "OLD-1", "quantity": 1}]', '55000', 'product "OLD-1" is not for sale', 'a product off sale'),
	('[{"sku": "MUG-1", "quantity": 1}, {"sku": "CAP-US", "quantity": 1}]', '22023', 'an order cannot mix currencies', 'mixed currencies'),
	('[{"sku": "BOOK-PG", "quantity": 4}]', '23514', 'insufficient stock for SKU "BOOK-PG"', 'more than the stock'),
	('[{"sku": "BOOK-PG", "quantity": 1}, {"sku": "TEE-RED-M", "quantity": 9}]', '23514', 'insufficient stock for SKU "TEE-RED-M"', 'an order of which one line cannot be served (all or nothing)')
) AS v(i, e, m, d);
SELECT throws_ok(format('SELECT eventshop.place_order(%L)', (SELECT jsonb_agg(jsonb_build_object('sku', 'S-' || g, 'quantity', 1)) FROM generate_series(1, 101) g)),
                 '22023', 'an order has at most 100 lines', 'place_order refuses 101 lines');
SELECT is(regress_orders.error_of($$SELECT eventshop.place_order('[{"sku": "TEE-RED-M", "quantity": 9}]')$$),
          '23514: insufficient stock for SKU "TEE-RED-M"', 'the stock error is a check violation (23514)');
COMMIT;
RESET ROLE;
SELECT is(regress_orders.row_counts(), :'counts_before', 'the refused orders wrote nothing and emitted no event');
SELECT is(regress_orders.stock('TEE-RED-M') || ' ' || regress_orders.stock('BOOK-PG'), '10/2 3/0',
          'and reserved nothing, not even the lines that could have been served');

-- The last unit: exactly one of two orders gets it.
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "LAST-1", "quantity": 1}]') \gset last_
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok($$SELECT eventshop.place_order('[{"sku": "LAST-1", "quantity": 1}]')$$, '23514',
                 'insufficient stock for SKU "LAST-1"', 'the last unit cannot be reserved twice');
COMMIT;
RESET ROLE;
SELECT is(regress_orders.stock('LAST-1'), '1/1', 'the last unit is reserved once');

-- ---------------------------------------------------------------------------
-- get_order, list_orders: users see their own orders, administrators all
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT is((SELECT eventshop.get_order(:'o1_order_id') - '{order_id,user_id,created_at,reserved_until}'::text[]),
          '{"items": [{"sku": "MUG-1", "title": "Coffee mug", "quantity": 1, "line_total_minor": 899, "unit_price_minor": 899},
                      {"sku": "TEE-RED-M", "title": "Red T-shirt", "quantity": 2, "line_total_minor": 3998, "unit_price_minor": 1999}],
            "status": "reserved", "paid_at": null, "currency": "EUR", "payments": [], "total_minor": 4897, "completed_at": null}'::jsonb,
          'get_order shows the owner the order with its lines and payments');
SELECT is((SELECT count(*) FROM eventshop.list_orders()), 2::bigint, 'list_orders shows the caller''s two orders');
SELECT is((SELECT count(*) FROM eventshop.list_orders() WHERE user_id <> :'alice_id'), 0::bigint, 'and only the caller''s');
SELECT results_eq($$SELECT order_id FROM eventshop.list_orders()$$,
                  $$SELECT order_id FROM eventshop.list_orders() ORDER BY order_id DESC$$, 'newest first (ids are UUIDv7)');
SELECT (array_agg(cursor))[1] AS ocur FROM eventshop.list_orders(page_size => 1) \gset
SELECT is((SELECT array_agg(order_id) FROM (SELECT order_id FROM eventshop.list_orders(page_size => 1)
                                              UNION ALL SELECT order_id FROM eventshop.list_orders(page_size => 1, cursor => :'ocur')) s),
          (SELECT array_agg(order_id) FROM eventshop.list_orders()), 'list_orders pages with a cursor');
SELECT is((SELECT count(*) FROM eventshop.list_orders(status => 'reserved')), 2::bigint, 'list_orders filters by status');
SELECT is((SELECT count(*) FROM eventshop.list_orders(status => 'completed')), 0::bigint, 'list_orders: no completed order yet');
SELECT throws_ok($$SELECT * FROM eventshop.list_orders(status => 'shipped')$$, '22023', 'unknown order status "shipped"',
                 'list_orders refuses an unknown status');
SELECT throws_ok(format($$SELECT * FROM eventshop.list_orders(status => 'reserved', cursor => %L)$$, :'ocur'), '22023',
                 'cursor does not belong to this query', 'list_orders refuses a cursor of another listing');
SELECT throws_ok($$SELECT * FROM eventshop.list_orders(all_users => true)$$, '42501', 'administrator role required',
                 'a customer cannot list everybody''s orders');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok(format('SELECT eventshop.get_order(%L)', :'o1_order_id'), 'P0002', 'no such order',
                 'someone else''s order does not exist for get_order');
SELECT throws_ok(format('SELECT eventshop.cancel_order(%L)', :'o1_order_id'), 'P0002', 'no such order',
                 'someone else''s order cannot be cancelled');
SELECT throws_ok($$SELECT eventshop.get_order('00000000-0000-7000-8000-000000000000')$$, 'P0002', 'no such order',
                 'get_order: unknown order');
SELECT is_empty($$SELECT * FROM eventshop.list_orders()$$, 'bob has no orders');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT is((SELECT eventshop.get_order(:'o1_order_id')->>'total_minor'), '4897', 'an administrator sees any order');
SELECT is((SELECT count(*) FROM eventshop.list_orders(all_users => true) WHERE user_id = :'alice_id'), 2::bigint,
          'an administrator lists everybody''s orders');
SELECT is_empty($$SELECT * FROM eventshop.list_orders()$$, 'without all_users an administrator lists only their own');
COMMIT;
RESET ROLE;
SELECT throws_ok($$SELECT * FROM eventshop.list_orders()$$, '28000', 'authentication required',
                 'list_orders needs an authenticated caller');
SELECT throws_ok(format('SELECT eventshop.get_order(%L)', :'o1_order_id'), '28000', 'authentication required',
                 'get_order needs an authenticated caller');

-- ---------------------------------------------------------------------------
-- Cart
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
SELECT throws_ok(format('SELECT %s', f), '28000', 'authentication required',
                 format('%s needs an authenticated caller', split_part(f, '(', 1)))
FROM unnest(ARRAY['eventshop.cart_add(''MUG-1'')', 'eventshop.cart_set_quantity(''MUG-1'', 1)', 'eventshop.cart_remove(''MUG-1'')',
                  'eventshop.cart_clear()', '* FROM eventshop.cart_view()', 'eventshop.checkout()',
                  '* FROM eventshop.sales_by_day(''2025-01-01'', ''2025-01-02'')',
                  '* FROM eventshop.sales_by_category(''2025-01-01'', ''2025-01-02'')']) AS f;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT is(eventshop.cart_add('BOOK-PG', 2), 2, 'cart_add adds a line');
SELECT is(eventshop.cart_add('BOOK-PG'), 3, 'cart_add again adds to the line');
SELECT is(eventshop.cart_add('MUG-1', 1), 1, 'cart_add a second product');
SELECT throws_ok($$SELECT eventshop.cart_add('BOOK-PG')$$, '23514', 'insufficient stock for SKU "BOOK-PG"',
                 'cart_add refuses more than the available stock');
SELECT throws_ok($$SELECT eventshop.cart_add('NOPE-9')$$, 'P0002', 'unknown SKU "NOPE-9"', 'cart_add: unknown SKU');
SELECT throws_ok($$SELECT eventshop.cart_add('OLD-1')$$, '55000', 'product "OLD-1" is not for sale', 'cart_add: product off sale');
SELECT throws_ok($$SELECT eventshop.cart_add('MUG-1', 0)$$, '22023', 'quantity must be between 1 and 1000', 'cart_add: quantity 0');
SELECT throws_ok($$SELECT eventshop.cart_add('MUG-1', -1)$$, '22023', 'quantity must be between 1 and 1000', 'cart_add: negative quantity');
SELECT throws_ok($$SELECT eventshop.cart_add('MUG-1', 1001)$$, '22023', 'quantity must be between 1 and 1000', 'cart_add: absurd quantity');
SELECT throws_ok($$SELECT eventshop.cart_add('bad sku')$$, '22023', 'invalid SKU', 'cart_add: malformed SKU');
SELECT is(eventshop.cart_set_quantity('MUG-1', 2), 2, 'cart_set_quantity sets a line');
SELECT throws_ok($$SELECT eventshop.cart_set_quantity('MUG-1', 0)$$, '22023', 'quantity must be between 1 and 1000',
                 'cart_set_quantity refuses 0 (cart_remove removes)');
SELECT throws_ok($$SELECT eventshop.cart_set_quantity('MUG-1', 5)$$, '23514', 'insufficient stock for SKU "MUG-1"',
                 'cart_set_quantity refuses more than the available stock');
SELECT throws_ok($$SELECT eventshop.cart_set_quantity('TEE-RED-M', 1)$$, 'P0002', 'SKU "TEE-RED-M" is not in the cart',
                 'cart_set_quantity: a SKU that is not in the cart');
SELECT is(eventshop.cart_add('TEE-RED-M'), 1, 'cart_add a third product');
SELECT ok(eventshop.cart_remove('TEE-RED-M'), 'cart_remove removes a line');
SELECT ok(NOT eventshop.cart_remove('TEE-RED-M'), 'cart_remove of a line that is not there returns false');
SELECT results_eq($$SELECT sku, title, unit_price_minor, currency, quantity, line_total_minor, available, in_stock FROM eventshop.cart_view()$$,
                  $$VALUES ('BOOK-PG', 'PostgreSQL internals', 4500::bigint, 'EUR', 3, 13500::bigint, 3, true),
                           ('MUG-1', 'Coffee mug', 899::bigint, 'EUR', 2, 1798::bigint, 4, true)$$,
                  'cart_view shows the lines with current prices and stock');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT lives_ok(format($$SELECT eventshop.update_product(%s, 1, '{"price_minor": 799}')$$, :'mug_id'), 'the mug gets cheaper');
SELECT throws_ok(format($$SELECT eventshop.update_product(%s, 1, '{"stock_on_hand": 1}')$$, (eventshop.get_product('TEE-RED-M')).product_id),
                 '23514', 'stock_on_hand cannot be set below the units reserved by open orders',
                 'update_product cannot take away units that orders hold');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "BOOK-PG", "quantity": 1}]') \gset o2_
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT results_eq($$SELECT sku, unit_price_minor, line_total_minor, available, in_stock FROM eventshop.cart_view()$$,
                  $$VALUES ('BOOK-PG', 4500::bigint, 13500::bigint, 2, false), ('MUG-1', 799::bigint, 1598::bigint, 4, true)$$,
                  'cart_view follows price changes and shows a line that can no longer be served');
SELECT throws_ok($$SELECT eventshop.checkout()$$, '23514', 'insufficient stock for SKU "BOOK-PG"',
                 'checkout refuses a cart that cannot be served');
SELECT is((SELECT count(*) FROM eventshop.cart_view()), 2::bigint, 'and the cart is kept');
SELECT is(eventshop.cart_set_quantity('BOOK-PG', 2), 2, 'cart_set_quantity down to what is available');
SELECT * FROM eventshop.checkout() \gset o3_
SELECT is(:'o3_status' || ' ' || :'o3_total_minor' || ' ' || :'o3_item_count', 'reserved 10598 2',
          'checkout places an order from the cart at current prices (2 x 4500 + 2 x 799)');
SELECT is_empty($$SELECT * FROM eventshop.cart_view()$$, 'checkout empties the cart');
SELECT throws_ok($$SELECT eventshop.checkout()$$, '22023', 'the cart is empty', 'checkout refuses an empty cart');
SELECT is(eventshop.cart_add('MUG-1'), 1, 'a new cart');
SELECT is(eventshop.cart_clear(), 1, 'cart_clear empties it and counts the lines');
SELECT is(eventshop.cart_clear(), 0, 'cart_clear of an empty cart');
COMMIT;
RESET ROLE;
SELECT is(regress_orders.stock('BOOK-PG') || ' ' || regress_orders.stock('MUG-1'), '3/3 5/3',
          'the checked-out units are reserved');
SELECT is(regress_orders.last_event(:'o3_order_id'), 'order.created', 'checkout emits order.created');
-- A cart holds at most 100 lines.
INSERT INTO eventshop.products (sku, title, price_minor, currency, stock_on_hand)
SELECT 'BULK-' || g, 'Bulk item ' || g, 100, 'EUR', 10 FROM generate_series(1, 101) g;
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT is((SELECT sum(eventshop.cart_add('BULK-' || g)) FROM generate_series(1, 100) g), 100::bigint, '100 lines fit in a cart');
SELECT throws_ok($$SELECT eventshop.cart_add('BULK-101')$$, '22023', 'a cart holds at most 100 lines', 'the 101st line does not');
SELECT is(eventshop.cart_clear(), 100, 'cart_clear removes all 100');
COMMIT;
RESET ROLE;

-- ---------------------------------------------------------------------------
-- cancel_order
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT results_eq(format('SELECT status, total_minor FROM eventshop.cancel_order(%L)', :'o2_order_id'),
                  $$VALUES ('cancelled', 4500::bigint)$$, 'cancel_order cancels the caller''s reserved order');
SELECT throws_ok(format('SELECT eventshop.cancel_order(%L)', :'o2_order_id'), '55000', 'order is cancelled and cannot be cancelled',
                 'a cancelled order cannot be cancelled again');
SELECT throws_ok($$SELECT eventshop.cancel_order(NULL)$$, '22004', 'order id is required', 'cancel_order needs an order id');
COMMIT;
RESET ROLE;
SELECT is(regress_orders.stock('BOOK-PG'), '3/2', 'cancelling releases the reserved units');
SELECT results_eq(format($$SELECT event_type, payload->'data'->>'by' FROM eventshop.outbox WHERE message_key = %L ORDER BY id$$, :'o2_order_id'),
                  $$VALUES ('order.created', NULL), ('order.cancelled', 'user')$$, 'order.cancelled says the owner cancelled');
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'bob')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "TEE-RED-M", "quantity": 1}]') \gset o4_
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT results_eq(format('SELECT status FROM eventshop.cancel_order(%L)', :'o4_order_id'), $$VALUES ('cancelled')$$,
                  'an administrator can cancel anybody''s order');
COMMIT;
RESET ROLE;
SELECT is((SELECT payload->'data'->>'by' FROM eventshop.outbox WHERE message_key = :'o4_order_id' AND event_type = 'order.cancelled'),
          'admin', 'order.cancelled says an administrator cancelled');
SELECT throws_ok(format('SELECT eventshop.cancel_order(%L)', :'o4_order_id'), '28000', 'authentication required',
                 'cancel_order needs an authenticated caller');

-- ---------------------------------------------------------------------------
-- Payments: record_payment and record_refund (the gateway)
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_app', 'succeeded', 4897, 'EUR')$$, :'o1_order_id'),
                 '42501', 'permission denied for function record_payment', 'an application cannot record payments');
SELECT throws_ok(format($$SELECT eventshop.record_refund(%L, 'stripe', 're_app', 4897, 'EUR')$$, :'o1_order_id'),
                 '42501', 'permission denied for function record_refund', 'an application cannot record refunds');
RESET ROLE;
SELECT regress_orders.row_counts() AS counts_before \gset
SET ROLE regress_orders_gw;
SELECT throws_ok(format('SELECT eventshop.record_payment(%L, %L, %L, %L, %s, %L)', :'o1_order_id', p, r, s, a, c), e, m,
                 'record_payment refuses ' || d)
FROM (VALUES
	('stripe', 'pi_x', 'succeeded', '4896', 'EUR', '22023', 'the payment does not match the order', 'an amount below the total'),
	('stripe', 'pi_x', 'succeeded', '4898', 'EUR', '22023', 'the payment does not match the order', 'an amount above the total'),
	('stripe', 'pi_x', 'succeeded', '4897', 'USD', '22023', 'the payment does not match the order', 'another currency'),
	('stripe', 'pi_x', 'pending', '4897', 'EUR', '22023', 'invalid payment status "pending"', 'an unknown status'),
	('Stripe!', 'pi_x', 'succeeded', '4897', 'EUR', '22023', 'invalid provider', 'a malformed provider'),
	('stripe', 'pi x', 'succeeded', '4897', 'EUR', '22023', 'invalid provider reference', 'a reference with a space'),
	('stripe', 'pi_x', 'succeeded', '-1', 'EUR', '22023', 'invalid amount or currency', 'a negative amount'),
	('stripe', 'pi_x', 'succeeded', 'NULL', 'EUR', '22004', 'order_id, provider, provider_ref, status, amount_minor and currency are required', 'a NULL amount')
) AS v(p, r, s, a, c, e, m, d);
SELECT throws_ok($$SELECT eventshop.record_payment('00000000-0000-7000-8000-000000000000', 'stripe', 'pi_x', 'succeeded', 1, 'EUR')$$,
                 'P0002', 'no such order', 'record_payment refuses an unknown order');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_x', 'succeeded', 4500, 'EUR')$$, :'o2_order_id'),
                 '55000', 'order is cancelled and cannot be paid', 'a cancelled order cannot be paid');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_x', 'failed', 4500, 'EUR')$$, :'o2_order_id'),
                 '55000', 'order is cancelled and cannot be paid', 'nor can a failure be recorded for it');
SELECT throws_ok(format($$SELECT eventshop.record_refund(%L, 'stripe', 're_x', 4897, 'EUR')$$, :'o1_order_id'),
                 '55000', 'order is reserved and cannot be refunded', 'a reserved order cannot be refunded');
RESET ROLE;
SELECT is(regress_orders.row_counts(), :'counts_before', 'the refused payments wrote nothing and emitted no event');

-- A failed attempt, then a successful one.
SET ROLE regress_orders_gw;
SELECT results_eq(format($$SELECT kind, status, amount_minor, currency, order_status FROM eventshop.record_payment(%L, 'stripe', 'pi_fail_1', 'failed', 4897, 'EUR')$$, :'o1_order_id'),
                  $$VALUES ('payment', 'failed', 4897::bigint, 'EUR', 'reserved')$$, 'a failed payment leaves the order reserved');
SELECT is(regress_orders.last_event(:'o1_order_id'), 'payment.failed', 'a failed payment emits payment.failed');
SELECT * FROM eventshop.record_payment(:'o1_order_id', 'stripe', 'pi_ok_1', 'succeeded', 4897, 'EUR') \gset p1_
SELECT is(:'p1_kind' || ' ' || :'p1_status' || ' ' || :'p1_order_status', 'payment succeeded completed',
          'a successful payment completes the order');
RESET ROLE;
SELECT is(regress_orders.stock('TEE-RED-M') || ' ' || regress_orders.stock('MUG-1'), '8/0 4/2',
          'the payment consumes the reservation: the units leave the stock');
SELECT results_eq(format($$SELECT event_type, topic FROM eventshop.outbox WHERE message_key = %L ORDER BY id$$, :'o1_order_id'),
                  $$VALUES ('order.created', 'orders.events'), ('payment.failed', 'payments.events'),
                           ('payment.succeeded', 'payments.events'), ('order.completed', 'orders.events')$$,
                  'payment.succeeded then order.completed, keyed by the order id');
SELECT results_eq(format($$SELECT payload->'data'->>'user_id' = %L, payload->'data'->>'payment_id' = %L, payload->'data'->>'provider',
                                  payload->'data'->>'provider_ref', (payload->'data'->>'amount_minor')::bigint, payload->'data'->>'currency'
                           FROM eventshop.outbox WHERE message_key = %L AND event_type = 'payment.succeeded'$$,
                         :'alice_id', :'p1_payment_id', :'o1_order_id'),
                  $$VALUES (true, true, 'stripe', 'pi_ok_1', 4897::bigint, 'EUR')$$,
                  'payment.succeeded carries the user, the payment, the provider''s reference and the amount');
SELECT ok((SELECT paid_at IS NOT NULL AND completed_at >= paid_at FROM eventshop.orders WHERE id = :'o1_order_id'),
          'the order went through paid to completed');
SELECT results_eq($$SELECT version FROM eventshop.products WHERE sku IN ('TEE-RED-M', 'MUG-1') ORDER BY sku$$,
                  $$VALUES (3), (2)$$, 'a payment changes stock_on_hand and so the product version');
SELECT regress_orders.row_counts() AS counts_paid \gset
SET ROLE regress_orders_gw;
SELECT results_eq(format($$SELECT * FROM eventshop.record_payment(%L, 'stripe', 'pi_ok_1', 'succeeded', 4897, 'EUR')$$, :'o1_order_id'),
                  format($$VALUES (%L::uuid, %L::uuid, 'payment', 'succeeded', 4897::bigint, 'EUR', 'completed')$$, :'p1_payment_id', :'o1_order_id'),
                  'the same provider reference again returns the same result');
SELECT results_eq(format($$SELECT payment_id, order_status FROM eventshop.record_payment(%L, 'stripe', 'pi_fail_1', 'failed', 4897, 'EUR')$$, :'o1_order_id'),
                  format($$SELECT payment_id, 'reserved' FROM eventshop.record_payment(%L, 'stripe', 'pi_fail_1', 'failed', 4897, 'EUR')$$, :'o1_order_id'),
                  'a replayed failure also returns its stored result');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_ok_1', 'failed', 4897, 'EUR')$$, :'o1_order_id'),
                 '22023', 'provider reference "pi_ok_1" was already recorded with different details',
                 'the same reference with another result is refused');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_ok_1', 'succeeded', 10598, 'EUR')$$, :'o3_order_id'),
                 '22023', 'provider reference "pi_ok_1" was already recorded with different details',
                 'the same reference for another order is refused');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_ok_2', 'succeeded', 4897, 'EUR')$$, :'o1_order_id'),
                 '55000', 'order is already paid', 'a second payment of a paid order (double payment) is refused');
SELECT throws_ok(format($$SELECT eventshop.cancel_order(%L)$$, :'o1_order_id'),
                 '42501', 'permission denied for function cancel_order', 'the gateway cannot call the application API');
RESET ROLE;
SELECT is(regress_orders.row_counts(), :'counts_paid', 'replays and refused payments wrote nothing and emitted no event');
SELECT is(regress_orders.stock('TEE-RED-M'), '8/0', 'and took no stock');
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok(format('SELECT eventshop.cancel_order(%L)', :'o1_order_id'), '55000', 'order is completed and cannot be cancelled',
                 'a completed order cannot be cancelled');
SELECT is((SELECT jsonb_agg(p - '{payment_id,created_at}'::text[] ORDER BY p->>'provider_ref') FROM jsonb_array_elements(eventshop.get_order(:'o1_order_id')->'payments') p),
          '[{"kind": "payment", "status": "failed", "currency": "EUR", "provider": "stripe", "amount_minor": 4897, "provider_ref": "pi_fail_1"},
            {"kind": "payment", "status": "succeeded", "currency": "EUR", "provider": "stripe", "amount_minor": 4897, "provider_ref": "pi_ok_1"}]'::jsonb,
          'get_order lists the payments');
SELECT is((SELECT count(*) FROM eventshop.list_orders(status => 'completed')), 1::bigint, 'list_orders: one completed order');
COMMIT;
RESET ROLE;

-- Refunds (operators may record them too).
SET ROLE regress_orders_ops;
SELECT throws_ok(format($$SELECT eventshop.record_refund(%L, 'stripe', 're_1', 4000, 'EUR')$$, :'o1_order_id'),
                 '22023', 'the refund does not match the order', 'a partial refund is refused');
SELECT results_eq(format($$SELECT kind, status, amount_minor, order_status FROM eventshop.record_refund(%L, 'stripe', 're_1', 4897, 'EUR')$$, :'o1_order_id'),
                  $$VALUES ('refund', 'succeeded', 4897::bigint, 'refunded')$$, 'a full refund refunds the order');
SELECT results_eq(format($$SELECT kind, order_status FROM eventshop.record_refund(%L, 'stripe', 're_1', 4897, 'EUR')$$, :'o1_order_id'),
                  $$VALUES ('refund', 'refunded')$$, 'a replayed refund returns the same result');
SELECT throws_ok(format($$SELECT eventshop.record_refund(%L, 'stripe', 're_2', 4897, 'EUR')$$, :'o1_order_id'),
                 '55000', 'order is already refunded', 'an order is refunded once');
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_ok_3', 'succeeded', 4897, 'EUR')$$, :'o1_order_id'),
                 '55000', 'order is already paid', 'a refunded order cannot be paid again');
RESET ROLE;
SELECT is(regress_orders.stock('TEE-RED-M') || ' ' || regress_orders.stock('MUG-1'), '10/0 5/2', 'the refund restocks the units');
SELECT is((SELECT count(*) FROM eventshop.outbox WHERE message_key = :'o1_order_id' AND event_type = 'payment.refunded'), 1::bigint,
          'the refund emits payment.refunded once');

-- ---------------------------------------------------------------------------
-- Expiry: expire_reservations and payments after the reservation ended
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "MUG-1", "quantity": 2}]') \gset o5_
COMMIT;
SELECT throws_ok($$SELECT eventshop.expire_reservations()$$, '42501', 'permission denied for function expire_reservations',
                 'an application cannot run the expiry');
RESET ROLE;
SELECT is(regress_orders.stock('MUG-1'), '5/4', 'two orders hold mugs');
-- The reservation of o5 ended a second ago; the sweeper has not run yet.
UPDATE eventshop.orders SET reserved_until = clock_timestamp() - interval '1 second' WHERE id = :'o5_order_id';
SET ROLE regress_orders_gw;
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_late', 'succeeded', 1598, 'EUR')$$, :'o5_order_id'),
                 '55000', 'order reservation has expired and the order cannot be paid',
                 'an order whose reservation ended cannot be paid, even before the sweeper ran');
RESET ROLE;
SET ROLE regress_orders_ops;
SELECT is(eventshop.expire_reservations(), 1, 'expire_reservations expires the one order whose reservation ended');
SELECT is(eventshop.expire_reservations(), 0, 'and nothing the second time');
SELECT throws_ok($$SELECT eventshop.expire_reservations(0)$$, '22023', 'max_orders must be between 1 and 100000',
                 'expire_reservations refuses a batch size of 0');
RESET ROLE;
SELECT is(regress_orders.order_status(:'o5_order_id'), 'expired', 'the order is expired');
SELECT is(regress_orders.stock('MUG-1'), '5/2', 'and its units are released');
SELECT results_eq(format($$SELECT topic, event_type, payload->'data'->>'user_id' = %L FROM eventshop.outbox WHERE message_key = %L ORDER BY id DESC LIMIT 1$$,
                         :'alice_id', :'o5_order_id'),
                  $$VALUES ('orders.events', 'order.expired', true)$$, 'expiry emits order.expired');
SET ROLE regress_orders_gw;
SELECT throws_ok(format($$SELECT eventshop.record_payment(%L, 'stripe', 'pi_late', 'succeeded', 1598, 'EUR')$$, :'o5_order_id'),
                 '55000', 'order is expired and cannot be paid', 'an expired order cannot be paid');
RESET ROLE;
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok(format('SELECT eventshop.cancel_order(%L)', :'o5_order_id'), '55000', 'order is expired and cannot be cancelled',
                 'an expired order cannot be cancelled');
COMMIT;
RESET ROLE;
-- A shorter reservation (the setting is for superusers only).
SET eventshop.reservation_ttl = '90s';
SET ROLE regress_orders_app;
SELECT throws_ok($$SET eventshop.reservation_ttl = '1d'$$, '42501', 'permission denied to set parameter "eventshop.reservation_ttl"',
                 'an application cannot lengthen its reservations');
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT * FROM eventshop.place_order('[{"sku": "MUG-1", "quantity": 1}]') \gset o6_
COMMIT;
RESET ROLE;
RESET eventshop.reservation_ttl;
SELECT ok((SELECT reserved_until = created_at + interval '90 seconds' FROM eventshop.orders WHERE id = :'o6_order_id'),
          'eventshop.reservation_ttl sets the reservation''s length');

-- ---------------------------------------------------------------------------
-- The lifecycle: every transition, allowed or refused, through the trigger
-- ---------------------------------------------------------------------------
-- Tries one status change on a scratch order and undoes it: 'allowed' or the SQLSTATE.
CREATE FUNCTION regress_orders.try_transition(from_status text, to_status text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_state text;
BEGIN
	BEGIN
		INSERT INTO eventshop.orders (id, user_id, status, currency, total_minor, item_count, unit_count, created_at,
									  reserved_until, updated_at, completed_at)
		VALUES ('00000000-0000-7000-8000-0000000000ff', (SELECT id FROM eventshop.users LIMIT 1), from_status, 'EUR', 1, 1, 1,
				now(), now(), now(), CASE WHEN from_status IN ('completed', 'refunded') THEN now() END);
		UPDATE eventshop.orders SET status = to_status,
			completed_at = CASE WHEN to_status IN ('completed', 'refunded') THEN now() END
		WHERE id = '00000000-0000-7000-8000-0000000000ff';
		RAISE EXCEPTION 'undo' USING ERRCODE = 'P0099';
	EXCEPTION WHEN OTHERS THEN
		v_state := CASE SQLSTATE WHEN 'P0099' THEN 'allowed' ELSE SQLSTATE END;
	END;
	RETURN v_state;
END
$$;
SELECT results_eq($$SELECT f || ' -> ' || t FROM unnest(ARRAY['reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded']) f,
                         unnest(ARRAY['reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded']) t
                    WHERE f <> t AND regress_orders.try_transition(f, t) = 'allowed' ORDER BY 1$$,
                  $$VALUES ('completed -> refunded'), ('paid -> completed'), ('reserved -> cancelled'),
                           ('reserved -> expired'), ('reserved -> paid')$$,
                  'exactly five status transitions are allowed');
SELECT is((SELECT count(*) FROM unnest(ARRAY['reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded']) f,
                                unnest(ARRAY['reserved', 'paid', 'completed', 'cancelled', 'expired', 'refunded']) t
           WHERE f <> t AND regress_orders.try_transition(f, t) = '55000'), 25::bigint,
          'the other 25 are refused with 55000');
SELECT throws_ok(format($$UPDATE eventshop.orders SET status = 'reserved' WHERE id = %L$$, :'o2_order_id'), '55000',
                 'invalid order status transition from cancelled to reserved', 'the trigger names the refused transition');

-- ---------------------------------------------------------------------------
-- Admin reports
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_gw;
SELECT is((SELECT order_status FROM eventshop.record_payment(:'o3_order_id', 'stripe', 'pi_o3', 'succeeded', 10598, 'EUR')),
          'completed', 'bob''s checkout order is paid');
SELECT is((SELECT order_status FROM eventshop.record_payment(:'last_order_id', 'stripe', 'pi_last', 'succeeded', 2500, 'EUR')),
          'completed', 'alice''s lamp is paid');
RESET ROLE;
SELECT (now() AT TIME ZONE 'UTC')::date AS today \gset
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT results_eq(format($$SELECT day = %L::date, currency, orders, units, revenue_minor FROM eventshop.sales_by_day(%L::date - 1, %L::date)$$, :'today', :'today', :'today'),
                  $$VALUES (true, 'EUR', 2::bigint, 5::bigint, 13098::bigint)$$,
                  'sales_by_day: two completed orders today (the refunded one does not count)');
SELECT results_eq(format($$SELECT category, currency, orders, units, revenue_minor FROM eventshop.sales_by_category(%L, %L)$$, :'today', :'today'),
                  $$VALUES ('books', 'EUR', 1::bigint, 2::bigint, 9000::bigint), ('kitchen', 'EUR', 2::bigint, 3::bigint, 4098::bigint)$$,
                  'sales_by_category: revenue per category of the snapshotted lines');
SELECT is_empty(format($$SELECT * FROM eventshop.sales_by_day(%L::date + 1, %L::date + 30)$$, :'today', :'today'),
                'sales_by_day: nothing in the future');
SELECT throws_ok(format($$SELECT * FROM eventshop.sales_by_day(%L, %L::date - 1)$$, :'today', :'today'), '22023', 'invalid date range',
                 'sales_by_day refuses a range that ends before it starts');
SELECT throws_ok($$SELECT * FROM eventshop.sales_by_category('2024-01-01', '2025-06-01')$$, '22023', 'invalid date range',
                 'sales_by_category refuses a range over a year');
SELECT throws_ok($$SELECT * FROM eventshop.sales_by_day(NULL, '2025-06-01')$$, '22004', 'from_date and to_date are required',
                 'sales_by_day needs both dates');
COMMIT;
BEGIN;
SELECT (eventshop.authenticate(:'alice')).user_id IS NOT NULL AS ok \gset
SELECT throws_ok($$SELECT * FROM eventshop.sales_by_day('2025-01-01', '2025-01-31')$$, '42501', 'administrator role required',
                 'a customer cannot read the sales');
SELECT throws_ok($$SELECT * FROM eventshop.sales_by_category('2025-01-01', '2025-01-31')$$, '42501', 'administrator role required',
                 'nor the sales per category');
COMMIT;
RESET ROLE;

-- ---------------------------------------------------------------------------
-- verify_webhook_signature (Stripe's scheme; vector computed independently
-- with Python's hmac: HMAC-SHA256('whsec_test', '1700000000.' || payload))
-- ---------------------------------------------------------------------------
\set wh_payload '{"id":"evt_1","type":"payment_intent.succeeded"}'
\set wh_sig '001ce3ef73e456cedaab328328720d3ad59defb8bbd0f1518f46c04ad4ac0bb7'
SET ROLE regress_orders_gw;
SELECT ok(eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'a valid signature verifies');
SELECT ok(eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000300),
          'at the edge of the tolerance it still verifies');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000301),
          'one second later it is too old (replay)');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1699999699),
          'a timestamp too far in the future is refused');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_test'),
          'with the current time a 2023 signature is too old');
SELECT ok(NOT eventshop.verify_webhook_signature(replace(:'wh_payload', 'evt_1', 'evt_2'), 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'a changed payload does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000001,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'a changed timestamp does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', 'whsec_other', 300, 1700000000),
          'another secret does not verify');
SELECT ok(eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000, v1=' || repeat('0', 64) || ', v1=' || :'wh_sig' || ', v0=abc',
                                             'whsec_test', 300, 1700000000),
          'one valid v1 among several (secret rollover) verifies; v0 is ignored');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v0=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'a v0 signature alone does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,t=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'two timestamps do not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 'v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'no timestamp does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || left(:'wh_sig', 63), 'whsec_test', 300, 1700000000),
          'a truncated signature does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=abc,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000),
          'a timestamp that is not a number does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 'garbage', 'whsec_test', 300, 1700000000),
          'a malformed header does not verify');
SELECT ok(NOT eventshop.verify_webhook_signature(:'wh_payload', 't=1700000000,v1=' || :'wh_sig', '', 300, 1700000000),
          'an empty secret never verifies');
SELECT ok(NOT coalesce(eventshop.verify_webhook_signature(NULL, 't=1700000000,v1=' || :'wh_sig', 'whsec_test', 300, 1700000000), true),
          'a NULL payload does not verify');
SELECT throws_ok($$SELECT eventshop.verify_webhook_signature('x', 't=1,v1=00', 'k', -1)$$, '22023',
                 'tolerance_seconds must be between 0 and 86400', 'a negative tolerance is refused');
RESET ROLE;
SET ROLE regress_orders_app;
SELECT throws_ok($$SELECT eventshop.verify_webhook_signature('x', 't=1,v1=00', 'k')$$, '42501',
                 'permission denied for function verify_webhook_signature', 'the webhook check is for the gateway, not applications');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- place_order(access_token, items): authenticate and place in one call
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
BEGIN;
SELECT (eventshop.authenticate(:'admin')).user_id IS NOT NULL AS ok \gset
SELECT eventshop.create_product('ONE-CALL-1', 'One-call lamp', 700, 'EUR', 10, 'kitchen') IS NOT NULL AS ok \gset
COMMIT;
SELECT regress_orders.outbox_count() AS events_before \gset
SELECT * FROM eventshop.place_order(:'alice', '[{"sku": "ONE-CALL-1", "quantity": 2}]') \gset o3_
SELECT is(:'o3_status' || ' ' || :'o3_currency' || ' ' || :'o3_total_minor' || ' ' || :'o3_item_count', 'reserved EUR 1400 1',
          'place_order(access_token, items) places the order in one call, outside any explicit transaction');
SELECT is(regress_orders.stock('ONE-CALL-1') || ', events +' || (regress_orders.outbox_count() - :events_before), '10/2, events +1',
          'and reserves its units and emits one event in the same transaction');
RESET ROLE;
SELECT results_eq(format($$SELECT o.user_id::text, e.event_type, e.payload->'data'->>'user_id'
                           FROM eventshop.orders o JOIN eventshop.outbox e ON e.message_key = o.id::text WHERE o.id = %L$$, :'o3_order_id'),
                  format($$VALUES (%L, 'order.created', %L)$$, :'alice_id', :'alice_id'),
                  'the order and its order.created event belong to the token''s user');
SET ROLE regress_orders_app;
BEGIN;
SELECT order_id AS o4_id FROM eventshop.place_order(:'bob', '[{"sku": "ONE-CALL-1", "quantity": 1}]') \gset
SELECT ok(EXISTS (SELECT FROM eventshop.list_orders() l WHERE l.order_id = :'o4_id'),
          'place_order(access_token, items) establishes the caller for the rest of the transaction (list_orders shows the order)');
SELECT is(eventshop.current_user_id()::text, :'bob_id', 'the caller it establishes is the token''s user');
ROLLBACK;
SELECT regress_orders.row_counts() AS counts_before \gset
SELECT throws_ok(format('SELECT eventshop.place_order(%L, %L)', t, i), e, m, 'place_order(access_token, items) refuses ' || d)
FROM (VALUES
	(NULL::text, '[{"sku": "ONE-CALL-1", "quantity": 1}]', '28000', 'invalid token', 'a NULL token'),
	('not-a-token', '[{"sku": "ONE-CALL-1", "quantity": 1}]', '28000', 'invalid token', 'a malformed token'),
	(left(:'alice', -4) || CASE WHEN right(:'alice', 4) = 'AAAA' THEN 'BBBB' ELSE 'AAAA' END,
	 '[{"sku": "ONE-CALL-1", "quantity": 1}]', '28000', 'invalid token', 'a token with a forged signature'),
	('not-a-token', '[]', '28000', 'invalid token', 'a bad token before looking at the items'),
	(:'bob', '[]', '22023', 'an order needs at least one item', 'an empty order (valid token)'),
	(:'bob', '[{"sku": "NOPE-9", "quantity": 1}]', 'P0002', 'unknown SKU "NOPE-9"', 'an unknown SKU (valid token)'),
	(:'bob', '[{"sku": "ONE-CALL-1", "quantity": 9}]', '23514', 'insufficient stock for SKU "ONE-CALL-1"', 'more than the stock (valid token)')
) AS v(t, i, e, m, d);
SELECT is(eventshop.current_user_id(), NULL, 'a refused call leaves no caller behind');
RESET ROLE;
SELECT is(regress_orders.row_counts() || ', ' || regress_orders.stock('ONE-CALL-1'), :'counts_before' || ', 10/2',
          'the refused calls wrote nothing, reserved nothing and emitted no event');

-- The caller's session, account and signing key are read by the reserve
-- statement itself: each refusal must still come first, lock nothing and
-- write nothing, also for a token whose signature the backend remembers.
SELECT eventshop.register('carol.orders@example.com', 'carol orders passphrase') AS carol_id \gset
SELECT access_token AS carol1, session_id AS carol1_sid FROM eventshop.login('carol.orders@example.com', 'carol orders passphrase') \gset
SELECT access_token AS carol2 FROM eventshop.login('carol.orders@example.com', 'carol orders passphrase') \gset
SET ROLE regress_orders_app;
SELECT lives_ok(format('SELECT eventshop.place_order(%L, %L)', :'carol1', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
                'carol orders in one call (her token''s signature is now remembered)');
SELECT lives_ok(format('SELECT eventshop.place_order(%L, %L)', :'carol2', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
                'and with her second session');
RESET ROLE;
SELECT regress_orders.row_counts() AS counts_before \gset
UPDATE eventshop.sessions SET revoked_at = clock_timestamp(), revoked_reason = 'revoked_by_user' WHERE id = :'carol1_sid';
SET ROLE regress_orders_app;
SELECT is(regress_orders.place_order_error(:'carol1', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The session has ended.', 'place_order(access_token, items) refuses an ended session');
SELECT is(regress_orders.place_order_error(:'carol1', '[]'),
          '28000: invalid token / The session has ended.', 'an ended session is reported before bad items');
SELECT is(regress_orders.place_order_error(:'carol1', '[{"sku": "NOPE-9", "quantity": 1}]'),
          '28000: invalid token / The session has ended.', 'an ended session is reported before an unknown SKU');
RESET ROLE;
UPDATE eventshop.users SET status = 'blocked', blocked_at = clock_timestamp() WHERE id = :'carol_id';
SET ROLE regress_orders_app;
SELECT is(regress_orders.place_order_error(:'carol2', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The account is blocked.', 'place_order(access_token, items) refuses a blocked account');
SELECT is(regress_orders.place_order_error(:'carol2', '{"sku": "ONE-CALL-1"}'),
          '28000: invalid token / The account is blocked.', 'a blocked account is reported before malformed items');
RESET ROLE;
UPDATE eventshop.users SET status = 'active', blocked_at = NULL, valid_after = clock_timestamp() + interval '2 seconds' WHERE id = :'carol_id';
SET ROLE regress_orders_app;
SELECT is(regress_orders.place_order_error(:'carol2', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The token was issued before the account''s credentials changed.',
          'place_order(access_token, items) refuses a token older than the account''s credentials');
RESET ROLE;
UPDATE eventshop.users SET valid_after = '-infinity' WHERE id = :'carol_id';
-- a token naming a session of another user (signed by the active key)
SELECT eventshop._jwt_sign(jsonb_build_object(
	'iss', 'eventshop', 'aud', 'eventshop', 'sub', :'bob_id', 'sid', s.id::text, 'typ', 'access', 'jti', 'regress-orders',
	'iat', floor(extract(epoch FROM now())) - 5, 'nbf', floor(extract(epoch FROM now())) - 5,
	'exp', floor(extract(epoch FROM now())) + 600)) AS bob_with_carols_session
FROM eventshop.sessions s WHERE s.user_id = :'carol_id' AND s.revoked_at IS NULL LIMIT 1 \gset
SET ROLE regress_orders_app;
SELECT is(regress_orders.place_order_error(:'bob_with_carols_session', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The session is unknown.', 'place_order(access_token, items) refuses another user''s session');
SELECT is(regress_orders.place_order_error(:'bob_with_carols_session', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The session is unknown.', 'also once its signature is remembered');
RESET ROLE;
SELECT is(regress_orders.row_counts() || ', ' || regress_orders.stock('ONE-CALL-1'), :'counts_before' || ', 10/4',
          'the refused callers wrote nothing, reserved nothing and emitted no event');
SET ROLE regress_orders_app;
SELECT lives_ok(format('SELECT eventshop.place_order(%L, %L)', :'carol2', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
                'carol orders again once her account is in order');
SELECT regress_orders.row_counts() AS counts_before \gset
RESET ROLE;
-- revoking the key that signed a remembered token refuses it at once
SELECT convert_from(decode(translate(split_part(:'carol2', '.', 1), '-_', '+/')
                           || repeat('=', (4 - length(split_part(:'carol2', '.', 1)) % 4) % 4), 'base64'), 'UTF8')::jsonb->>'kid' AS carol_kid \gset
SELECT eventshop.rotate_signing_keys() IS NOT NULL AS rotated \gset
SELECT eventshop.revoke_signing_key(:'carol_kid') AS revoked \gset
SET ROLE regress_orders_app;
SELECT is(regress_orders.place_order_error(:'carol2', '[{"sku": "ONE-CALL-1", "quantity": 1}]'),
          '28000: invalid token / The signing key was revoked.', 'place_order(access_token, items) refuses a remembered token once its key is revoked');
SELECT is(regress_orders.place_order_error(:'carol2', '[]'),
          '28000: invalid token / The signing key was revoked.', 'a revoked key is reported before bad items');
RESET ROLE;
SELECT is(regress_orders.row_counts() || ', ' || regress_orders.stock('ONE-CALL-1'), :'counts_before' || ', 10/5',
          'a refused remembered token wrote nothing, reserved nothing and emitted no event');
SELECT is((SELECT count(*) FROM pg_locks l WHERE l.locktype = 'tuple' OR (l.locktype = 'transactionid' AND NOT l.granted)), 0::bigint,
          'and no lock is left behind');

-- ---------------------------------------------------------------------------
-- Every order keeps its user (no foreign key on orders.user_id: the trigger
-- users_keep_orders, src/order_owners.c; the races are in specs/)
-- ---------------------------------------------------------------------------
SELECT hasnt_fk('eventshop', 'orders', 'orders has no foreign key: its check would cost a query and a row lock per order');
SELECT throws_ok(format('DELETE FROM eventshop.users WHERE id = %L', :'alice_id'), '23503',
                 'a user who has orders cannot be deleted', 'a user with orders cannot be deleted');
SELECT throws_ok(format('UPDATE eventshop.users SET id = gen_random_uuid() WHERE id = %L', :'alice_id'), '23503',
                 'a user who has orders cannot be given another id', 'nor given another id');
SELECT lives_ok(format('UPDATE eventshop.users SET id = id, display_name = display_name WHERE id = %L', :'alice_id'),
                'an update that keeps the id is let through');
SELECT throws_ok('TRUNCATE eventshop.users CASCADE', '23503', 'cannot truncate eventshop.users while orders exist',
                 'users cannot be truncated while orders exist');
SELECT eventshop.register('dave.orders@example.com', 'dave orders passphrase') AS dave_id \gset
SELECT lives_ok(format('DELETE FROM eventshop.users WHERE id = %L', :'dave_id'), 'a user without orders can be deleted');

-- ---------------------------------------------------------------------------
-- Privileges of the new roles and internal functions
-- ---------------------------------------------------------------------------
SET ROLE regress_orders_app;
SELECT throws_ok(format('SELECT * FROM eventshop.%I', t), '42501', format('permission denied for table %s', t),
                 format('eventshop_app cannot read %s', t))
FROM unnest(ARRAY['products', 'orders', 'order_items', 'payments', 'cart_items']) AS t;
SELECT throws_ok($$UPDATE eventshop.products SET stock_on_hand = 1000$$, '42501', 'permission denied for table products',
                 'eventshop_app cannot change stock directly');
SELECT throws_ok(format('SELECT eventshop.%s', f), '42501', format('permission denied for function %s', split_part(f, '(', 1)),
                 format('eventshop_app cannot call %s', split_part(f, '(', 1)))
FROM unnest(ARRAY['_parse_order_items(''[]'')', '_uuid_v7()', '_release_stock(''{}'')',
                  $f$_record_provider_result('payment', NULL, 'x', 'x', 'succeeded', 1, 'EUR')$f$]) AS f;
RESET ROLE;
SET ROLE regress_orders_gw;
SELECT throws_ok($$SELECT eventshop.place_order('[]')$$, '42501', 'permission denied for function place_order',
                 'the gateway cannot place orders');
SELECT throws_ok($$SELECT * FROM eventshop.payments$$, '42501', 'permission denied for table payments',
                 'the gateway cannot read the payments table');
RESET ROLE;

-- ---------------------------------------------------------------------------
-- Invariants and events
-- ---------------------------------------------------------------------------
SELECT is_empty($$SELECT p.sku FROM eventshop.products p
                  WHERE p.reserved <> coalesce((SELECT sum(i.quantity) FROM eventshop.order_items i
                                                JOIN eventshop.orders o ON o.id = i.order_id
                                                WHERE o.status = 'reserved' AND i.product_id = p.id), 0)$$,
                'every product''s reserved count is the sum of its reserved orders'' lines');
SELECT is_empty($$SELECT id FROM eventshop.orders o WHERE total_minor <>
                  (SELECT sum(i.unit_price_minor * i.quantity) FROM eventshop.order_items i WHERE i.order_id = o.id)$$,
                'every order total is the sum of its lines');
SELECT set_eq($$SELECT DISTINCT event_type FROM eventshop.outbox WHERE topic IN ('orders.events', 'payments.events')$$,
              ARRAY['order.created', 'order.cancelled', 'order.expired', 'order.completed',
                    'payment.succeeded', 'payment.failed', 'payment.refunded'],
              'these are the order and payment events, and all of them occurred');
SELECT is_empty($$SELECT event_type FROM eventshop.outbox WHERE topic IN ('orders.events', 'payments.events')
                  AND (split_part(event_type, '.', 1) || 's.events' <> topic
                       OR message_key <> payload->'data'->>'order_id'
                       OR payload->>'subject' <> message_key)$$,
                'order events on orders.events, payment events on payments.events, all keyed by the order id');
SELECT is_empty($$SELECT event_type FROM eventshop.outbox WHERE topic IN ('orders.events', 'payments.events')
                  AND (payload::text LIKE '%@%' OR payload::text LIKE '%eyJ%')$$,
                'no order or payment event carries an e-mail address or a token');

SELECT * FROM finish();

DROP SCHEMA regress_orders CASCADE;
DROP ROLE regress_orders_app;
DROP ROLE regress_orders_gw;
DROP ROLE regress_orders_ops;
