// A tiny epoll server for the off-CPU end-to-end tests (tests/e2e/test_offcpu.py).
//
// Like an Envoy worker it runs one event loop: epoll_wait, accept, read a line, answer. Handling a line
// sleeps in demo::slow_handler() (an off-CPU wait inside an event-loop round, with a user stack through
// namespaced functions) before writing "done\n". Usage: epoll_server PORT; prints "ready" once listening.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace demo {

__attribute__((noinline)) void slow_handler(int fd) {
  usleep(20000);  // 20 ms off CPU in nanosleep
  static const char reply[] = "done\n";
  (void)!write(fd, reply, sizeof(reply) - 1);
}

__attribute__((noinline)) void handle_client(int epfd, int fd) {
  char buf[256];
  ssize_t n = read(fd, buf, sizeof(buf));
  if (n <= 0) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, nullptr);
    close(fd);
    return;
  }
  slow_handler(fd);
}

struct EventLoop {
  int epfd;
  int listen_fd;
  __attribute__((noinline)) void run() {
    epoll_event events[16];
    for (;;) {
      int n = epoll_wait(epfd, events, 16, -1);
      for (int i = 0; i < n; i++) {
        int fd = events[i].data.fd;
        if (fd == listen_fd) {
          int c = accept4(listen_fd, nullptr, nullptr, 0);
          if (c >= 0) {
            epoll_event ev{};
            ev.events = EPOLLIN;
            ev.data.fd = c;
            epoll_ctl(epfd, EPOLL_CTL_ADD, c, &ev);
          }
        } else {
          handle_client(epfd, fd);
        }
      }
    }
  }
};

}  // namespace demo

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::atoi(argv[1])));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(s, 64) != 0) return 1;
  demo::EventLoop loop{epoll_create1(0), s};
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = s;
  epoll_ctl(loop.epfd, EPOLL_CTL_ADD, s, &ev);
  std::printf("ready\n");
  std::fflush(stdout);
  loop.run();
}
