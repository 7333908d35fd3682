# 007_sender_smtp.pl: the sender pool over SMTP against a real server
# (aiosmtpd). An SMTP outage of 30 s delays mail but loses none and sends
# none twice; a 5xx refusal dead-letters at once, with one attempt, and an
# administrator's retry sends it once the server accepts again; outcomes
# reach Kafka as notification.sent / notification.failed without personal
# data; SIGHUP moves the senders to another SMTP server.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time sleep);

my $broker = start_devbroker();
my $smtp = start_smtp();
my $node = eventshop_node('sender', $broker, $smtp, <<'CONF');
eventshop.sender_workers = 2
eventshop.smtp_timeout = 30s
eventshop.notification_max_attempts = 40
eventshop.notification_max_backoff = 4s
CONF
my $password = 'correct horse battery staple';
$node->safe_psql('postgres', 'CREATE ROLE ops LOGIN IN ROLE eventshop_admin');

$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'sender workers did not start';
pass('two sender workers run');

# Recipients whose mail the server stored, with how many copies of each.
sub mail_counts
{
	my %count;
	for my $mail (maildir_messages($smtp))
	{
		$count{ lc $1 }++ if $mail =~ /^To: (\S+)/mi;
	}
	return %count;
}

sub register
{
	my ($email, $name) = @_;
	return $node->safe_psql('postgres', "SELECT eventshop.register('$email', '$password', '$name')");
}

# A registration becomes one mail; the attempt is recorded with its duration.
my $first = register('first@example.com', 'First');
$node->poll_query_until('postgres',
	"SELECT status = 'sent' FROM eventshop.notifications WHERE user_id = '$first'")
  or die 'first mail was not sent';
is(
	$node->safe_psql('postgres',
		"SELECT a.succeeded, a.outcome, a.error_class IS NULL, a.duration_ms >= 0, a.response ~ '^250'
		 FROM eventshop.notification_attempts a JOIN eventshop.notifications n ON n.id = a.notification_id
		 WHERE n.user_id = '$first'"),
	't|sent|t|t|t',
	'the attempt is recorded: sent, with the 250 reply and a duration');

# SMTP down for 30 s: everything queued meanwhile is sent once it returns.
smtp_stop($smtp);
my $down_at = time;
my @outage = map { register("outage$_\@example.com", "Outage $_") } 1 .. 5;
my $ids = join(',', map { "'$_'" } @outage);
$node->poll_query_until('postgres',
	"SELECT count(DISTINCT n.id) = 5 FROM eventshop.notifications n
	 JOIN eventshop.notification_attempts a ON a.notification_id = n.id
	 WHERE n.user_id IN ($ids) AND a.outcome = 'temporary'")
  or die 'no failed attempts during the outage';
is($node->safe_psql('postgres',
		"SELECT string_agg(DISTINCT a.error_class, ',') FROM eventshop.notification_attempts a
		 JOIN eventshop.notifications n ON n.id = a.notification_id WHERE n.user_id IN ($ids)"),
	'connection', 'attempts during the outage fail as connection errors');
sleep(30 - (time - $down_at)) if time - $down_at < 30;
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.notifications WHERE user_id IN ($ids) AND status = 'pending'"),
	'5', 'after 30 s of outage every mail is still pending (retried, not dead)');
ok($node->poll_query_until('postgres',
		"SELECT min(attempts) >= 2 FROM eventshop.notifications WHERE user_id IN ($ids)"),
	'each was retried during the outage');
smtp_restart($smtp);
$node->poll_query_until('postgres',
	"SELECT count(*) = 5 FROM eventshop.notifications WHERE user_id IN ($ids) AND status = 'sent'")
  or die 'mail queued during the outage was not sent';
pass('everything queued during the outage was sent after it');
my %count = mail_counts();
is_deeply([ map { $count{"outage$_\@example.com"} // 0 } 1 .. 5 ], [ 1, 1, 1, 1, 1 ],
	'every mail of the outage arrived exactly once');
is($node->safe_psql('postgres',
		"SELECT bool_and(a.cnt = n.attempts) FROM eventshop.notifications n
		 JOIN (SELECT notification_id, count(*) AS cnt FROM eventshop.notification_attempts GROUP BY 1) a
		   ON a.notification_id = n.id WHERE n.user_id IN ($ids)"),
	't', 'every attempt is recorded (attempt rows = attempts)');

# SMTP 5xx: dead letter at once, exactly one attempt, no mail stored.
smtp_reply($smtp, '550 5.7.1 Refused by policy');
my $refused = register('refused@example.com', 'Refused');
$node->poll_query_until('postgres',
	"SELECT status = 'dead' FROM eventshop.notifications WHERE user_id = '$refused'")
  or die 'refused mail was not dead-lettered';
is($node->safe_psql('postgres',
		"SELECT n.attempts, count(a.*), string_agg(a.outcome || '/' || a.error_class, ','), n.last_error ~ '^550'
		 FROM eventshop.notifications n JOIN eventshop.notification_attempts a ON a.notification_id = n.id
		 WHERE n.user_id = '$refused' GROUP BY n.id"),
	'1|1|permanent/smtp_5xx|t', 'a 5xx reply dead-letters at once after exactly one attempt');
sleep 3;
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.notification_attempts a JOIN eventshop.notifications n
		 ON n.id = a.notification_id WHERE n.user_id = '$refused'"),
	'1', 'and it is not retried');
my $dead_id = $node->safe_psql('postgres', "SELECT id FROM eventshop.notifications WHERE user_id = '$refused'");
is($node->safe_psql('postgres', 'SET ROLE ops; SELECT id FROM eventshop.dead_letters()'), $dead_id,
	'the administrator sees it among the dead letters');

# Fix the server, retry as administrator: sent.
smtp_reply($smtp, undef);
$node->safe_psql('postgres', "SET ROLE ops; SELECT eventshop.retry_dead_letter('$dead_id')");
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$dead_id'")
  or die 'retried dead letter was not sent';
%count = mail_counts();
is($count{'refused@example.com'}, 1, 'after the retry the mail arrives, once');
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.notification_attempts WHERE notification_id = '$dead_id'"),
	'2', 'two attempts recorded: the refusal and the success');

# Outcomes reach Kafka through the outbox, with no personal data.
$node->poll_query_until('postgres', 'SELECT backlog = 0 FROM eventshop.outbox_status') or die 'outbox not drained';
my @events = read_topic($broker, 'notifications.events');
my %types;
$types{ $_->{headers}{ce_type} }++ for @events;
is($types{'notification.sent'}, 7, 'one notification.sent per mail sent (1 + 5 + the retried one)');
is($types{'notification.failed'}, 1, 'one notification.failed for the dead letter');
my ($failed) = grep { $_->{headers}{ce_type} eq 'notification.failed' } @events;
is($failed->{key}, $dead_id, 'keyed by notification id');
my $data = decode_json($failed->{value})->{data};
is_deeply([ sort keys %$data ], [qw(attempts channel error_class event_id notification_id template)],
	'notification.failed carries ids, channel, template, attempts and the error class');
is($data->{error_class}, 'smtp_5xx', 'error class of the refusal');
ok(!(grep { $_->{value} =~ /\@example\.com|Refused|policy/ } @events),
	'no address and no server reply in any outcome event');

# SIGHUP reloads channel settings: the senders move to another SMTP server.
my $smtp2 = start_smtp();
reload_config($node, "ALTER SYSTEM SET eventshop.smtp_url = 'smtp://127.0.0.1:$smtp2->{port}';");
my $moved = register('moved@example.com', 'Moved');
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE user_id = '$moved'")
  or die 'mail after reload was not sent';
ok((grep { /^To: moved\@example\.com/mi } maildir_messages($smtp2)), 'after a reload the mail goes to the new server');
ok(!(grep { /^To: moved\@example\.com/mi } maildir_messages($smtp)), 'and not to the old one');

# SIGTERM: the senders stop cleanly and are restarted.
$node->safe_psql('postgres',
	"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'eventshop sender'");
$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'senders were not restarted';
my $after = register('after.restart@example.com', 'After');
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE user_id = '$after'")
  or die 'restarted senders did not send';
pass('restarted senders send');

$node->stop;
stop_all();
done_testing();
