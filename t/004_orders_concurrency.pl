# 004_orders_concurrency.pl: inventory under concurrency, which a single
# pg_regress session cannot show. Twenty sessions, each authenticated with its
# own user's access token, are held at a barrier inside their transaction and
# then released at once to race for the last units of stock:
# - round 1: the last 5 units of one product, one unit each;
# - round 2: the last 6 units of three products, every client ordering all
#   three in a different item order (the classic lock-order deadlock);
# - round 3: four products with 10 units each, 2-4 lines per order with
#   quantities 1-3 in shuffled order (partial fits must be refused whole);
# - round 4: the owners of round 2's orders cancel them while the other
#   clients order the released units, items in shuffled order again.
# In every round: no caller sees a deadlock (40P01), serialization failure
# (40001) or any error but the documented 23514 "insufficient stock"; every
# reservation is exactly the sum of the successful orders, never more than
# the stock; a monitor session observing the products in a tight loop (one
# snapshot per iteration) never sees stock_on_hand, reserved or available
# below 0; refusals are justified (the SKU the error names really lacks the
# units); the outbox holds exactly one order.created per successful order
# (naming its customer, line count, units and total) and one order.cancelled
# per cancel, and nothing for refused orders; and the server detected no
# deadlock at all, not even one caught and retried inside a function. Needs
# no Kafka: both workers are off. Skipped while the installed extension has
# no orders module.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use IPC::Run;
use JSON::PP;
use List::Util qw(shuffle sum0);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $clients = 20;
my $barrier = 4004;    # advisory lock key that holds every client until the race starts
my $timeout = $PostgreSQL::Test::Utils::timeout_default;
my $scripts = PostgreSQL::Test::Utils::tempdir();    # the clients' SQL scripts

my $node = worker_free_node('orders', <<'CONF');
max_connections = 60
# a lock-order deadlock, if the code allowed one, is detected (and raised) quickly
deadlock_timeout = '20ms'
log_lock_waits = on
CONF
$node->safe_psql('postgres', 'SELECT eventshop.rotate_signing_keys()');
if ($node->safe_psql('postgres', "SELECT to_regprocedure('eventshop.place_order(jsonb)') IS NULL") eq 't')
{
	$node->stop;
	plan skip_all => 'the orders module (eventshop.place_order) is not in the installed extension';
}

# Accounts: one administrator for the catalog, one customer per client.
my $register_sql = "SELECT eventshop.register('admin.orders\@example.com', 'tap admin passphrase');\n"
  . join('', map { "SELECT eventshop.register('client$_.orders\@example.com', 'tap client passphrase');\n" } 1 .. $clients);
$node->safe_psql('postgres', $register_sql);
$node->safe_psql('postgres',
	"UPDATE eventshop.users SET roles = '{customer,admin}' WHERE email = 'admin.orders\@example.com'");
my $admin_token = $node->safe_psql('postgres',
	"SELECT access_token FROM eventshop.login('admin.orders\@example.com', 'tap admin passphrase')");
my @token = (undef,
	map {
		$node->safe_psql('postgres',
			"SELECT access_token FROM eventshop.login('client$_.orders\@example.com', 'tap client passphrase')")
	} 1 .. $clients);
is(scalar(grep { defined && /^[\w-]+\.[\w-]+\.[\w-]+$/ } @token), $clients, "$clients customers logged in, one access token each");
my %user_of = split /[|\n]/, $node->safe_psql('postgres',
	"SELECT split_part(split_part(email, '.', 1), 'client', 2), id FROM eventshop.users WHERE email LIKE 'client%.orders\@example.com'");
is(scalar(keys %user_of), $clients, 'and their user ids are known');


# Runs SQL as the administrator in one transaction.
sub as_admin
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', "BEGIN;\nSELECT FROM eventshop.authenticate('$admin_token');\n$sql\nCOMMIT;");
}

my %stock = (SOLO => 5, A => 6, B => 6, C => 6, M1 => 10, M2 => 10, M3 => 10, M4 => 10);
as_admin(join("\n",
		map { "SELECT FROM eventshop.create_product('$_', 'Product $_', 1250, 'EUR', $stock{$_}, 'tap');" }
		  sort keys %stock));

# Current stock_on_hand, reserved and available of one product, as the API reports them.
sub product
{
	my ($sku) = @_;
	my ($on_hand, $reserved, $available) = split /\|/, $node->safe_psql('postgres',
		"SELECT stock_on_hand, reserved, available FROM eventshop.get_product('$sku')");
	return { on_hand => $on_hand, reserved => $reserved, available => $available };
}

# Observations by the monitor session; one row per product per loop iteration.
$node->safe_psql('postgres', q{
CREATE TABLE race_observations (
	round integer, iteration integer, sku text, stock_on_hand integer,
	reserved integer, available integer, clients_active integer);
});

my %events_expected = ('order.created' => {}, 'order.cancelled' => {});
my $round = 0;

# Starts one client: it authenticates, waits at the barrier inside its
# transaction, then runs $call (place_order or cancel_order) and commits.
# Errors are printed with their SQLSTATE (VERBOSITY verbose).
sub start_client
{
	my ($i, $call) = @_;
	my ($out, $err) = ('', '');
	my $script = "$scripts/round$round-client$i.sql";
	append_to_file($script, <<"SQL");
BEGIN;
SELECT FROM eventshop.authenticate('$token[$i]');
SELECT FROM pg_advisory_xact_lock_shared($barrier);
SELECT 'result=' || order_id || ',' || status FROM $call;
COMMIT;
SQL
	my $h = IPC::Run::start(
		[
			'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose',
			'-d', $node->connstr('postgres') . ' application_name=race_client', '-f', $script
		],
		'>', \$out, '2>', \$err, IPC::Run::timeout($timeout));
	return { i => $i, harness => $h, out => \$out, err => \$err };
}

# Runs one race: the barrier is taken, every client started and queued on it,
# a monitor loop started, the barrier released; returns the outcomes
# ({ i, order_id, status } or { i, sqlstate, message, detail }) once every
# client and the monitor finished (each bounded by the test timeout).
sub race
{
	my ($calls, $skus) = @_;    # $calls: client number => SQL call
	$round++;
	my $gate = $node->background_psql('postgres');
	$gate->query_safe("SELECT pg_advisory_lock($barrier)");

	my @runs = map { start_client($_, $calls->{$_}) } sort { $a <=> $b } keys %$calls;
	my $n = scalar @runs;
	$node->poll_query_until('postgres',
		"SELECT count(*) = $n FROM pg_locks WHERE locktype = 'advisory' AND objid = $barrier AND NOT granted")
	  or die "round $round: clients did not all reach the barrier";

	# The monitor: one committed snapshot per iteration until no client is
	# left (or the timeout passes), so it sees every state the race commits.
	my $sku_list = join(', ', map { "'$_'" } @$skus);
	my ($mout, $merr) = ('', '');
	my $monitor_script = "$scripts/round$round-monitor.sql";
	append_to_file($monitor_script, <<"SQL");
SET synchronous_commit = off;
DO \$\$
DECLARE
	v_iteration integer := 0;
	v_active integer;
	v_deadline timestamptz := clock_timestamp() + interval '$timeout seconds';
BEGIN
	LOOP
		v_iteration := v_iteration + 1;
		SELECT count(*) INTO v_active FROM pg_stat_activity WHERE application_name = 'race_client';
		INSERT INTO race_observations
		SELECT $round, v_iteration, p.sku, p.stock_on_hand, p.reserved, p.available, v_active
		FROM unnest(ARRAY[$sku_list]) s, eventshop.get_product(s) p;
		COMMIT;
		EXIT WHEN v_active = 0 OR clock_timestamp() > v_deadline;
	END LOOP;
END
\$\$;
SQL
	my $monitor = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', $monitor_script ],
		'>', \$mout, '2>', \$merr, IPC::Run::timeout($timeout + 30));
	wait_for(
		sub {
			$monitor->pump_nb;
			die "round $round: the monitor failed: $merr" if $merr =~ /ERROR/;
			$node->safe_psql('postgres', "SELECT count(*) > 0 FROM race_observations WHERE round = $round") eq 't';
		},
		"round $round: the monitor observes");

	$gate->query_safe("SELECT pg_advisory_unlock($barrier)");    # go
	$gate->quit;

	my @outcomes;
	for my $r (@runs)
	{
		$r->{harness}->finish;
		my ($out, $err) = (${ $r->{out} }, ${ $r->{err} });
		if ($out =~ /^result=([0-9a-f-]{36}),(\w+)$/m)
		{
			push @outcomes, { i => $r->{i}, order_id => $1, status => $2 };
		}
		elsif ($err =~ /ERROR:\s+([0-9A-Z]{5}):\s+(.*)/)
		{
			my ($sqlstate, $message) = ($1, $2);
			my ($detail) = $err =~ /DETAIL:\s+(.*)/;
			push @outcomes, { i => $r->{i}, sqlstate => $sqlstate, message => $message, detail => $detail // '' };
		}
		else
		{
			push @outcomes, { i => $r->{i}, sqlstate => 'none', message => "no result: stdout '$out' stderr '$err'" };
		}
	}
	$monitor->finish or die "round $round: monitor failed: $merr";
	return @outcomes;
}

# Checks the outcomes of a round: every client got a result or 23514.
sub check_outcomes
{
	my ($what, @outcomes) = @_;
	my @bad = grep { !$_->{order_id} && $_->{sqlstate} ne '23514' } @outcomes;
	is(scalar(@bad), 0, "$what: every client got its order or 23514 insufficient stock, no other error")
	  or diag(join("\n", map { "client $_->{i}: $_->{sqlstate} $_->{message}" } @bad));
	my @serial = grep { ($_->{sqlstate} // '') =~ /^40/ } @outcomes;
	is(scalar(@serial), 0, "$what: no deadlock (40P01) or serialization failure (40001) reached a caller");
	return grep { $_->{order_id} } @outcomes;
}

# Checks the monitor's observations of a round: never below zero.
sub check_observations
{
	my ($what) = @_;
	my ($iterations, $during, $negative) = split /\|/, $node->safe_psql('postgres', qq{
		SELECT count(DISTINCT iteration), count(DISTINCT iteration) FILTER (WHERE clients_active > 0),
		       count(*) FILTER (WHERE stock_on_hand < 0 OR reserved < 0 OR available < 0
		                           OR available <> stock_on_hand - reserved)
		FROM race_observations WHERE round = $round});
	cmp_ok($during, '>=', 1, "$what: the monitor observed the products while clients were connected ($during of $iterations snapshots)");
	is($negative, 0, "$what: stock_on_hand, reserved and available were >= 0 (and consistent) in every snapshot");
}

# Checks that each refusal was justified: the SKU the error names is in the
# order and, at the end of the round (availability only falls during a round
# without cancels), has fewer units available than were requested.
sub check_refusals
{
	my ($what, $requests, @outcomes) = @_;
	my @unjustified;
	for my $o (grep { !$_->{order_id} && $_->{sqlstate} eq '23514' } @outcomes)
	{
		my ($sku) = $o->{message} =~ /SKU "([^"]+)"/;
		my ($requested) = $o->{detail} =~ /requested (\d+)/i;
		my %want = map { $_->{sku} => $_->{quantity} } @{ $requests->{ $o->{i} } };
		push @unjustified, "client $o->{i}: $o->{message} ($o->{detail})"
		  unless defined $sku && defined $want{$sku} && defined $requested && $requested == $want{$sku}
		  && product($sku)->{available} < $requested;
	}
	is(scalar(@unjustified), 0, "$what: every refusal named a SKU of the order that really lacked the units")
	  or diag(join("\n", @unjustified));
}

# The SQL call placing an order of the given lines ([{ sku, quantity }]).
sub place_call
{
	my ($lines) = @_;
	return "eventshop.place_order('" . encode_json($lines) . "'::jsonb)";
}

# Sums quantities per SKU over the given requests.
sub units_by_sku
{
	my (@requests) = @_;
	my %units;
	for my $lines (@requests) { $units{ $_->{sku} } += $_->{quantity} for @$lines; }
	return %units;
}

# ---------------------------------------------------------------------------
# Round 1: the last 5 units of one product, 20 clients.
# ---------------------------------------------------------------------------
{
	my %requests = map { $_ => [ { sku => 'SOLO', quantity => 1 } ] } 1 .. $clients;
	my @outcomes = race({ map { $_ => place_call($requests{$_}) } keys %requests }, ['SOLO']);
	my @won = check_outcomes('last 5 units', @outcomes);
	is(scalar(@won), 5, "last 5 units: exactly 5 of $clients clients got an order");
	is(scalar(grep { $_->{status} eq 'reserved' } @won), 5, 'and every order is reserved');
	my $p = product('SOLO');
	is("$p->{reserved}/$p->{available}/$p->{on_hand}", '5/0/5', 'SOLO: 5 reserved, 0 available, 5 on hand');
	check_observations('last 5 units');
	check_refusals('last 5 units', \%requests, @outcomes);
	$events_expected{'order.created'}{ $_->{order_id} } = { lines => $requests{ $_->{i} }, client => $_->{i} } for @won;
}

# ---------------------------------------------------------------------------
# Round 2: the last 6 units of A, B and C; every client orders one of each,
# in one of the six item orders.
# ---------------------------------------------------------------------------
my %round2_orders;    # client => order id
{
	my @perms = ([qw(A B C)], [qw(A C B)], [qw(B A C)], [qw(B C A)], [qw(C A B)], [qw(C B A)]);
	my %requests = map {
		my $i = $_;
		$i => [ map { { sku => $_, quantity => 1 } } @{ $perms[ $i % 6 ] } ]
	} 1 .. $clients;
	my @outcomes = race({ map { $_ => place_call($requests{$_}) } keys %requests }, [qw(A B C)]);
	my @won = check_outcomes('3 products, 6 item orders', @outcomes);
	is(scalar(@won), 6, "3 products, 6 item orders: exactly 6 of $clients clients got an order");
	for my $sku (qw(A B C))
	{
		my $p = product($sku);
		is("$p->{reserved}/$p->{available}", '6/0', "$sku: exactly 6 reserved, 0 available");
	}
	check_observations('3 products, 6 item orders');
	check_refusals('3 products, 6 item orders', \%requests, @outcomes);
	$events_expected{'order.created'}{ $_->{order_id} } = { lines => $requests{ $_->{i} }, client => $_->{i} } for @won;
	$round2_orders{ $_->{i} } = $_->{order_id} for @won;
}

# ---------------------------------------------------------------------------
# Round 3: 4 products with 10 units each; 2-4 lines, quantities 1-3, shuffled.
# ---------------------------------------------------------------------------
{
	srand(4004);
	my %requests;
	for my $i (1 .. $clients)
	{
		my @skus = (shuffle(qw(M1 M2 M3 M4)))[ 0 .. 1 + int(rand(3)) ];
		$requests{$i} = [ map { { sku => $_, quantity => 1 + int(rand(3)) } } @skus ];
	}
	my @outcomes = race({ map { $_ => place_call($requests{$_}) } keys %requests }, [qw(M1 M2 M3 M4)]);
	my @won = check_outcomes('mixed quantities', @outcomes);
	cmp_ok(scalar(@won), '>=', 1, 'mixed quantities: some orders succeeded (' . scalar(@won) . ')');
	cmp_ok(scalar(@won), '<', $clients, 'and some were refused (demand exceeds stock)');
	my %units = units_by_sku(map { $requests{ $_->{i} } } @won);
	my @wrong;
	for my $sku (qw(M1 M2 M3 M4))
	{
		my $p = product($sku);
		my $want = $units{$sku} // 0;
		push @wrong, "$sku: reserved $p->{reserved}, orders hold $want, available $p->{available}"
		  unless $p->{reserved} == $want && $p->{available} == 10 - $want && $p->{available} >= 0;
	}
	is(scalar(@wrong), 0, 'mixed quantities: reserved = the units of the successful orders exactly, never above stock')
	  or diag(join("\n", @wrong));
	check_observations('mixed quantities');
	check_refusals('mixed quantities', \%requests, @outcomes);
	$events_expected{'order.created'}{ $_->{order_id} } = { lines => $requests{ $_->{i} }, client => $_->{i} } for @won;
}

# ---------------------------------------------------------------------------
# Round 4: round 2's winners cancel while everyone else orders A, B and C.
# ---------------------------------------------------------------------------
{
	my %calls;
	my %requests;
	for my $i (1 .. $clients)
	{
		if ($round2_orders{$i})
		{
			$calls{$i} = "eventshop.cancel_order('$round2_orders{$i}')";
		}
		else
		{
			$requests{$i} = [ map { { sku => $_, quantity => 1 } } shuffle(qw(A B C)) ];
			$calls{$i} = place_call($requests{$i});
		}
	}
	my @outcomes = race(\%calls, [qw(A B C)]);
	my @cancels = grep { $round2_orders{ $_->{i} } } @outcomes;
	my @orders = grep { !$round2_orders{ $_->{i} } } @outcomes;
	my $cancelled = grep { $_->{order_id} && $_->{status} eq 'cancelled' } @cancels;
	is($cancelled, scalar(keys %round2_orders), 'cancel vs order: every cancel succeeded')
	  or diag(explain(\@cancels));
	my @won = check_outcomes('cancel vs order', @outcomes);
	@won = grep { !$round2_orders{ $_->{i} } } @won;
	cmp_ok(scalar(@won), '<=', 6, 'cancel vs order: at most the 6 released units were ordered again (' . scalar(@won) . ')');
	my @wrong;
	for my $sku (qw(A B C))
	{
		my $p = product($sku);
		push @wrong, "$sku: reserved $p->{reserved}, available $p->{available}, new orders " . scalar(@won)
		  unless $p->{reserved} == scalar(@won) && $p->{available} == 6 - scalar(@won);
	}
	is(scalar(@wrong), 0, 'cancel vs order: reserved = the new orders exactly, the cancelled ones released')
	  or diag(join("\n", @wrong));
	check_observations('cancel vs order');
	$events_expected{'order.created'}{ $_->{order_id} } = { lines => $requests{ $_->{i} }, client => $_->{i} } for @won;
	$events_expected{'order.cancelled'}{ $round2_orders{$_} } = { client => $_ } for keys %round2_orders;
}

# ---------------------------------------------------------------------------
# The outbox: one order.created per successful order (with its customer,
# status, line count, units and total), one order.cancelled per cancel,
# nothing else on orders.events.
# ---------------------------------------------------------------------------
my @events = map { [ split /\|/, $_, 3 ] } split /\n/, $node->safe_psql('postgres',
	"SELECT message_key, event_type, payload->'data' FROM eventshop.outbox WHERE topic = 'orders.events' ORDER BY id");
my %seen;
my @event_problems;
for my $e (@events)
{
	my ($key, $type, $data) = @$e;
	$seen{$type}{$key}++;
	my $d = decode_json($data);
	push @event_problems, "$type $key: data.order_id is " . ($d->{order_id} // 'missing') if ($d->{order_id} // '') ne $key;
	my $want = $events_expected{$type} && $events_expected{$type}{$key} or next;
	push @event_problems, "$type $key: data.user_id is " . ($d->{user_id} // 'missing') . ", not client $want->{client}'s"
	  if ($d->{user_id} // '') ne $user_of{ $want->{client} };
	if ($type eq 'order.created')
	{
		# contract v2: minimal data, no lines; their count and units must match the order
		my $lines = scalar @{ $want->{lines} };
		my $units = sum0(map { $_->{quantity} } @{ $want->{lines} });
		my $got = join('/', map { $d->{$_} // 'missing' } qw(status item_count unit_count currency total_minor));
		push @event_problems, "order.created $key: status/item_count/unit_count/currency/total_minor $got, ordered $lines lines, $units units"
		  unless $got eq "reserved/$lines/$units/EUR/" . (1250 * $units);
	}
	elsif ($type eq 'order.cancelled')
	{
		push @event_problems, "order.cancelled $key: by is " . ($d->{by} // 'missing') if ($d->{by} // '') ne 'user';
	}
}
for my $type (sort keys %events_expected)
{
	my $want = join(',', sort keys %{ $events_expected{$type} });
	my $got = join(',', sort keys %{ $seen{$type} // {} });
	is($got, $want, "outbox: one $type for each of the " . scalar(keys %{ $events_expected{$type} }) . ' expected orders');
	is(scalar(grep { $_ != 1 } values %{ $seen{$type} // {} }), 0, "outbox: no order has two $type events");
}
is(join(',', grep { !$events_expected{$_} } sort keys %seen), '', 'outbox: no other event type on orders.events');
is(scalar(@event_problems), 0, "outbox: every event names its order and its customer; order.created has the order's status, lines, units and total")
  or diag(join("\n", @event_problems));

is($node->safe_psql('postgres', 'SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()'),
	'0', 'the server detected no deadlock at all (none caught and retried inside either)');
ok($node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'client backend'"),
	'no client session was left behind');
$node->stop;
done_testing();
