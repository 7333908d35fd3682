# The relay at production grade, checked against what the dev broker holds:
# commit order for late committers and across restarts, kill -9 of the
# postmaster in the middle of a large drain, a 30-second broker outage under
# load, poison messages parked and retried, and settings reloaded on SIGHUP.
# Every check reads the events back from Kafka and compares them with the
# outbox (published rows stay there until purged).
use strict;
use warnings;
use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

# the dev broker keeps 5 MB per partition: 64 partitions hold every stage's events
my $broker = start_devbroker(partitions => 64);
my $node = relay_node('relay', $broker, <<'CONF');
eventshop.relay_max_in_flight = 20000
eventshop.relay_checkpoint_interval = '10ms'
eventshop.relay_batch_size = 2000
eventshop.kafka_properties = 'message.max.bytes=100000'
CONF

sub relay_pid
{
	# a terminated relay comes back after its restart interval
	$node->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventshop relay'")
	  or die 'the relay is not running';
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventshop relay'");
}

sub wait_published
{
	my ($what) = @_;
	$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status')
	  or die "relay did not publish $what";
}

# Emits $count events in transactions of $per_tx, for keys "$prefix-1".."$prefix-$keys";
# data.seq grows with commit order within this (single) session.
sub emit_events
{
	my ($prefix, $count, $per_tx, $keys) = @_;
	$node->safe_psql('postgres', <<"SQL");
CREATE SEQUENCE IF NOT EXISTS test_seq;
DO \$\$
BEGIN
	FOR i IN 1..$count LOOP
		PERFORM eventshop._emit_event('orders.events', '$prefix-' || (1 + i % $keys), 'order.created',
									  jsonb_build_object('seq', nextval('test_seq'), 'pad', repeat('p', 200)));
		IF i % $per_tx = 0 THEN
			COMMIT;
		END IF;
	END LOOP;
END
\$\$;
SQL
}

# Reads orders.events back and checks events of keys starting with $prefix:
# every outbox event is there, and per key the first occurrences come in
# data.seq order. Returns the number of duplicate deliveries.
sub check_stream
{
	my ($prefix, $what) = @_;
	my %expected = map { $_ => 1 } split /\n/, $node->safe_psql('postgres',
		"SELECT event_id FROM eventshop.outbox WHERE message_key LIKE '$prefix-%'");
	my (%seen, %last_seq, $duplicates, $out_of_order);
	$duplicates = $out_of_order = 0;
	my @messages = sort { $a->{partition} <=> $b->{partition} || $a->{offset} <=> $b->{offset} }
	  grep { index($_->{key} // '', "$prefix-") == 0 } read_topic($broker, 'orders.events');
	for my $m (@messages)
	{
		my $id = $m->{headers}{ce_id};
		if ($seen{$id}++)
		{
			$duplicates++;
			next;
		}
		my $seq = json_decode($m->{value})->{data}{seq};
		$out_of_order++ if defined $last_seq{ $m->{key} } && $seq <= $last_seq{ $m->{key} };
		$last_seq{ $m->{key} } = $seq;
	}
	my @missing = grep { !$seen{$_} } keys %expected;
	is(scalar @missing, 0, "$what: every event reached Kafka (" . scalar(keys %expected) . " events)");
	is(scalar(grep { !$expected{$_} } keys %seen), 0, "$what: and nothing else");
	is($out_of_order, 0, "$what: per key, events arrive in commit order");
	return $duplicates;
}

# --- a transaction that commits late is neither skipped nor reordered --------
my $late = $node->background_psql('postgres');
$late->query_safe("BEGIN");
my $late_event = $late->query_safe(
	"SELECT eventshop._emit_event('orders.events', 'late-1', 'order.created', '{\"seq\": 2}')");
my $early_event = $node->safe_psql('postgres',
	"SELECT eventshop._emit_event('orders.events', 'late-1', 'order.created', '{\"seq\": 1}')");
wait_for(sub { grep { ($_->{headers}{ce_id} // '') eq $early_event } read_topic($broker, 'orders.events') },
	'the event committed first is published while an older row is still uncommitted');
$late->query_safe("COMMIT");
$late->quit;
wait_published('the late committer');
my @late_keys = map { $_->{headers}{ce_id} } grep { ($_->{key} // '') eq 'late-1' } read_topic($broker, 'orders.events');
is_deeply(\@late_keys, [ $early_event, $late_event ],
	'a row with a lower id whose transaction committed later follows, in commit order');

# --- restarts in the middle of a stream keep per-key order ------------------
my $first_pid = relay_pid();
emit_events('restart', 5000, 50, 40);
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'eventshop relay'");
emit_events('restart', 5000, 50, 40);
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventshop relay'")
  or die 'relay was not restarted';
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'eventshop relay'");
wait_published('after two relay restarts');
isnt(relay_pid(), $first_pid, 'the relay was restarted');
check_stream('restart', 'two relay restarts mid-stream');

# --- kill -9 of the postmaster in the middle of a large drain ---------------
# Small batches to a slow broker (every answer 100 ms late) make the drain
# last long enough to be interrupted.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET eventshop.kafka_properties = 'message.max.bytes=100000;batch.num.messages=500'");
reload_config($node);
broker_slow($broker);
my $relay_at_crash = relay_pid();
my $acked_before = $node->safe_psql('postgres', 'SELECT acknowledged FROM eventshop.outbox_status');
$node->safe_psql('postgres', <<'SQL');
CREATE SEQUENCE IF NOT EXISTS test_seq;
INSERT INTO eventshop.outbox (topic, message_key, event_id, event_type, payload)
SELECT 'orders.events', 'crash-' || (1 + i % 1000), e.id, 'order.created',
	   json_build_object('specversion', '1.0', 'id', e.id, 'type', 'order.created',
						 'data', json_build_object('seq', nextval('test_seq'), 'pad', repeat('p', 100)))
FROM (SELECT i, gen_random_uuid() AS id FROM generate_series(1, 200000) AS i) e;
SQL
$node->poll_query_until('postgres',
	"SELECT acknowledged >= $acked_before + 20000 FROM eventshop.outbox_status")
  or die 'the drain did not start';
# the server comes back with the default batching (no reload after the restart)
$node->safe_psql('postgres', 'ALTER SYSTEM RESET eventshop.kafka_properties');
my $postmaster = $node->{_pid};
$node->kill9;
my $gone = sub { my ($pid) = @_; !kill(0, $pid) || slurp_file("/proc/$pid/stat") =~ /^\d+ \S+ Z/ };
wait_for(sub { $gone->($postmaster) }, 'the killed postmaster is gone');
# its relay notices and exits; from then on nothing more reaches Kafka
wait_for(sub { $gone->($relay_at_crash) }, 'the orphaned relay is gone');
broker_fast($broker);
my %in_kafka_at_crash = map { $_->{headers}{ce_id} => 1 }
  grep { index($_->{key} // '', 'crash-') == 0 } read_topic($broker, 'orders.events');
my $published_at_crash = keys %in_kafka_at_crash;
note("events in Kafka when the relay died: $published_at_crash of 200000");
ok($published_at_crash > 0 && $published_at_crash < 200000, 'the postmaster was killed in the middle of the drain');
# first without the relay, to read the checkpoint it died with
$node->append_conf('postgresql.conf', "eventshop.relay_enabled = off\n");
wait_for(
	sub {
		return 1 if $node->start(fail_ok => 1);
		$node->{_pid} = undef;		# a failed start may have read the stale pid file
		return 0;
	},
	'the server restarts after kill -9');
my $below_checkpoint = $node->safe_psql('postgres',
	"SELECT count(*) FROM eventshop.outbox, eventshop.relay_progress p WHERE message_key LIKE 'crash-%' AND id <= p.acked_id");
my $in_flight_at_crash = $published_at_crash - $below_checkpoint;
note("of those, $below_checkpoint were below the relay's checkpoint, $in_flight_at_crash in flight");
ok($in_flight_at_crash >= 0, 'the checkpoint never runs ahead of what Kafka acknowledged');
cmp_ok($in_flight_at_crash, '<=', 20000 + 2000,
	'in flight past the checkpoint: at most relay_max_in_flight and one batch');
$node->adjust_conf('postgresql.conf', 'eventshop.relay_enabled', 'on');
$node->restart;
wait_published('after kill -9');
my $crash_duplicates = check_stream('crash', 'kill -9 mid-drain');
note("duplicates after kill -9: $crash_duplicates");
cmp_ok($crash_duplicates, '<=', $in_flight_at_crash,
	'duplicates are only events that were in flight past the checkpoint');

# --- broker down for 30 s under load ----------------------------------------
my $pid_before_outage = relay_pid();
my $rss_before = rss_kib($pid_before_outage);
my $log_offset = -s $node->logfile;
my $load_sql = <<'SQL';
CREATE SEQUENCE IF NOT EXISTS test_seq;
DO $$
BEGIN
	FOR i IN 1..8000 LOOP
		PERFORM eventshop._emit_event('orders.events', 'outage-' || (1 + i % 30), 'order.created',
									  jsonb_build_object('seq', nextval('test_seq')));
		COMMIT;
		PERFORM pg_sleep(0.005);
	END LOOP;
END
$$;
SQL
my ($load_out, $load_err) = ('', '');
my $load = IPC::Run::start([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-f', '-' ],
	'<', \$load_sql, '>', \$load_out, '2>', \$load_err);
sleep 3;
broker_down($broker);
sleep 30;
broker_up($broker);
ok($load->finish, 'the load ran through the outage without errors') or diag($load_err);
wait_published('after the broker outage');
is(relay_pid(), $pid_before_outage, 'the relay rode out the outage without restarting');
check_stream('outage', '30-second broker outage under load');
my $outage_log = substr(slurp_file($node->logfile), $log_offset);
my $relay_lines = () = $outage_log =~ /eventshop relay/g;
note("relay log lines during the outage: $relay_lines");
cmp_ok($relay_lines, '<=', 40, 'no error storm in the log during the outage');
my $rss_after = rss_kib($pid_before_outage);
note("relay memory: $rss_before KiB before, $rss_after KiB after the outage");
cmp_ok($rss_after, '<', $rss_before + 128 * 1024, 'relay memory stays bounded through the outage');

# --- poison messages are parked, the stream goes on --------------------------
my $poison = $node->safe_psql('postgres',
	"SELECT eventshop._emit_event('orders.events', 'poison-1', 'order.created', jsonb_build_object('blob', repeat('x', 200000)))");
my $after_poison = $node->safe_psql('postgres',
	"SELECT eventshop._emit_event('orders.events', 'poison-1', 'order.created', '{\"seq\": 2}')");
wait_published('around the poison message');
is($node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.parked_events'), '1', 'the poison event is parked');
like($node->safe_psql('postgres', "SELECT error FROM eventshop.parked_events WHERE event_id = '$poison'"),
	qr/too large/i, "with the broker client's reason");
ok((grep { ($_->{headers}{ce_id} // '') eq $after_poison } read_topic($broker, 'orders.events')),
	'the event behind it was published');
is(relay_pid(), $pid_before_outage, 'the worker neither crashed nor restarted');

# --- SIGHUP: new Kafka settings without a restart ---------------------------
# The parked event is too large for the relay's message.max.bytes; after the
# reload raises it, a retry goes through. Until the relay has applied the
# reload a retry is refused and parked again, so retry until it lands.
$node->append_conf('postgresql.conf', <<'CONF');
eventshop.kafka_properties = 'message.max.bytes=1000000;compression.type=lz4'
CONF
$node->reload;
wait_for(
	sub {
		$node->safe_psql('postgres', 'SELECT eventshop.retry_parked_events()');
		$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status');
		return $node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.parked_events') eq '0';
	},
	'the retried event is accepted after the reload');
ok((grep { ($_->{headers}{ce_id} // '') eq $poison } read_topic($broker, 'orders.events')),
	"after the reload an administrator's retry publishes the parked event");
is($node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.parked_events'), '0', 'nothing is left parked');
is(relay_pid(), $pid_before_outage, 'the reload did not restart the worker');
my $second = $node->safe_psql('postgres',
	"SELECT eventshop._emit_event('orders.events', 'poison-2', 'order.created', jsonb_build_object('blob', repeat('y', 2000000)))");
$node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM eventshop.parked_events')
  or die 'the second poison event was not parked';
$node->safe_psql('postgres', "SELECT eventshop.discard_parked_event(id) FROM eventshop.parked_events");
is($node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.parked_events'), '0',
	'a parked event can be discarded');
is($node->safe_psql('postgres', 'SELECT broker_state FROM eventshop.outbox_status'), 'up',
	'outbox_status reports the broker up');

# --- purge: published rows go, partitions are truncated ---------------------
my $before_purge = $node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.outbox');
my $purged = $node->safe_psql('postgres', 'SELECT eventshop.purge_published_events()');
cmp_ok($purged, '>', 0, "purge_published_events removed $purged published rows");
is($node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.outbox'), $before_purge - $purged,
	'the outbox shrinks by as much');
is($node->safe_psql('postgres', 'SELECT backlog FROM eventshop.outbox_status'), '0',
	'and nothing unpublished was touched');

$node->stop;
stop_all();
done_testing();

# Resident memory of a process in KiB.
sub rss_kib
{
	my ($pid) = @_;
	my $status = slurp_file("/proc/$pid/status");
	return $status =~ /^VmRSS:\s+(\d+)/m ? $1 : 0;
}
