# 008_sender_http.pl: the HTTP channels and the pool under load. Webhooks
# are signed (HMAC-SHA256 over "<timestamp>.<body>", checked here and by the
# endpoint); a 5xx is retried until it succeeds, a 4xx dead-letters at once;
# SMS and push POST provider JSON with a bearer token; the log channel
# counts as sent without logging the message; a reload rotates the webhook
# secret; and three sender workers never send one notification twice.
use strict;
use warnings;

use Digest::SHA qw(hmac_sha256_hex);
use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $broker = start_devbroker();
my $smtp = start_smtp();
my $secret = 'first webhook secret';
my $http = start_http_endpoint($secret);
my $token_dir = PostgreSQL::Test::Utils::tempdir();
write_file("$token_dir/sms_token", "sms-token-123\n");
my $node = eventshop_node('http', $broker, $smtp, <<"CONF");
eventshop.sender_workers = 3
eventshop.sender_batch_size = 50
eventshop.sender_concurrency = 8
eventshop.http_timeout = 30s
eventshop.notification_max_backoff = 2s
eventshop.webhook_url = '$http->{url}/hook'
eventshop.webhook_secret_file = '$http->{secret_file}'
eventshop.sms_url = '$http->{url}/sms'
eventshop.sms_token_file = '$token_dir/sms_token'
eventshop.push_url = '$http->{url}/push'
CONF
$node->poll_query_until('postgres',
	"SELECT count(*) = 3 FROM pg_stat_activity WHERE backend_type = 'eventshop sender'")
  or die 'sender workers did not start';

# A webhook rule of this test: every registration also POSTs a JSON document.
$node->safe_psql('postgres', <<'SQL');
INSERT INTO eventshop.notification_templates (name, channel, subject, body_text)
VALUES ('test_hook', 'webhook', 'registered', '{"type":"user.registered","name":"{{display_name}}"}');
INSERT INTO eventshop.notification_rules (event_type, template) VALUES ('user.registered', 'test_hook');
SQL

# Queues one notification as the dispatcher would; returns its id.
sub queue
{
	my ($channel, $recipient, $subject, $body) = @_;
	return $node->safe_psql('postgres',
		"INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
		 VALUES (gen_random_uuid(), 'test_$channel', '$channel', '$recipient', '$subject', '$body') RETURNING id");
}

sub status_of
{
	my ($id) = @_;
	return $node->safe_psql('postgres', "SELECT status FROM eventshop.notifications WHERE id = '$id'");
}

sub requests_for
{
	my ($id) = @_;
	return grep { ($_->{id} // '') eq $id } http_requests($http);
}

# Signature check done here, independently of the endpoint.
sub signature_ok
{
	my ($request, $key) = @_;
	return $request->{signature} eq 'v1=' . hmac_sha256_hex("$request->{timestamp}.$request->{body}", $key);
}

# Registration -> welcome e-mail and a signed webhook.
my $user = $node->safe_psql('postgres',
	"SELECT eventshop.register('hook\@example.com', 'correct horse battery staple', 'Hook')");
$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM eventshop.notifications WHERE user_id = '$user' AND status = 'sent'")
  or die 'registration notifications were not sent';
my $hook_id = $node->safe_psql('postgres',
	"SELECT id FROM eventshop.notifications WHERE user_id = '$user' AND channel = 'webhook'");
my ($hook) = requests_for($hook_id);
is($hook->{path}, '/hook', 'the webhook is POSTed to eventshop.webhook_url');
is_deeply(decode_json($hook->{body}), { type => 'user.registered', name => 'Hook' },
	'its body is the notification\'s JSON');
is($hook->{content_type}, 'application/json', 'as application/json');
ok($hook->{valid}, 'the endpoint verifies the signature with the shared secret');
ok(signature_ok($hook, $secret), 'v1=hex(HMAC-SHA256(secret, timestamp "." body)) holds');
ok(abs($hook->{timestamp} - time) < 120, 'the timestamp header is the current Unix time');
ok(!signature_ok({ %$hook, body => $hook->{body} . ' ' }, $secret), 'a changed body does not verify');
ok(!signature_ok({ %$hook, timestamp => $hook->{timestamp} + 1 }, $secret), 'nor a changed timestamp');

# 5xx: retried with backoff until the endpoint accepts.
http_status($http, 503);
my $retried = queue('webhook', 'webhook', 'x', '{"n":1}');
$node->poll_query_until('postgres',
	"SELECT attempts >= 2 FROM eventshop.notifications WHERE id = '$retried'")
  or die 'the 5xx was not retried';
is(status_of($retried), 'pending', 'a 5xx leaves the webhook pending');
# attempts counts a claim before its request is sent: wait for the endpoint to answer two
wait_for(sub { (grep { $_->{status} == 503 } requests_for($retried)) >= 2 }, 'two 503s reached the endpoint');
http_status($http, 200);
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$retried'")
  or die 'the retried webhook was not sent';
my @tries = requests_for($retried);
cmp_ok(scalar @tries, '>=', 3, 'two or more 503s, then the success');
is_deeply([ map { $_->{status} } @tries[ -2, -1 ] ], [ 503, 200 ], 'the last one accepted');
is($node->safe_psql('postgres',
		"SELECT string_agg(DISTINCT outcome || '/' || coalesce(error_class, '-'), ',' ORDER BY outcome || '/' || coalesce(error_class, '-'))
		 FROM eventshop.notification_attempts WHERE notification_id = '$retried'"),
	'sent/-,temporary/http_5xx', 'attempts are recorded as temporary http_5xx, then sent');
is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.notification_attempts WHERE notification_id = '$retried'"),
	scalar(@tries), 'one attempt row per request the endpoint saw');

# 429 is temporary too; 4xx dead-letters at once.
http_status($http, 400);
my $refused = queue('webhook', 'webhook', 'x', '{"n":2}');
$node->poll_query_until('postgres', "SELECT status = 'dead' FROM eventshop.notifications WHERE id = '$refused'")
  or die 'the 4xx was not dead-lettered';
sleep 3;
is($node->safe_psql('postgres',
		"SELECT count(*) || '/' || string_agg(outcome || '/' || error_class, ',')
		 FROM eventshop.notification_attempts WHERE notification_id = '$refused'"),
	'1/permanent/http_4xx', 'a 4xx is dead at once after one attempt');
is(scalar(requests_for($refused)), 1, 'and the endpoint saw it once');
http_status($http, 429);
my $throttled = queue('webhook', 'webhook', 'x', '{"n":3}');
$node->poll_query_until('postgres',
	"SELECT attempts >= 2 FROM eventshop.notifications WHERE id = '$throttled'")
  or die 'the 429 was not retried';
is(status_of($throttled), 'pending', '429 is retried, not dead');
http_status($http, 200);
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$throttled'")
  or die 'throttled webhook not sent';

# SMS and push: provider JSON; SMS with its bearer token, push without one.
my $sms = queue('sms', '+15550100', 'ignored', 'Your code is 123456');
my $push = queue('push', 'device-token-abc', 'Order shipped', 'It is on its way');
$node->poll_query_until('postgres',
	"SELECT count(*) = 2 FROM eventshop.notifications WHERE id IN ('$sms', '$push') AND status = 'sent'")
  or die 'sms and push were not sent';
my ($sms_req) = requests_for($sms);
is($sms_req->{path}, '/sms', 'SMS goes to eventshop.sms_url');
is_deeply(decode_json($sms_req->{body}), { id => $sms, to => '+15550100', text => 'Your code is 123456' },
	'SMS body: id, to, text');
is($sms_req->{authorization}, 'Bearer sms-token-123', 'with the bearer token from eventshop.sms_token_file');
my ($push_req) = requests_for($push);
is_deeply(decode_json($push_req->{body}),
	{ id => $push, to => 'device-token-abc', title => 'Order shipped', body => 'It is on its way' },
	'push body: id, to, title, body');
is($push_req->{authorization}, undef, 'no Authorization header without a token file');

# The log channel: sent, logged without recipient or text.
my $log_offset = -s $node->logfile;
my $logged = queue('log', 'dev.person@example.com', 'Secret subject', 'magic link https://x/abc123');
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$logged'")
  or die 'log notification not sent';
# only the server's own lines: the test harness logs every statement it runs
my $log = join("\n", grep { /^\d{4}-/ && !/008_sender_http\.pl/ } split /\n/, slurp_file($node->logfile, $log_offset));
like($log, qr/notification \Q$logged\E \(template "test_log"\) delivered to the log channel/,
	'the log channel writes a LOG line naming the notification');
unlike($log, qr/dev\.person|abc123|Secret subject/, 'without recipient, subject or text');

# SIGHUP rotates the webhook secret (the file is reread).
my $new_secret = 'second webhook secret';
write_file($http->{secret_file}, "$new_secret\n");
reload_config($node);
my $rotated = queue('webhook', 'webhook', 'x', '{"n":4}');
$node->poll_query_until('postgres', "SELECT status = 'sent' FROM eventshop.notifications WHERE id = '$rotated'")
  or die 'webhook after rotation not sent';
my ($rot_req) = requests_for($rotated);
ok(signature_ok($rot_req, $new_secret) && $rot_req->{valid}, 'after a reload requests are signed with the new secret');

# Load: 1500 webhooks and 300 e-mails at once; three senders, each sent once.
my $before = scalar(http_requests($http));
$node->safe_psql('postgres', <<'SQL');
INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
SELECT gen_random_uuid(), 'load_hook', 'webhook', 'webhook', 'load', json_build_object('n', i)::text
FROM generate_series(1, 1500) i;
INSERT INTO eventshop.notifications (event_id, template, channel, recipient, subject, body_text)
SELECT gen_random_uuid(), 'load_mail', 'email', 'load' || i || '@example.com', 'Load ' || i, 'Body ' || i
FROM generate_series(1, 300) i;
SQL
$node->poll_query_until('postgres',
	"SELECT count(*) = 1800 FROM eventshop.notifications WHERE template IN ('load_hook', 'load_mail') AND status = 'sent'")
  or die 'the load was not sent';
my @load = grep { $_->{body} =~ /^\{"n"/ } (http_requests($http))[ $before .. scalar(http_requests($http)) - 1 ];
my %seen;
$seen{ $_->{id} }++ for @load;
is(scalar(keys %seen), 1500, 'every webhook of the load reached the endpoint');
is(scalar(grep { $_ > 1 } values %seen), 0, 'none of them twice');
is(scalar(grep { !$_->{valid} } @load), 0, 'all with valid signatures');
my %mail;
for my $m (maildir_messages($smtp))
{
	$mail{$1}++ if $m =~ /^Message-ID: <([^@>]+)\@/mi;
}
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.notifications WHERE template = 'load_mail'"),
	scalar(grep { /^load\d+/ } map { lc } map { /^To: (\S+)/mi ? $1 : '' } maildir_messages($smtp)),
	'every e-mail of the load arrived');
is(scalar(grep { $_ > 1 } values %mail), 0, 'no e-mail arrived twice');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.notifications n
		 JOIN eventshop.notification_attempts a ON a.notification_id = n.id
		 WHERE n.template IN ('load_hook', 'load_mail') AND a.succeeded"),
	'1800', 'exactly one successful attempt recorded for each');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.notifications n
		 WHERE n.template IN ('load_hook', 'load_mail')
		   AND n.attempts <> (SELECT count(*) FROM eventshop.notification_attempts a WHERE a.notification_id = n.id)"),
	'0', 'and every attempt of the load is recorded');
cmp_ok($node->safe_psql('postgres',
		"SELECT count(DISTINCT backend_type || pid) FROM pg_stat_activity WHERE backend_type = 'eventshop sender'"),
	'==', 3, 'three sender workers served the load');

$node->stop;
stop_all();
done_testing();
