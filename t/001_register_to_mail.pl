# 001_register_to_mail.pl: the walking skeleton end to end. A registration
# becomes a CloudEvent on auth.events (read back with kcat, an independent
# Kafka client) and a welcome e-mail received by a real SMTP server; events
# committed while the broker is down are all delivered once it returns.
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
my $node = eventshop_node('main', $broker, $smtp);

# Both workers run, visible under their own backend type.
$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type IN ('eventshop relay', 'eventshop dispatcher')")
  or die 'workers did not start';
pass('relay and dispatcher workers are running');

my $password = 'correct horse battery staple';
my $user_id = $node->safe_psql('postgres',
	"SELECT eventshop.register('Alice\@Example.com', '$password', 'Alice')");
like($user_id, qr/^[0-9a-f-]{36}$/, 'register returns a user id');

# The relay counts the row as published only once Kafka acknowledged it.
$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status')
  or die 'outbox was not drained';
my @events = read_topic($broker, 'auth.events');
is(scalar @events, 1, 'one message on auth.events');
my $event = $events[0];
is($event->{key}, $user_id, 'message key is the user id');
my $ce = decode_json($event->{value});
is($ce->{specversion}, '1.0', 'value is a CloudEvents 1.0 document');
is($ce->{type}, 'user.registered', 'CloudEvent type');
is($ce->{subject}, $user_id, 'CloudEvent subject is the user id');
is($ce->{data}{user_id}, $user_id, 'event data names the user');
like($ce->{id}, qr/^[0-9a-f-]{36}$/, 'CloudEvent id is a uuid');
is($event->{headers}{ce_id}, $ce->{id}, 'ce_id header matches the CloudEvent id');
is($event->{headers}{ce_type}, 'user.registered', 'ce_type header carries the type');
my $hash = $node->safe_psql('postgres', "SELECT password_hash FROM eventshop.users WHERE id = '$user_id'");
unlike($event->{value}, qr/alice\@example\.com/i, 'no full e-mail address in the message');
unlike($event->{value}, qr/\Q$password\E/, 'no password in the message');
unlike($event->{value}, qr/\Q$hash\E|argon2/, 'no password hash in the message');

# The dispatcher turns the event into a welcome e-mail sent over SMTP.
$node->poll_query_until('postgres',
	"SELECT status = 'sent' FROM eventshop.notifications WHERE user_id = '$user_id'")
  or die 'welcome mail was not sent';
wait_for(sub { scalar(maildir_messages($smtp)) >= 1 }, 'mail arrives');
my @mails = maildir_messages($smtp);
is(scalar @mails, 1, 'SMTP server received one e-mail');
like($mails[0], qr/^To: .*alice\@example\.com/mi, 'addressed to the registered user');
like($mails[0], qr/^Subject: Welcome to eventshop, Alice/mi, 'welcome subject');
is($node->safe_psql('postgres', 'SELECT count(*) FROM eventshop.inbox'), '1', 'event recorded once in the inbox');

# Broker outage: three registrations while it is down, all delivered after.
# (First let the notification.sent event of the welcome mail go out, so
# the backlog below holds just the three registrations.)
$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status')
  or die 'the welcome mail\'s outcome event was not published';
broker_down($broker);
my @outage_users;
for my $i (1 .. 3)
{
	push @outage_users, $node->safe_psql('postgres',
		"SELECT eventshop.register('outage$i\@example.com', '$password', 'Outage $i')");
}
is($node->safe_psql('postgres', 'SELECT backlog FROM eventshop.outbox_status'), '3',
	'events wait in the outbox while the broker is down');
sleep 3;
is($node->safe_psql('postgres', 'SELECT backlog FROM eventshop.outbox_status'), '3',
	'nothing counts as published without an acknowledgement');
broker_up($broker);
$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status')
  or die 'outbox was not drained after the outage';
my %delivered = map { $_->{key} => 1 } read_topic($broker, 'auth.events');
is(scalar(grep { $delivered{$_} } @outage_users), 3, 'all three events reached Kafka after the outage');
$node->poll_query_until('postgres',
	"SELECT count(*) = 4 FROM eventshop.notifications WHERE status = 'sent'")
  or die 'outage mails were not sent';
is(scalar(maildir_messages($smtp)), 4, 'all four welcome e-mails received');

# The relay stops cleanly on SIGTERM and is restarted by the postmaster.
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'eventshop relay'");
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventshop relay'")
  or die 'relay was not restarted';
my $late_user = $node->safe_psql('postgres',
	"SELECT eventshop.register('late\@example.com', '$password', 'Late')");
$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status')
  or die 'restarted relay did not publish';
ok((grep { $_->{key} eq $late_user } read_topic($broker, 'auth.events')), 'restarted relay publishes');

# A failed login rolls back, yet its security event reaches Kafka at once.
$node->psql('postgres', "SELECT * FROM eventshop.login('alice\@example.com', 'not the password')");
wait_for(sub { grep { $_->{headers}{ce_type} eq 'user.login_failed' } read_topic($broker, 'auth.events') },
	'user.login_failed is published without waiting for a successful login');
pass('failed login event published');

# Rejected calls do not log their statement text (which holds the password).
# The test harness logs every statement; production servers do not.
$node->safe_psql('postgres', "ALTER SYSTEM SET log_statement = 'none'; SELECT pg_reload_conf()");
$node->poll_query_until('postgres', "SELECT current_setting('log_statement') = 'none'");
my $log_offset = -s $node->logfile;
my ($rc, $out, $err) = $node->psql('postgres',
	"SELECT eventshop.register('alice\@example.com', '$password', 'Again')");
like($err, qr/already exists/, 'duplicate registration is refused');
($rc, $out, $err) = $node->psql('postgres',
	"SELECT eventshop.register('not an address', '$password', 'Bad')");
like($err, qr/invalid e-mail address/, 'malformed address is refused');
my $log = slurp_file($node->logfile, $log_offset);
like($log, qr/already exists/, 'the refusal is in the server log');
unlike($log, qr/\Q$password\E/, 'but the password is not');

$node->stop;
stop_all();
done_testing();
