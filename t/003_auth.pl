# 003_auth.pl: the accounts module under concurrency and across sessions,
# which a single pg_regress session cannot show:
# - concurrent refreshes of one refresh token from several connections:
#   exactly one wins, the others are refused, the session survives;
# - failed-login counters that survive ROLLBACK in several sessions, and the
#   lockout's exponential backoff (with short settings);
# - the server-wide cap on concurrent password hashes, and that waiting for
#   it can be cancelled;
# - login timing for unknown vs existing accounts (reported, not asserted);
# - the server log and pg_stat_statements hold no password or token after
#   failed logins, refreshes, resets and token checks, with production
#   logging settings.
use strict;
use warnings;

use FindBin;
use lib "$FindBin::RealBin/lib";
use EventshopTest;
use IPC::Run;
use List::Util qw(sum);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# Keys, made with openssl as an operator would.
my $keydir = PostgreSQL::Test::Utils::tempdir();
my $key_conf = key_settings($keydir);

my $node = PostgreSQL::Test::Cluster->new('auth');
$node->init;
$node->append_conf('postgresql.conf', <<"CONF");
shared_preload_libraries = 'eventshop,pg_stat_statements'
eventshop.relay_enabled = off
eventshop.dispatcher_enabled = off
$key_conf
eventshop.login_lockout = '1s'
eventshop.login_lockout_max = '4s'
pg_stat_statements.track = all
# production-like logging: errors with their statement, nothing else
log_min_messages = warning
log_min_error_statement = error
log_statement = none
log_error_verbosity = default
max_connections = 40
CONF
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventshop; CREATE EXTENSION pg_stat_statements');
$node->safe_psql('postgres', 'SELECT eventshop.rotate_signing_keys()');

my %secret;    # every password and token used below, checked against the log at the end
$secret{$_} = 1 for ('tap alice passphrase', 'tap wrong passphrase', 'tap bob passphrase', 'tap new passphrase');

my $alice = $node->safe_psql('postgres',
	"SELECT eventshop.register('alice.tap\@example.com', 'tap alice passphrase')");
my $bob = $node->safe_psql('postgres',
	"SELECT eventshop.register('bob.tap\@example.com', 'tap bob passphrase')");
like($alice, qr/^[0-9a-f-]{36}$/, 'accounts registered');

# Returns (session_id, access_token, refresh_token) of a fresh login.
sub login
{
	my ($email, $password) = @_;
	my $row = $node->safe_psql('postgres',
		"SELECT session_id, access_token, refresh_token FROM eventshop.login('$email', '$password')");
	my @f = split /\|/, $row;
	$secret{ $f[1] } = 1;
	$secret{ $f[2] } = 1;
	return @f;
}

# Starts psql on a script; returns the harness and references to its output.
sub start_psql
{
	my ($sql) = @_;
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \$out, '2>', \$err);
	return ($h, \$out, \$err);
}

# ---------------------------------------------------------------------------
# Concurrent refreshes of one token: exactly one wins.
# ---------------------------------------------------------------------------
my ($sid, $access, $refresh) = login('alice.tap@example.com', 'tap alice passphrase');
my $n = 6;
{
	# hold the session row so that every refresh gets as far as its lock
	my ($lin, $lout, $lerr) = ('', '', '');
	my $locker = IPC::Run::start([ 'psql', '-XAtq', '-d', $node->connstr('postgres'), '-f', '-' ],
		'<', \$lin, '>', \$lout, '2>', \$lerr);
	$lin .= "BEGIN;\nSELECT 'locked' FROM eventshop.sessions WHERE id = '$sid' FOR UPDATE;\n";
	$locker->pump until $lout =~ /locked/;

	my @runs = map { [ start_psql("SELECT refresh_token FROM eventshop.refresh('$refresh')") ] } 1 .. $n;
	$node->poll_query_until('postgres',
		"SELECT count(*) = $n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%eventshop.refresh(%'")
	  or die 'refreshes did not queue on the session lock';
	$lin .= "COMMIT;\n\\q\n";
	$locker->finish;

	my ($won, $already_used, $other) = (0, 0, 0);
	for my $r (@runs)
	{
		my ($h, $out, $err) = @$r;
		$h->finish;
		if ($$out =~ /^[A-Za-z0-9_-]{43}$/m) { $won++; $secret{$&} = 1; }
		elsif ($$err =~ /refresh token already used/) { $already_used++; }
		else { $other++; diag("unexpected refresh outcome: $$out $$err"); }
	}
	is($won, 1, "$n concurrent refreshes of one token: exactly one wins");
	is($already_used, $n - 1, 'the others are refused as "refresh token already used"');
	is($node->safe_psql('postgres', "SELECT revoked_at IS NULL FROM eventshop.sessions WHERE id = '$sid'"),
		't', 'and the session survives the race');
	is($node->safe_psql('postgres', "SELECT count(*) FROM eventshop.refresh_tokens WHERE session_id = '$sid'"),
		'2', 'exactly one new refresh token was issued');
}

# The same without the barrier, from many connections at once, twice in a row.
{
	my ($sid2, undef, $refresh2) = login('alice.tap@example.com', 'tap alice passphrase');
	my @runs = map { [ start_psql("SELECT refresh_token FROM eventshop.refresh('$refresh2')") ] } 1 .. 8;
	my $won = 0;
	for my $r (@runs)
	{
		$r->[0]->finish;
		if (${ $r->[1] } =~ /^[A-Za-z0-9_-]{43}$/m) { $won++; $secret{$&} = 1; }
	}
	is($won, 1, '8 unsynchronised refreshes of one token: exactly one wins');
}

# ---------------------------------------------------------------------------
# Failed logins survive ROLLBACK, in every session; backoff doubles.
# ---------------------------------------------------------------------------
my $guess = q{DO $$ BEGIN PERFORM eventshop.login('bob.tap@example.com', 'tap wrong passphrase');
	EXCEPTION WHEN invalid_password THEN NULL; END $$;};
$node->safe_psql('postgres', "BEGIN; $guess $guess $guess ROLLBACK;");
$node->safe_psql('postgres', "BEGIN; $guess $guess ROLLBACK;");
my ($ret, $stdout, $stderr) = $node->psql('postgres',
	"SELECT * FROM eventshop.login('bob.tap\@example.com', 'tap bob passphrase')");
like($stderr, qr/too many failed login attempts/, 'five failures in two rolled-back transactions of two sessions lock the account');
like($stderr, qr/Try again in 1 seconds/, 'for the first lockout (eventshop.login_lockout = 1s)');
usleep(1_200_000);
$node->safe_psql('postgres', "BEGIN; $guess $guess $guess $guess $guess ROLLBACK;");
($ret, $stdout, $stderr) = $node->psql('postgres',
	"SELECT * FROM eventshop.login('bob.tap\@example.com', 'tap bob passphrase')");
like($stderr, qr/Try again in 2 seconds/, 'the second lockout lasts twice as long');
usleep(2_200_000);
$node->safe_psql('postgres', "BEGIN; $guess $guess $guess $guess $guess ROLLBACK;");
usleep(4_200_000);
$node->safe_psql('postgres', "BEGIN; $guess $guess $guess $guess $guess ROLLBACK;");
($ret, $stdout, $stderr) = $node->psql('postgres',
	"SELECT * FROM eventshop.login('bob.tap\@example.com', 'tap bob passphrase')");
like($stderr, qr/Try again in 4 seconds/, 'doubling stops at eventshop.login_lockout_max (4s)');
usleep(4_200_000);
is($node->psql('postgres', "SELECT 1 FROM eventshop.login('bob.tap\@example.com', 'tap bob passphrase')"),
	0, 'after the lockout the right password logs in');
$node->safe_psql('postgres', 'SELECT eventshop.flush_security_events()');
is($node->safe_psql('postgres',
		"SELECT string_agg(payload->'data'->>'locked_seconds', ',' ORDER BY id) FROM eventshop.outbox WHERE event_type = 'user.locked'"),
	'1,2,4,4', 'each lockout emitted user.locked with its length');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM eventshop.outbox WHERE event_type = 'user.login_failed' AND message_key = '$bob'"),
	'20', 'every failed login, all rolled back, became a user.login_failed event');

# ---------------------------------------------------------------------------
# At most eventshop.max_concurrent_password_hashes hashes at once.
# ---------------------------------------------------------------------------
$node->append_conf('postgresql.conf', "eventshop.max_concurrent_password_hashes = 1\n");
$node->reload;
$node->poll_query_until('postgres', "SELECT max_concurrent = 1 FROM eventshop.password_hash_status()")
  or die 'setting not reloaded';
{
	# slow hashes (t=20) for unknown addresses: each costs a dummy hash
	my @runs = map {
		[ start_psql("SET eventshop.password_hash_iterations = 20; SELECT eventshop.login('nobody$_.tap\@example.com', 'tap wrong passphrase')") ]
	} 1 .. 4;
	my ($max_active, $max_waiting) = (0, 0);
	my $deadline = time + 60;
	while (time < $deadline)
	{
		my ($active, $waiting, $running) = split /\|/, $node->safe_psql('postgres',
			"SELECT (SELECT active FROM eventshop.password_hash_status()),
			        (SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Extension' AND query LIKE '%nobody%'),
			        (SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%nobody%' AND state = 'active' AND pid <> pg_backend_pid())");
		$max_active = $active if $active > $max_active;
		$max_waiting = $waiting if $waiting > $max_waiting;
		last if $running == 0 && $max_active > 0;
		usleep(20_000);
	}
	$_->[0]->finish for @runs;
	is($max_active, 1, 'never more than one hash at a time with max_concurrent_password_hashes = 1');
	cmp_ok($max_waiting, '>=', 1, "the other logins waited for the slot (at most $max_waiting at once)");
	like(${ $runs[0][2] }, qr/invalid e-mail or password/, 'and then completed normally');

	# a waiting login can be cancelled, and leaves no slot taken
	my @slow = map {
		[ start_psql("SET eventshop.password_hash_iterations = 40; SELECT eventshop.login('slow$_.tap\@example.com', 'tap wrong passphrase')") ]
	} 1 .. 3;
	$node->poll_query_until('postgres',
		"SELECT count(*) >= 1 FROM pg_stat_activity WHERE wait_event_type = 'Extension' AND query LIKE '%slow%'")
	  or die 'nobody waited';
	$node->safe_psql('postgres',
		"SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Extension' AND query LIKE '%slow%'");
	$_->[0]->finish for @slow;
	ok((grep { ${ $_->[2] } =~ /canceling statement due to user request/ } @slow) >= 1, 'a login waiting for a hash slot can be cancelled');
	is($node->safe_psql('postgres', 'SELECT active FROM eventshop.password_hash_status()'), '0', 'no slot is left taken');
}
$node->append_conf('postgresql.conf', "eventshop.max_concurrent_password_hashes = 4\n");
$node->reload;
$node->safe_psql('postgres', 'SELECT eventshop._login_throttle_clear()');

# ---------------------------------------------------------------------------
# Timing: unknown vs existing accounts (reported only; CI machines are noisy).
# ---------------------------------------------------------------------------
$node->safe_psql('postgres', q{
CREATE TABLE login_timing (kind text, ms double precision);
CREATE FUNCTION time_login(kind text, email text, password text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz;
BEGIN
	t0 := clock_timestamp();
	BEGIN
		PERFORM eventshop.login(email, password);
	EXCEPTION WHEN invalid_password OR invalid_authorization_specification THEN NULL;
	END;
	INSERT INTO login_timing VALUES (kind, extract(epoch FROM clock_timestamp() - t0) * 1000);
END $$;
CREATE FUNCTION time_reset(kind text, email text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz := clock_timestamp();
BEGIN
	PERFORM eventshop.request_password_reset(email);
	INSERT INTO login_timing VALUES (kind, extract(epoch FROM clock_timestamp() - t0) * 1000);
END $$;
});
for my $i (1 .. 30)
{
	# interleaved, each in its own transaction; the failures stay below the lockout
	$node->safe_psql('postgres', "SELECT time_login('unknown address', 'ghost$i.tap\@example.com', 'tap wrong passphrase')");
	$node->safe_psql('postgres', "SELECT time_login('wrong password', 'alice.tap\@example.com', 'tap wrong passphrase $i')")
	  if $i % 4 != 0;
	$node->safe_psql('postgres', "SELECT time_login('right password', 'alice.tap\@example.com', 'tap alice passphrase')");
	$node->safe_psql('postgres', "SELECT time_reset('reset: unknown', 'ghost$i.tap\@example.com')");
	$node->safe_psql('postgres', "UPDATE eventshop.account_tokens SET created_at = created_at - interval '2 minutes'");
	$node->safe_psql('postgres', "SELECT time_reset('reset: existing', 'alice.tap\@example.com')");
}
my $report = $node->safe_psql('postgres', q{
SELECT rpad(kind, 16) || ' n=' || count(*)
       || '  median ' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2)
       || ' ms  mean ' || round(avg(ms)::numeric, 2)
       || ' ms  p90 ' || round(percentile_cont(0.9) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' ms'
FROM login_timing GROUP BY kind ORDER BY kind});
diag("login and reset timing (not asserted):\n$report");
my %median = map { /^(.+?)\s+n=.*median\s+([\d.]+)/ ? ($1 => $2) : () } split /\n/, $report;
ok($median{'unknown address'} > 0 && $median{'wrong password'} > 0, 'timings were measured');
diag(sprintf('unknown/wrong-password median ratio %.2f; reset unknown/existing %.2f',
	$median{'unknown address'} / $median{'wrong password'}, $median{'reset: unknown'} / $median{'reset: existing'}));

# ---------------------------------------------------------------------------
# Failed calls with secrets as literals: nothing secret reaches the log or
# pg_stat_statements.
# ---------------------------------------------------------------------------
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', 'SELECT pg_stat_statements_reset()');
my ($sid3, $access3, $refresh3) = login('alice.tap@example.com', 'tap alice passphrase');
$node->safe_psql('postgres', "SELECT eventshop.refresh('$refresh3')");
my $reset_token_sealed = do {
	$node->safe_psql('postgres', "UPDATE eventshop.account_tokens SET created_at = created_at - interval '2 minutes'");
	$node->safe_psql('postgres', "SELECT eventshop.request_password_reset('alice.tap\@example.com')");
	$node->safe_psql('postgres',
		"SELECT payload->'data'->>'sealed_token' FROM eventshop.outbox WHERE event_type = 'password.reset_requested' ORDER BY id DESC LIMIT 1");
};
my $reset_token = $node->safe_psql('postgres', "SELECT eventshop._open_sealed('$reset_token_sealed')");
$secret{$reset_token} = 1;
my @failing = (
	"SELECT * FROM eventshop.login('alice.tap\@example.com', 'tap wrong passphrase')",
	"SELECT * FROM eventshop.login('nobody.tap\@example.com', 'tap alice passphrase')",
	"SELECT * FROM eventshop.login('alice.tap\@example.com', 'tap alice passphrase', E'bad\\nsource')",
	"SELECT * FROM eventshop.refresh('$refresh3')",                       # already used
	"SELECT * FROM eventshop.refresh('$refresh3' || 'x')",
	"SELECT eventshop.authenticate('$access3')",                          # session revoked by the replay
	"SELECT eventshop.authenticate('$access3' || 'x')",
	"SELECT eventshop.reset_password('$reset_token', 'password1')",       # weak password
	"SELECT eventshop.reset_password('$reset_token' || 'x', 'tap new passphrase')",
	"SELECT eventshop.verify_email('$reset_token')",
	"BEGIN; SELECT eventshop.authenticate('$access3'); COMMIT;",
	"SELECT eventshop.register('carol.tap\@example.com', 'password1')");
for my $sql (@failing)
{
	my ($r, $o, $e) = $node->psql('postgres', $sql);
}
($ret, $stdout, $stderr) = $node->psql('postgres', "SELECT eventshop.reset_password('$reset_token', 'tap new passphrase')");
is($ret, 0, 'the reset token still works after the failed attempts');
my $log = substr(PostgreSQL::Test::Utils::slurp_file($node->logfile), $log_offset);
like($log, qr/invalid e-mail or password/, 'the failed logins were logged (the log is being written)');
like($log, qr/invalid token/, 'and so were the failed token checks');
my @leaks = grep { index($log, $_) >= 0 } sort keys %secret;
is(scalar(@leaks), 0, 'the server log contains no password and no token')
  or diag('leaked: ' . join(', ', map { substr($_, 0, 12) . '...' } @leaks));
unlike($log, qr/STATEMENT:.*eventshop\.(login|refresh|authenticate|reset_password|verify_email|register)/,
	'no failing auth statement was logged with its text');

my $pgss = $node->safe_psql('postgres', q{SELECT string_agg(query, E'\n') FROM pg_stat_statements});
@leaks = grep { index($pgss, $_) >= 0 } sort keys %secret;
is(scalar(@leaks), 0, 'pg_stat_statements holds no password and no token (constants are normalised)')
  or diag('leaked: ' . join(', ', map { substr($_, 0, 12) . '...' } @leaks));
like($pgss, qr/eventshop\.login\(\$1, \$2\)/, 'pg_stat_statements shows login with placeholders');

is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"),
	'1', 'no backend crashed or was left behind');
$node->stop;
done_testing();
