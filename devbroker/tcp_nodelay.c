/*
 * tcp_nodelay.c
 *		Makes the dev broker's connections behave like a real Kafka broker's:
 *		Kafka sets TCP_NODELAY on every accepted socket, librdkafka's mock
 *		cluster does not. Without it, a response that follows a request of
 *		several TCP segments waits for the client's delayed ACK (~40 ms on
 *		Linux), so bursts of messages look 40 ms slow on the dev broker only.
 *
 * The mock cluster accepts connections with accept()/accept4() from
 * librdkafka's own threads; the devbroker executable exports these two
 * symbols (linked with --export-dynamic-symbol), so librdkafka's calls land
 * here, call the C library's version and set TCP_NODELAY on the new socket.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*accept_fn) (int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn) (int, struct sockaddr *, socklen_t *, int);

static int
with_nodelay(int fd)
{
	int			one = 1;

	if (fd >= 0)
		(void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

int
accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	accept_fn	libc_accept = (accept_fn) dlsym(RTLD_NEXT, "accept");

	return with_nodelay(libc_accept(fd, addr, len));
}

int
accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	accept4_fn	libc_accept4 = (accept4_fn) dlsym(RTLD_NEXT, "accept4");

	return with_nodelay(libc_accept4(fd, addr, len, flags));
}
