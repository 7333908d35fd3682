# EventshopTest.pm: what the TAP tests share: a dev Kafka broker, a real
# SMTP server (aiosmtpd) writing a Maildir (which can be told to refuse mail,
# stopped and restarted), an HTTP endpoint for the webhook, SMS and push
# channels (python3 http.server), a cluster with eventshop
# preloaded, and independent readers of Kafka (kcat) and of received mail.
# Everything started here listens on 127.0.0.1 and is stopped by stop_all()
# or, at the latest, when the test exits.
package EventshopTest;

use strict;
use warnings;

use Exporter 'import';
use File::Path qw(make_path);
use IO::Socket::INET;
use IPC::Run;
use POSIX ();
use JSON::PP;
use Encode ();
use MIME::Base64;
use MIME::QuotedPrint ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

our @EXPORT = qw(start_devbroker broker_down broker_up broker_slow broker_fast start_smtp smtp_stop smtp_restart smtp_reply
  start_http_endpoint http_status http_requests write_file
  eventshop_node relay_node worker_free_node key_settings read_topic produce maildir_messages parse_mail
  wait_for reload_config stop_all json_decode);

my @harnesses;

# JSON::XS when installed (some tests read back hundreds of thousands of
# events), JSON::PP otherwise; both decode UTF-8 text.
my $json = eval { require JSON::XS; JSON::XS->new->utf8 } // JSON::PP->new->utf8;

# Decodes one JSON document.
sub json_decode { my ($text) = @_; return $json->decode($text); }

# Starts the dev broker; returns { harness, pid, bootstrap }. Options:
# partitions => N per topic (default 3). The dev broker keeps the last 5 MB
# of each partition only, so a test that reads back more needs more of them.
sub start_devbroker
{
	my (%opts) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $program = -x "$ENV{TESTDIR}/devbroker/eventshop-devbroker"
	  ? "$ENV{TESTDIR}/devbroker/eventshop-devbroker"
	  : 'eventshop-devbroker';
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start([ $program, '--bootstrap-file', "$dir/bootstrap",
			'--partitions', $opts{partitions} // 3 ],
		'>', \$out, '2>', \$err);
	push @harnesses, $h;
	wait_for(sub { -s "$dir/bootstrap" }, 'dev broker is ready');
	my $bootstrap = slurp_file("$dir/bootstrap");
	chomp $bootstrap;
	return { harness => $h, pid => $h->{KIDS}[0]{PID}, bootstrap => $bootstrap, err => \$err };
}

# Sends the dev broker a signal and waits for the stderr line that reports
# its effect ("devbroker: brokers down", "... up"): the broker prints it only
# once every listener refuses (or accepts) connections.
sub broker_switch
{
	my ($broker, $signal, $state) = @_;
	my $count = sub { my $n = () = ${ $broker->{err} } =~ /^devbroker: brokers \Q$state\E\b/mg; $n };
	my $before = $count->();
	kill $signal, $broker->{pid};
	wait_for(sub { $broker->{harness}->pump_nb; $count->() > $before }, "the dev broker's brokers are $state");
}

# Takes every broker of the dev cluster down (clients are disconnected);
# returns once the listeners refuse connections.
sub broker_down { my ($broker) = @_; broker_switch($broker, 'USR1', 'down'); }

# Brings the dev cluster's brokers back; returns once they accept connections.
sub broker_up { my ($broker) = @_; broker_switch($broker, 'USR2', 'up'); }

# Makes every broker answer after the dev broker's slow-mode delay (100 ms),
# as over a slow network; broker_fast() takes the delay away again.
sub broker_slow { my ($broker) = @_; kill POSIX::SIGRTMIN(), $broker->{pid}; }
sub broker_fast { my ($broker) = @_; kill POSIX::SIGRTMIN() + 1, $broker->{pid}; }

# Starts aiosmtpd with a Maildir; returns { harness, port, maildir }. The
# server stores every message unless smtp_reply() told it to refuse;
# smtp_stop() and smtp_restart() simulate an outage on the same port.
sub start_smtp
{
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $smtp = { port => PostgreSQL::Test::Cluster::get_free_port(), maildir => "$dir/maildir" };
	smtp_restart($smtp);
	return $smtp;
}

# (Re)starts the SMTP server of a start_smtp() result on its port and Maildir.
sub smtp_restart
{
	my ($smtp) = @_;
	my ($out, $err) = ('', '');
	local $ENV{PYTHONPATH} = "$ENV{TESTDIR}/t/lib";
	my $h = IPC::Run::start(
		[
			'/usr/bin/python3', '-m', 'aiosmtpd', '-n', '-l', "127.0.0.1:$smtp->{port}",
			'-c', 'controlled_mailbox.ControlledMailbox', $smtp->{maildir}
		],
		'>', \$out, '2>', \$err);
	push @harnesses, $h;
	$smtp->{harness} = $h;
	wait_for(
		sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $smtp->{port}) },
		'SMTP server accepts connections');
	return $smtp;
}

# Stops the SMTP server: connections are refused until smtp_restart().
sub smtp_stop
{
	my ($smtp) = @_;
	my $h = delete $smtp->{harness};
	eval { $h->signal('TERM'); $h->finish; 1 } or eval { $h->kill_kill };
	@harnesses = grep { $_ != $h } @harnesses;
	wait_for(
		sub { !IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $smtp->{port}) },
		'SMTP server refuses connections');
}

# Makes the SMTP server answer DATA with $reply (e.g. "550 5.7.1 Refused");
# undef or '' makes it accept mail again.
sub smtp_reply
{
	my ($smtp, $reply) = @_;
	my $control = "$smtp->{maildir}.reply";
	if (defined $reply && $reply ne '')
	{
		open my $fh, '>', $control or die "could not write $control: $!";
		print $fh "$reply\n";
		close $fh;
	}
	else
	{
		unlink $control;
	}
}

# Starts the HTTP endpoint for the webhook, SMS and push channels
# (t/lib/webhook_server.py); returns { harness, port, url, secret_file,
# log_file, status_file }. http_status() sets the status it answers with,
# http_requests() returns what it received.
sub start_http_endpoint
{
	my ($secret) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $http = {
		port => $port,
		url => "http://127.0.0.1:$port",
		secret_file => "$dir/webhook_secret",
		log_file => "$dir/requests.jsonl",
		status_file => "$dir/status" };
	write_file($http->{secret_file}, "$secret\n");
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'/usr/bin/python3', "$ENV{TESTDIR}/t/lib/webhook_server.py", $port,
			$http->{secret_file}, $http->{log_file}, $http->{status_file}
		],
		'>', \$out, '2>', \$err);
	push @harnesses, $h;
	$http->{harness} = $h;
	wait_for(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) },
		'HTTP endpoint accepts connections');
	return $http;
}

# Makes the HTTP endpoint answer with $status from now on.
sub http_status
{
	my ($http, $status) = @_;
	write_file($http->{status_file}, "$status\n");
}

# Every request the HTTP endpoint received, oldest first, as hashes.
sub http_requests
{
	my ($http) = @_;
	return () unless -e $http->{log_file};
	return map { decode_json($_) } grep { /^\{/ } split /\n/, slurp_file($http->{log_file});
}

# Writes $content to $path, replacing it.
sub write_file
{
	my ($path, $content) = @_;
	open my $fh, '>', $path or die "could not write $path: $!";
	print $fh $content;
	close $fh;
}

# Creates and starts a cluster with eventshop preloaded and pointed at broker and SMTP server.
sub eventshop_node
{
	my ($name, $broker, $smtp, $extra_conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', key_settings() . <<"CONF" . ($extra_conf // ''));
shared_preload_libraries = 'eventshop'
eventshop.database = 'postgres'
eventshop.kafka_brokers = '$broker->{bootstrap}'
eventshop.smtp_url = 'smtp://127.0.0.1:$smtp->{port}'
eventshop.smtp_from = 'tests\@eventshop.test'
CONF
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION eventshop');
	return $node;
}

# Creates and starts a cluster whose only eventshop worker is the relay,
# publishing to $broker; extra postgresql.conf lines come last.
sub relay_node
{
	my ($name, $broker, $extra_conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', key_settings() . <<"CONF" . ($extra_conf // ''));
shared_preload_libraries = 'eventshop'
eventshop.database = 'postgres'
eventshop.kafka_brokers = '$broker->{bootstrap}'
eventshop.dispatcher_enabled = off
CONF
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION eventshop');
	return $node;
}

# Creates and starts a cluster with eventshop preloaded and its workers off
# (no Kafka or SMTP needed), keys in place ($key_conf, or fresh ones) and the
# extension created; extra postgresql.conf lines come last, so they override.
sub worker_free_node
{
	my ($name, $extra_conf, $key_conf) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', ($key_conf // key_settings()) . <<"CONF" . ($extra_conf // ''));
shared_preload_libraries = 'eventshop'
eventshop.relay_enabled = off
eventshop.dispatcher_enabled = off
eventshop.sender_workers = 0
CONF
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION eventshop');
	return $node;
}

# Makes the master key file and the X25519 sealing pair the auth module needs
# (register hashes the address with a key derived from eventshop.key_file)
# with scripts/make_keys.sh, in $dir (default: a fresh temporary directory);
# returns the postgresql.conf lines naming them.
sub key_settings
{
	my ($dir) = @_;
	$dir //= PostgreSQL::Test::Utils::tempdir() . '/keys';
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'bash', "$ENV{TESTDIR}/scripts/make_keys.sh", $dir ], '>', \$out, '2>', \$err)
	  or die "make_keys.sh failed: $err";
	return $out;
}

# Reads a whole topic with kcat (an independent Kafka client); returns a list
# of { key, value, headers => { name => value }, partition, offset }.
sub read_topic
{
	my ($broker, $topic) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'kcat', '-b', $broker->{bootstrap}, '-t', $topic, '-C', '-e',
			'-o', 'beginning', '-q', '-J' ],
		'>', \$out, '2>', \$err, IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default))
	  or die "kcat failed: $err";
	my @messages;
	for my $line (split /\n/, $out)
	{
		next unless $line =~ /^\{/;
		my $m = json_decode($line);
		my %headers = @{ $m->{headers} // [] };
		push @messages, {
			key => $m->{key},
			value => $m->{payload},
			headers => \%headers,
			partition => $m->{partition},
			offset => $m->{offset} };
	}
	return @messages;
}

# Produces messages to a topic with kcat (an independent Kafka client), each
# { key, value, headers => { name => value } } in order; one kcat run per
# message, so values may hold any byte but newline.
sub produce
{
	my ($broker, $topic, @messages) = @_;
	for my $m (@messages)
	{
		my @cmd = ('kcat', '-b', $broker->{bootstrap}, '-t', $topic, '-P', '-K', "\t", '-X', 'partitioner=murmur2_random');
		push @cmd, '-H', "$_=$m->{headers}{$_}" for sort keys %{ $m->{headers} // {} };
		my ($out, $err) = ('', '');
		IPC::Run::run(\@cmd, '<', \"$m->{key}\t$m->{value}\n", '>', \$out, '2>', \$err,
			IPC::Run::timeout(60))
		  or die "kcat -P failed: $err";
	}
}

# Splits a raw e-mail into { to, subject (RFC 2047 decoded), body (transfer-decoded) }.
sub parse_mail
{
	my ($raw) = @_;
	my ($h, $body) = mail_part($raw);
	my %parts;
	if (($h->{'content-type'} // '') =~ /multipart\/alternative;.*boundary="?([^";]+)"?/i)
	{
		# one part per content type: text/plain is the body, text/html the html
		for my $part (split /\r?\n--\Q$1\E(?:--)?\r?\n/, "\n$body")
		{
			my ($ph, $pb) = mail_part($part);
			$parts{ lc $1 } = $pb if ($ph->{'content-type'} // '') =~ m{^(text/\w+)}i;
		}
		$body = $parts{'text/plain'} // '';
	}
	return {
		to => $h->{to} // '',
		subject => Encode::decode('MIME-Header', $h->{subject} // ''),
		body => $body,
		html => $parts{'text/html'} // '' };
}

# Splits a message or MIME part into its headers (lower-case names) and its
# decoded body (quoted-printable or base64, UTF-8).
sub mail_part
{
	my ($raw) = @_;
	my ($head, $body) = split /\r?\n\r?\n/, $raw, 2;
	$head //= '';
	$head =~ s/\r?\n[ \t]+/ /g;	# unfold
	my %h;
	for my $line (split /\r?\n/, $head)
	{
		$h{ lc $1 } = $2 if $line =~ /^([^:]+):\s*(.*)$/;
	}
	$body //= '';
	my $encoding = $h{'content-transfer-encoding'} // '';
	$body = MIME::QuotedPrint::decode_qp($body) if $encoding =~ /quoted-printable/i;
	$body = MIME::Base64::decode_base64($body) if $encoding =~ /base64/i;
	$body =~ s/\r\n/\n/g;
	$body = Encode::decode('UTF-8', $body) unless ($h{'content-type'} // '') =~ /^multipart/i;
	return (\%h, $body);
}

# Returns the raw text of every message the SMTP server delivered.
sub maildir_messages
{
	my ($smtp) = @_;
	my @texts;
	for my $file (sort glob("$smtp->{maildir}/new/*"))
	{
		push @texts, slurp_file($file);
	}
	return @texts;
}

# Polls a condition every 100 ms, failing the test after the default timeout.
sub wait_for
{
	my ($condition, $what) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		return 1 if $condition->();
		usleep(100_000);
	}
	die "timed out waiting until: $what";
}

# Runs $sql (if any) and pg_reload_conf() on $node, and returns once the
# postmaster has read the configuration again: a new session's
# pg_conf_load_time() is the postmaster's, which signals its children right
# after it reloads (background workers then apply the settings before their
# next unit of work).
sub reload_config
{
	my ($node, $sql) = @_;
	my $before = $node->safe_psql('postgres', 'SELECT pg_conf_load_time()');
	$node->safe_psql('postgres', ($sql // '') . ' SELECT pg_reload_conf()');
	$node->poll_query_until('postgres', "SELECT pg_conf_load_time() > '$before'")
	  or die 'the configuration was not reloaded';
}

# Stops the broker and SMTP server this test started.
sub stop_all
{
	for my $h (@harnesses)
	{
		eval { $h->signal('TERM'); $h->finish; 1 } or eval { $h->kill_kill };
	}
	@harnesses = ();
}

END { stop_all(); }

1;
