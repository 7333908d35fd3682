# 009_sender_crash.pl: kill -9 of a sender worker in the middle of a round
# (its SMTP transfer hanging on a server that never answers) loses nothing:
# after the crash restart the claim's lease runs out and the mail is sent,
# once.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_devbroker();
my $smtp = start_smtp();
my $node = eventshop_node('crash', $broker, $smtp, <<'CONF');
eventshop.sender_workers = 1
eventshop.smtp_timeout = 10s
restart_after_crash = on
CONF
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'sender did not start';

# The SMTP port accepts connections but never greets: transfers hang.
smtp_stop($smtp);
my $tarpit = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $smtp->{port},
	Listen => 16, ReuseAddr => 1) or die "could not listen on $smtp->{port}: $!";

my $id = $node->safe_psql('postgres', <<'SQL');
INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
VALUES (gen_random_uuid(), 'welcome', 'email', 'crash@example.com', 'Crash', 'Body') RETURNING id
SQL
$node->poll_query_until('postgres',
	"SELECT state = 'active' AND query = 'eventshop sender: sending notifications'
	 FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'the sender did not start sending';
is($node->safe_psql('postgres', "SELECT attempts || '/' || status FROM eventshop.notifications WHERE id = '$id'"),
	'1/pending', 'the notification is claimed (attempt 1, leased) and its transfer hangs');

my $pid = $node->safe_psql('postgres', "SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventshop sender'");
kill 'KILL', $pid;
$tarpit->close;
smtp_restart($smtp);
# (a new sender: the killed one stays listed until the postmaster reacts to its crash)
$node->poll_query_until('postgres',
	"SELECT count(*) = 1 AND min(pid) <> $pid FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'sender was not restarted after the crash';
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.notification_attempts WHERE notification_id = '$id'"),
	'0', 'the crashed round recorded nothing');
is($node->safe_psql('postgres', "SELECT status FROM eventshop.notifications WHERE id = '$id'"), 'pending',
	'the notification waits for its lease to end');

$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$id'")
  or die 'the notification was not sent after the lease ended';
pass('after the lease the notification is sent');
wait_for(sub { scalar(grep { /^To: crash\@example\.com/mi } maildir_messages($smtp)) >= 1 }, 'the mail arrives');
sleep 2;
is(scalar(grep { /^To: crash\@example\.com/mi } maildir_messages($smtp)), 1, 'exactly once');
is($node->safe_psql('postgres',
		"SELECT attempts || '/' || (SELECT count(*) FROM eventshop.notification_attempts WHERE notification_id = n.id)
		 FROM eventshop.notifications n WHERE id = '$id'"),
	'2/1', 'two claims, one recorded (successful) attempt');

$node->stop;
stop_all();
done_testing();
