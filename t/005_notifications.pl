# 005_notifications.pl: the dispatcher's consumer end to end, with the dev
# broker and a real SMTP server. Every event type that notifies becomes the
# right e-mail (hostile data HTML-escaped, the sealed reset token opened and
# working, no token in the audit log); a message delivered twice with the
# same ce_id makes one notification; a malformed message is recorded and
# skipped while later ones flow; a topic list changed by a reload is
# resubscribed; the lag view reaches zero; and after kill -9 of the
# postmaster in the middle of many events, every notification exists once.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_devbroker();
my $smtp = start_smtp();
my $node = eventshop_node('notify', $broker, $smtp, <<'CONF');
eventshop.kafka_properties = 'session.timeout.ms=6000'
eventshop.dispatcher_batch_size = 20
eventshop.app_url = 'https://shop.example'
CONF

$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventshop dispatcher'")
  or die 'dispatcher did not start';

# The dispatcher subscribes to all five topics (3 partitions each on the dev broker).
$node->poll_query_until('postgres', 'SELECT partitions_assigned = 15 FROM eventshop.dispatcher_status')
  or die 'the watermarks of 15 partitions were not recorded';
pass('the dispatcher holds the 15 partitions of the five topics and records their watermarks');

# ---------------------------------------------------------------------------
# Every event type -> its e-mail
# ---------------------------------------------------------------------------
my $name = 'Mallory <script>alert(1)</script> & Co';
my $uid = $node->safe_psql('postgres',
	"SELECT eventshop.register('mallory\@example.com', 'correct horse battery staple', '$name')");
$node->safe_psql('postgres', "SELECT eventshop.request_password_reset('mallory\@example.com')");
$node->safe_psql('postgres', "SELECT eventshop.request_magic_link('mallory\@example.com')");
my $order = $node->safe_psql('postgres', 'SELECT gen_random_uuid()');
$node->safe_psql('postgres', <<"SQL");
BEGIN;
SELECT eventshop._emit_event('auth.events', '$uid', 'user.logged_in',
	jsonb_build_object('user_id', '$uid', 'session_id', gen_random_uuid()));
SELECT eventshop._emit_event('orders.events', '$order', 'order.created',
	jsonb_build_object('order_id', '$order', 'user_id', '$uid', 'currency', 'EUR', 'total_minor', 4200,
					   'item_count', 2, 'reserved_until', '2030-01-01T00:00:00Z'));
SELECT eventshop._emit_event('payments.events', '$order', 'payment.succeeded',
	jsonb_build_object('order_id', '$order', 'user_id', '$uid', 'amount_minor', 4200, 'currency', 'EUR',
					   'provider_ref', 'pay-1'));
SELECT eventshop._emit_event('orders.events', '$order', 'order.cancelled',
	jsonb_build_object('order_id', '$order', 'user_id', '$uid', 'by', 'admin'));
SELECT eventshop._emit_event('registrations.events', gen_random_uuid()::text, 'registration.created',
	jsonb_build_object('registration_id', 'REG-7', 'event_id', gen_random_uuid(), 'user_id', '$uid',
					   'event_title', 'Postgres Days', 'starts_at', '2030-05-01T09:00:00Z'));
SELECT eventshop._emit_event('invites.events', gen_random_uuid()::text, 'invite.created',
	jsonb_build_object('invite_id', gen_random_uuid(), 'inviter_id', '$uid', 'event_title', 'Launch',
					   'sealed_email', eventshop._seal('guest\@example.com'),
					   'sealed_token', eventshop._seal('invite-token-0123456789abcdefghijklmnop'),
					   'expires_at', '2030-01-01T00:00:00Z'));
COMMIT;
SQL

my %expected = (
	'welcome' => "Welcome to eventshop, $name",
	'reset' => 'Reset your eventshop password',
	'magic' => 'Your eventshop sign-in link',
	'login' => 'New sign-in to your eventshop account',
	'order' => "Your eventshop order $order",
	'receipt' => "Payment received for order $order",
	'cancelled' => "Your eventshop order $order was cancelled",
	'registration' => 'You are registered for Postgres Days',
	'invite' => "$name invited you to Launch");
wait_for(sub { scalar(maildir_messages($smtp)) >= scalar(keys %expected) }, 'all nine e-mails arrive');
my %mail = map { my $m = parse_mail($_); ($m->{subject} => $m) } maildir_messages($smtp);
for my $kind (sort keys %expected)
{
	ok($mail{ $expected{$kind} }, "$kind e-mail received: $expected{$kind}");
}
like($mail{ $expected{welcome} }{to}, qr/mallory\@example\.com/, 'addressed to the account');
like($mail{ $expected{invite} }{to}, qr/guest\@example\.com/, 'the invite goes to the unsealed invitee address');
like($mail{ $expected{order} }{body}, qr/2 item\(s\), 42\.00 EUR/, 'the order confirmation has items and total');
like($mail{ $expected{receipt} }{body}, qr/payment of 42\.00 EUR for order \Q$order\E \(reference pay-1\)/,
	'the receipt has amount and reference');
like($mail{ $expected{registration} }{body}, qr/registration REG-7 for Postgres Days/,
	'the registration confirmation has the registration');
like($mail{ $expected{invite} }{body},
	qr{https://shop\.example/invites/accept\?token=invite-token-0123456789abcdefghijklmnop},
	'the invite carries the opened magic-link token');
like($mail{ $expected{welcome} }{body}, qr/Hello \Q$name\E,/, 'the text part has the plain name');
like($mail{ $expected{welcome} }{html}, qr/Hello Mallory &lt;script&gt;alert\(1\)&lt;\/script&gt; &amp; Co,/,
	'the HTML part of the sent mail has the name escaped');

my ($token) = $mail{ $expected{reset} }{body} =~ m{https://shop\.example/reset-password\?token=([A-Za-z0-9_-]+)};
ok(defined $token && length($token) == 43, 'the reset e-mail carries the opened token');
$node->safe_psql('postgres', "SELECT eventshop.reset_password('$token', 'a new passphrase for mallory')");
pass('the token from the e-mail resets the password');

my ($magic) = $mail{ $expected{magic} }{body} =~ m{https://shop\.example/magic-link\?token=([A-Za-z0-9_-]+)};
ok(defined $magic && length($magic) == 43, 'the magic-link e-mail carries the opened token');
$node->safe_psql('postgres', 'SELECT eventshop.rotate_signing_keys()');
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.login_with_magic_link('$magic')"),
	'1', 'the link from the e-mail signs in');
like($mail{ $expected{login} }{body}, qr/your account mallory\@example\.com was signed in at/,
	'the login alert names the account');

is($node->safe_psql('postgres',
		"SELECT body_html LIKE '%Hello Mallory &lt;script&gt;alert(1)&lt;/script&gt; &amp; Co,%' "
		  . "AND body_html NOT LIKE '%<script>%' FROM eventshop.notifications WHERE template = 'welcome'"),
	't', 'the HTML part escapes the hostile name');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.event_audit WHERE data::text LIKE '%$token%' OR data::text LIKE '%$magic%' "
		  . "OR data::text LIKE '%invite-token%' OR data::text LIKE '%\@%' OR data::text ~ '\"[A-Za-z0-9_-]{40,}\"'"),
	'0', 'no token, sealed value or address in the audit log');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.event_audit WHERE subject = '$order' AND outcome = 'queued'"),
	'3', "the audit log finds the order's three events by key");

# ---------------------------------------------------------------------------
# The same event delivered twice -> one notification
# ---------------------------------------------------------------------------
my $dup_id = $node->safe_psql('postgres', 'SELECT gen_random_uuid()');
my $sentinel_id = $node->safe_psql('postgres', 'SELECT gen_random_uuid()');
my $event = sub {
	my ($id, $type) = @_;
	return {
		key => $uid,
		headers => { ce_id => $id, ce_type => $type },
		value => encode_json({
			specversion => '1.0', id => $id, source => '/eventshop/auth', type => $type,
			subject => $uid, time => '2026-01-01T00:00:00Z', datacontenttype => 'application/json',
			data => { user_id => $uid } }) };
};
produce($broker, 'auth.events', $event->($dup_id, 'user.logged_in'), $event->($dup_id, 'user.logged_in'),
	$event->($sentinel_id, 'user.logged_out'));
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM eventshop.inbox WHERE event_id = '$sentinel_id'")
  or die 'the event after the duplicates was not consumed';
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.notifications WHERE event_id = '$dup_id'"),
	'1', 'an event delivered twice makes one notification');
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.event_audit WHERE event_id = '$dup_id'"),
	'1', 'and one audit row');

# ---------------------------------------------------------------------------
# A malformed message is recorded and skipped; the next one flows
# ---------------------------------------------------------------------------
my $after_id = $node->safe_psql('postgres', 'SELECT gen_random_uuid()');
produce($broker, 'orders.events',
	{ key => $order, value => '{"this is": not json' },
	{
		key => $order,
		headers => { ce_id => $after_id, ce_type => 'order.cancelled' },
		value => encode_json({
			specversion => '1.0', id => $after_id, source => '/eventshop/orders', type => 'order.cancelled',
			subject => $order, data => { order_id => $order, user_id => $uid } }) });
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM eventshop.notifications WHERE event_id = '$after_id'")
  or die 'the event after the malformed one was not consumed';
pass('the event after a malformed one is consumed');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.rejected_events r JOIN eventshop.inbox i "
		  . "ON i.topic = r.topic AND i.partition = r.partition AND i.\"offset\" = r.\"offset\" + 1 "
		  . "WHERE i.event_id = '$after_id'"),
	'1', 'the malformed message just before it is recorded in rejected_events');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.event_audit WHERE outcome = 'rejected' AND topic = 'orders.events'"),
	'1', 'and audited as rejected');

# ---------------------------------------------------------------------------
# SIGHUP: a changed topic list is resubscribed
# ---------------------------------------------------------------------------
$node->safe_psql('postgres', "ALTER SYSTEM SET eventshop.dispatcher_topics = 'auth.events'; SELECT pg_reload_conf()");
$node->poll_query_until('postgres', 'SELECT partitions_assigned = 3 FROM eventshop.dispatcher_status')
  or die 'the dispatcher did not resubscribe to auth.events alone';
pass('after a reload the dispatcher consumes only the topics now listed');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET eventshop.dispatcher_topics; SELECT pg_reload_conf()');
$node->poll_query_until('postgres', 'SELECT partitions_assigned = 15 FROM eventshop.dispatcher_status')
  or die 'the dispatcher did not resubscribe to all topics';
pass('and all five again after the setting is reset');

# ---------------------------------------------------------------------------
# kill -9 of the postmaster mid-dispatch: every notification exactly once
# ---------------------------------------------------------------------------
my $many = 400;
$node->safe_psql('postgres', <<"SQL");
SELECT eventshop._emit_event('orders.events', o::text, 'order.created',
	jsonb_build_object('order_id', o, 'user_id', '$uid', 'currency', 'EUR', 'total_minor', 100, 'item_count', 1,
					   'batch', 'crash'))
FROM (SELECT gen_random_uuid() AS o FROM generate_series(1, $many)) s
SQL
$node->poll_query_until('postgres',
	"SELECT count(*) > 0 FROM eventshop.event_audit WHERE data->>'batch' = 'crash'")
  or die 'dispatching did not start';
my $before = $node->safe_psql('postgres',
	"SELECT count(*) FROM eventshop.event_audit WHERE data->>'batch' = 'crash'");
my @pids = split /\n/, $node->safe_psql('postgres', 'SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()');
$node->kill9;
note("killed the postmaster with $before of $many events ingested");
# the orphaned processes exit once they notice; until then they hold shared memory
wait_for(sub { !grep { kill 0, $_ } @pids }, 'the old server processes are gone');
$node->start;
$node->poll_query_until('postgres',
	"SELECT count(*) = $many FROM eventshop.event_audit WHERE data->>'batch' = 'crash'")
  or die 'not every event was ingested after the restart';
is($node->safe_psql('postgres',
		"SELECT count(DISTINCT n.id) FROM eventshop.notifications n JOIN eventshop.event_audit a "
		  . "ON a.event_id = n.event_id WHERE a.data->>'batch' = 'crash'"),
	$many, "after kill -9 and restart every one of the $many order confirmations exists");
is($node->safe_psql('postgres',
		"SELECT count(*) - count(DISTINCT event_id) FROM eventshop.event_audit WHERE data->>'batch' = 'crash'"),
	'0', 'and every event was handled exactly once (one audit row each)');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.inbox i JOIN eventshop.event_audit a USING (event_id) "
		  . "WHERE a.data->>'batch' = 'crash'"),
	$many, 'and is in the inbox once');

# The stored offsets catch up with the high watermarks.
$node->poll_query_until('postgres', 'SELECT consumer_lag = 0 AND partitions_assigned = 15 FROM eventshop.dispatcher_status')
  or die 'consumer lag did not reach zero';
pass('consumer lag reaches zero');
# (polled: the watermarks are stored every few seconds, so a message that
# reached Kafka after the last store shows no lag until the next one)
ok($node->poll_query_until('postgres',
		"SELECT sum(next_offset) = (SELECT sum(high_watermark) FROM eventshop.consumer_watermarks) "
		  . "FROM eventshop.consumer_offsets"),
	'the stored offsets equal the high watermarks');

$node->stop;
stop_all();
done_testing();
