# common.sh: shared by scripts/demo.sh and scripts/test.sh. Installs what is
# missing from Debian's archive, builds and installs the extension, and runs
# commands as an unprivileged user (PostgreSQL refuses to run as root).

ES_PACKAGES="build-essential pkg-config postgresql-15 postgresql-server-dev-15
  postgresql-contrib librdkafka-dev libjwt-dev libcurl4-openssl-dev libargon2-dev libcrypt-dev
  libssl-dev postgresql-15-pgtap postgresql-15-cron python3-aiosmtpd
  libipc-run-perl libjson-xs-perl kcat python3-jwt python3-cryptography openssl python3"

# Runs a command as root: directly when we are root, otherwise through sudo.
es_as_root() {
	if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs the Debian packages that are not installed yet.
es_install_dependencies() {
	local missing=""
	for p in $ES_PACKAGES; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
	done
	[ -z "$missing" ] && return 0
	echo "==> installing:$missing"
	es_as_root apt-get update -qq
	es_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
	# Debian creates a main cluster with the server package; eventshop never uses it.
	es_as_root pg_ctlcluster 15 main stop 2>/dev/null || true
}

# Builds warning-free and installs into the server's directories.
es_build_and_install() {
	echo "==> building and installing eventshop"
	make -s COPT='-Wall -Wextra -Werror'
	es_as_root make -s install
}

# The unprivileged user that owns throwaway clusters: ourselves unless root.
es_run_user() {
	if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi
}

# Copies the source tree to a fresh directory the run user owns, prints its path.
es_copy_tree_for_run_user() {
	local dest
	dest=$(mktemp -d /tmp/eventshop-run.XXXXXX)
	tar --exclude=.git -cf - . | tar -C "$dest" -xf -
	[ "$(id -u)" = 0 ] && chown -R "$(es_run_user)" "$dest"
	echo "$dest"
}

# The command prefix that runs a program as the run user. setpriv execs the
# program in place, so "$!" after "${ES_RUN_AS[@]}" prog & is the program.
if [ "$(id -u)" = 0 ]; then
	ES_RUN_AS=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
	ES_RUN_AS=()
fi

# Runs a command as the run user.
es_as_run_user() {
	"${ES_RUN_AS[@]}" "$@"
}

# Prints a TCP port that is free on 127.0.0.1 right now.
es_free_port() {
	/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
