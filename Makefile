# eventshop: PGXS build of the extension library, its SQL scripts, the dev
# Kafka broker, and the test targets.

PG_CONFIG ?= pg_config

EXTENSION   = eventshop
EXTVERSION  = $(shell sed -n "s/^default_version *= *'\(.*\)'/\1/p" eventshop.control)
MODULE_big  = eventshop
OBJS = \
	src/eventshop.o \
	src/config.o \
	src/shared_state.o \
	src/outbox_wakeup.o \
	src/outbox_ids.o \
	src/emit_event.o \
	src/relay_stats.o \
	src/password_hash.o \
	src/login_throttle.o \
	src/auth_context.o \
	src/kafka_client.o \
	src/crypto_util.o \
	src/key_store.o \
	src/jwt.o \
	src/signature_cache.o \
	src/sealed_box.o \
	src/orders.o \
	src/payment_webhook.o \
	src/template_render.o \
	src/event_mask.o \
	src/spi_util.o \
	src/authenticate.o \
	src/place_order.o \
	src/order_owners.o \
	bgworkers/worker_runtime.o \
	bgworkers/relay.o \
	bgworkers/relay_window.o \
	bgworkers/dispatcher.o \
	bgworkers/smtp_sender.o \
	bgworkers/delivery.o \
	bgworkers/channel_secrets.o \
	bgworkers/http_sender.o \
	bgworkers/transfers.o \
	bgworkers/sender.o

DATA = $(wildcard extension/eventshop--*.sql) extension/eventshop_common_passwords.txt
PGFILEDESC = "eventshop - event-driven shop backend"

PKG_LIBS    = rdkafka libcurl openssl libjwt
PG_CFLAGS   = -Wall -Wextra -Werror
# Server headers as system headers, so -Wextra judges our code, not theirs.
PG_CPPFLAGS = -isystem $(shell $(PG_CONFIG) --includedir-server 2>/dev/null) -I$(srcdir)/src -I$(srcdir)/bgworkers \
	$(shell pkg-config --cflags $(PKG_LIBS) 2>/dev/null)
SHLIB_LINK  = $(shell pkg-config --libs $(PKG_LIBS) 2>/dev/null) -largon2 -lcrypt

# pg_regress brings its own preloaded instance, so `make installcheck` needs
# no running server; TAP tests start their own clusters.
REGRESS      = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-instance=./tmp_check_regress --temp-config=./tmp_regress.conf --encoding=UTF8
# The instance needs key files: regress-keys writes them and tmp_regress.conf
# (sql/regress.conf plus the key settings) before every run.
REGRESS_PREP = regress-keys
TAP_TESTS    = 1
# Races between sessions (specs/*.spec), on a preloaded instance like REGRESS's.
ISOLATION      = $(patsubst specs/%.spec,%,$(sort $(wildcard specs/*.spec)))
ISOLATION_OPTS = --temp-instance=./tmp_check_isolation --temp-config=./tmp_regress.conf --encoding=UTF8

DEVBROKER = devbroker/eventshop-devbroker
EXTRA_CLEAN = $(DEVBROKER) tmp_check_regress tmp_check_isolation tmp_keys tmp_regress.conf output_iso

.DEFAULT_GOAL := all

# The two commands the README opens with. They work on a machine without
# PostgreSQL yet: the scripts install the build dependencies first.
.PHONY: demo test
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh

PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)
ifeq ($(PGXS),)
all install installcheck:
	@echo "pg_config not found: install postgresql-server-dev-15 (make demo and make test do)" >&2; exit 1
else
include $(PGXS)

all: $(DEVBROKER)

# tcp_nodelay.c replaces accept()/accept4() for librdkafka's mock cluster: export them.
$(DEVBROKER): devbroker/devbroker.c devbroker/tcp_nodelay.c
	$(CC) $(CFLAGS) -o $@ devbroker/devbroker.c devbroker/tcp_nodelay.c \
		-Wl,--export-dynamic-symbol=accept -Wl,--export-dynamic-symbol=accept4 \
		$(shell pkg-config --cflags --libs rdkafka) -ldl

install: install-devbroker
.PHONY: install-devbroker
install-devbroker: $(DEVBROKER)
	$(INSTALL_PROGRAM) $(DEVBROKER) '$(DESTDIR)$(bindir)/eventshop-devbroker'
endif

# Throwaway keys for `make installcheck`: a master key file, an X25519 pair
# for sealed boxes (private key as raw hex in a file, public key as raw
# base64url in the setting), and the server settings that point at them.
.PHONY: regress-keys
regress-keys:
	rm -rf tmp_keys
	{ cat sql/regress.conf; bash scripts/make_keys.sh '$(CURDIR)/tmp_keys'; } > tmp_regress.conf
