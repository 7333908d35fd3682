# EventshopTest.pm: what the TAP tests share: a dev Kafka broker, a real
# SMTP server (aiosmtpd) writing a Maildir, a cluster with eventshop
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
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

our @EXPORT = qw(start_devbroker broker_down broker_up start_smtp
  eventshop_node worker_free_node key_settings read_topic maildir_messages wait_for stop_all);

my @harnesses;

# Starts the dev broker; returns { harness, pid, bootstrap }.
sub start_devbroker
{
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $program = -x "$ENV{TESTDIR}/devbroker/eventshop-devbroker"
	  ? "$ENV{TESTDIR}/devbroker/eventshop-devbroker"
	  : 'eventshop-devbroker';
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start([ $program, '--bootstrap-file', "$dir/bootstrap" ],
		'>', \$out, '2>', \$err);
	push @harnesses, $h;
	wait_for(sub { -s "$dir/bootstrap" }, 'dev broker is ready');
	my $bootstrap = slurp_file("$dir/bootstrap");
	chomp $bootstrap;
	return { harness => $h, pid => $h->{KIDS}[0]{PID}, bootstrap => $bootstrap };
}

# Takes every broker of the dev cluster down (clients are disconnected).
sub broker_down { my ($broker) = @_; kill 'USR1', $broker->{pid}; }

# Brings the dev cluster's brokers back.
sub broker_up { my ($broker) = @_; kill 'USR2', $broker->{pid}; }

# Starts aiosmtpd with a Maildir; returns { harness, port, maildir }.
sub start_smtp
{
	my $dir = PostgreSQL::Test::Utils::tempdir();
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my ($out, $err) = ('', '');
	my $h = IPC::Run::start(
		[
			'/usr/bin/python3', '-m', 'aiosmtpd', '-n', '-l', "127.0.0.1:$port",
			'-c', 'aiosmtpd.handlers.Mailbox', "$dir/maildir"
		],
		'>', \$out, '2>', \$err);
	push @harnesses, $h;
	wait_for(
		sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) },
		'SMTP server accepts connections');
	return { harness => $h, port => $port, maildir => "$dir/maildir" };
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
		'>', \$out, '2>', \$err, IPC::Run::timeout(60))
	  or die "kcat failed: $err";
	my @messages;
	for my $line (split /\n/, $out)
	{
		next unless $line =~ /^\{/;
		my $m = decode_json($line);
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
