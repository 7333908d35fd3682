# 006_dispatcher_group.pl: two servers run the dispatcher in one consumer
# group. They split the partitions, every event is handled by exactly one of
# them, and when one leaves, the other takes its partitions over from where
# the group got to (the offsets the leaver committed to Kafka), not from its
# own older offsets: nothing is handled twice, nothing is skipped.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_devbroker();
my $smtp = start_smtp();
my $conf = <<'CONF';
eventshop.kafka_properties = 'session.timeout.ms=6000'
eventshop.dispatcher_topics = 'orders.events'
CONF
my $a = eventshop_node('a', $broker, $smtp, $conf);
my $b;

sub assigned
{
	my ($node) = @_;
	return $node->safe_psql('postgres', 'SELECT partitions_assigned FROM eventshop.dispatcher_status');
}

# Emits $n order.created events on node a (the relay publishes them), tagged $tag.
sub emit
{
	my ($n, $tag) = @_;
	$a->safe_psql('postgres', <<"SQL");
SELECT eventshop._emit_event('orders.events', o::text, 'order.created',
	jsonb_build_object('order_id', o, 'user_id', gen_random_uuid(), 'tag', '$tag'))
FROM (SELECT gen_random_uuid() AS o FROM generate_series(1, $n)) s
SQL
}

# How many events tagged $tag a node has in its inbox.
sub handled
{
	my ($node, $tag) = @_;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.event_audit WHERE data->>'tag' = '$tag'");
}

# a alone: it holds every partition and stores offsets for them.
wait_for(sub { assigned($a) == 3 }, 'a holds the three partitions');
emit(30, 'first');
wait_for(sub { handled($a, 'first') == 30 }, 'a handles the first events');

# b joins the group (its relay is off: all events come from a).
$b = eventshop_node('b', $broker, $smtp, $conf . "eventshop.relay_enabled = off\n");
wait_for(sub { assigned($a) + assigned($b) == 3 && assigned($a) > 0 && assigned($b) > 0 },
	'the two servers split the three partitions');
pass('the two dispatchers split the partitions of orders.events');

emit(60, 'split');
wait_for(sub { handled($a, 'split') + handled($b, 'split') == 60 }, 'both servers together handle all 60 events');
ok(handled($a, 'split') > 0 && handled($b, 'split') > 0, 'each server handled the events of its partitions');
my @ids_a = split /\n/, $a->safe_psql('postgres', 'SELECT event_id FROM eventshop.inbox');
my %in_a = map { $_ => 1 } @ids_a;
my @both = grep { $in_a{$_} } split /\n/, $b->safe_psql('postgres', 'SELECT event_id FROM eventshop.inbox');
is(scalar @both, 0, 'no event was handled by both');

# b leaves the group; a takes over b's partitions at the group's offsets.
my $b_split = handled($b, 'split');
$b->stop;
wait_for(sub { assigned($a) == 3 }, 'a holds all three partitions');
emit(30, 'after');
wait_for(sub { handled($a, 'after') == 30 }, 'a handles the events produced after b left');
is(handled($a, 'split'), 60 - $b_split,
	"a did not re-handle the $b_split events b had handled on the partitions it took over");
like(slurp_file($a->logfile), qr/consumed up to offset \d+ elsewhere in the group/,
	'a started those partitions at the offsets b committed');

$a->stop;
stop_all();
done_testing();
