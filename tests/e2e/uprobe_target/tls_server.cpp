// A TLS HTTP/1.1 server whose functions carry BoringSSL's and Envoy's names, for the uprobe tier's tests
// (tests/e2e/test_uprobes.py, tests/unit/probes/test_uprobe_symbols.py). It checks the MECHANISM, not Envoy.
//
// Like Envoy with BoringSSL linked in statically, this binary defines
//   extern "C" int SSL_read(SSL *ssl, void *buf, int num);
//   extern "C" int SSL_write(SSL *ssl, const void *buf, int num);
//   extern "C" int SSL_do_handshake(SSL *ssl);
// (SSL is an opaque struct ssl_st) and the C++ member functions
//   Envoy::Extensions::TransportSockets::Tls::SslSocket::doRead(Envoy::Buffer::Instance&)
//   Envoy::Extensions::TransportSockets::Tls::SslSocket::doWrite(Envoy::Buffer::Instance&, bool)
// with the same mangled names. The SSL_* functions hand over to the system's OpenSSL (libssl.so.3,
// opened with dlopen so its symbols never meet ours), whose socket BIO does the read(2)/write(2) calls on the
// connection's fd inside SSL_read/SSL_write, on the calling thread: what Envoy's io_handle BIO does with
// readv/writev. So the wire carries real TLS records and the plaintext exists only inside these calls.
//
// Usage: tls_server CERT KEY   -- listens on 127.0.0.1 (an ephemeral port), prints "port=N" and "ready",
// then serves connections one at a time, keep-alive: GET /status/NNN answers NNN, anything else 200.
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

extern "C" {
struct ssl_st;  // opaque, as BoringSSL's public headers declare it
typedef struct ssl_st SSL;
struct ssl_ctx_st;
typedef struct ssl_ctx_st SSL_CTX;
}

namespace real {  // the system OpenSSL, resolved at start
void *(*TLS_server_method)();
SSL_CTX *(*SSL_CTX_new)(const void *);
int (*SSL_CTX_use_certificate_chain_file)(SSL_CTX *, const char *);
int (*SSL_CTX_use_PrivateKey_file)(SSL_CTX *, const char *, int);
SSL *(*SSL_new)(SSL_CTX *);
int (*SSL_set_fd)(SSL *, int);
void (*SSL_set_accept_state)(SSL *);
int (*SSL_do_handshake)(SSL *);
int (*SSL_read)(SSL *, void *, int);
int (*SSL_write)(SSL *, const void *, int);
int (*SSL_shutdown)(SSL *);
void (*SSL_free)(SSL *);

template <typename F>
void load(void *lib, F &fn, const char *name) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) {
    fprintf(stderr, "libssl has no %s\n", name);
    exit(2);
  }
}

void load_all() {
  void *lib = dlopen("libssl.so.3", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "dlopen libssl.so.3: %s\n", dlerror());
    exit(2);
  }
  load(lib, TLS_server_method, "TLS_server_method");
  load(lib, SSL_CTX_new, "SSL_CTX_new");
  load(lib, SSL_CTX_use_certificate_chain_file, "SSL_CTX_use_certificate_chain_file");
  load(lib, SSL_CTX_use_PrivateKey_file, "SSL_CTX_use_PrivateKey_file");
  load(lib, SSL_new, "SSL_new");
  load(lib, SSL_set_fd, "SSL_set_fd");
  load(lib, SSL_set_accept_state, "SSL_set_accept_state");
  load(lib, SSL_do_handshake, "SSL_do_handshake");
  load(lib, SSL_read, "SSL_read");
  load(lib, SSL_write, "SSL_write");
  load(lib, SSL_shutdown, "SSL_shutdown");
  load(lib, SSL_free, "SSL_free");
}
}  // namespace real

// BoringSSL's names and signatures. noinline + used: each keeps its own symbol and entry point.
extern "C" {
__attribute__((noinline, used)) int SSL_do_handshake(SSL *ssl) { return real::SSL_do_handshake(ssl); }
__attribute__((noinline, used)) int SSL_read(SSL *ssl, void *buf, int num) { return real::SSL_read(ssl, buf, num); }
__attribute__((noinline, used)) int SSL_write(SSL *ssl, const void *buf, int num) {
  return real::SSL_write(ssl, buf, num);
}
}

namespace Envoy {
namespace Buffer {
class Instance {  // the request/response bytes of one connection
 public:
  std::string data;
};
}  // namespace Buffer
namespace Network {
struct IoResult {
  long bytes;
  bool end_stream;
};
}  // namespace Network
namespace Extensions {
namespace TransportSockets {
namespace Tls {
class SslSocket {  // as Envoy's: reads and writes a connection's plaintext through SSL_read / SSL_write
 public:
  explicit SslSocket(SSL *ssl) : ssl_(ssl) {}
  __attribute__((noinline)) Network::IoResult doRead(Buffer::Instance &read_buffer);
  __attribute__((noinline)) Network::IoResult doWrite(Buffer::Instance &write_buffer, bool end_stream);

 private:
  SSL *ssl_;
};

Network::IoResult SslSocket::doRead(Buffer::Instance &read_buffer) {
  char buf[16384];
  int n = SSL_read(ssl_, buf, sizeof(buf));
  if (n <= 0) return {0, true};
  read_buffer.data.append(buf, n);
  return {n, false};
}

Network::IoResult SslSocket::doWrite(Buffer::Instance &write_buffer, bool end_stream) {
  long done = 0;
  while (!write_buffer.data.empty()) {
    int n = SSL_write(ssl_, write_buffer.data.data(), static_cast<int>(write_buffer.data.size()));
    if (n <= 0) return {done, true};
    write_buffer.data.erase(0, n);
    done += n;
  }
  return {done, end_stream};
}
}  // namespace Tls
}  // namespace TransportSockets
}  // namespace Extensions
}  // namespace Envoy

using Envoy::Extensions::TransportSockets::Tls::SslSocket;

static void serve(SSL *ssl) {
  if (SSL_do_handshake(ssl) != 1) return;
  SslSocket sock(ssl);
  Envoy::Buffer::Instance in, out;
  for (;;) {
    size_t end;
    while ((end = in.data.find("\r\n\r\n")) == std::string::npos) {
      if (sock.doRead(in).end_stream) return;
    }
    std::string head = in.data.substr(0, end);
    in.data.erase(0, end + 4);  // requests without a body
    int status = 200;
    size_t path = head.find(' ');
    if (path != std::string::npos && head.compare(path + 1, 8, "/status/") == 0)
      status = atoi(head.c_str() + path + 9);
    std::string body = "hello over tls\n";
    char line[128];
    snprintf(line, sizeof(line), "HTTP/1.1 %d X\r\nContent-Length: %zu\r\nContent-Type: text/plain\r\n\r\n",
             status, body.size());
    out.data = std::string(line) + body;
    sock.doWrite(out, false);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s CERT KEY\n", argv[0]);
    return 2;
  }
  real::load_all();
  SSL_CTX *ctx = real::SSL_CTX_new(real::TLS_server_method());
  if (!ctx || real::SSL_CTX_use_certificate_chain_file(ctx, argv[1]) != 1 ||
      real::SSL_CTX_use_PrivateKey_file(ctx, argv[2], 1 /* SSL_FILETYPE_PEM */) != 1) {
    fprintf(stderr, "cannot load the certificate or key\n");
    return 2;
  }
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(lfd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0 || listen(lfd, 64) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr *>(&addr), &len) != 0) {
    perror("listen");
    return 2;
  }
  printf("port=%d\nready\n", ntohs(addr.sin_port));
  fflush(stdout);
  for (;;) {
    // wait in poll, not in accept4: a tracer attached while the server waits sees the whole accept
    pollfd ready{lfd, POLLIN, 0};
    if (poll(&ready, 1, -1) != 1) continue;
    sockaddr_in peer{};
    socklen_t peer_len = sizeof(peer);
    int fd = accept4(lfd, reinterpret_cast<sockaddr *>(&peer), &peer_len, 0);
    if (fd < 0) continue;
    SSL *ssl = real::SSL_new(ctx);
    real::SSL_set_fd(ssl, fd);
    real::SSL_set_accept_state(ssl);
    serve(ssl);
    real::SSL_shutdown(ssl);
    real::SSL_free(ssl);
    close(fd);
  }
}
