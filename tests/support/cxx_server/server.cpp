// A tiny C++ program for the stack symbolization tests (tests/unit/stacks/).
//
// It prints the runtime addresses of a few functions (namespaced and templated, so demangling shows),
// then blocks in demo::wait_for_client() reading stdin until the test closes the pipe.
#include <unistd.h>

#include <cstdio>
#include <vector>

namespace demo {

template <typename T>
struct Accumulator {
  __attribute__((noinline)) static T sum(const std::vector<T>& values) {
    T total{};
    for (const T& v : values) total += v;
    return total;
  }
};

__attribute__((noinline)) void wait_for_client(int fd) {
  char byte;
  while (read(fd, &byte, 1) > 0) {
  }
}

}  // namespace demo

int main() {
  std::vector<long> values{1, 2, 3};
  long total = demo::Accumulator<long>::sum(values);
  std::printf("wait_for_client=%p\n", reinterpret_cast<void*>(&demo::wait_for_client));
  std::printf("sum=%p\n", reinterpret_cast<void*>(&demo::Accumulator<long>::sum));
  std::printf("read=%p\n", reinterpret_cast<void*>(&read));
  std::printf("total=%ld\nready\n", total);
  std::fflush(stdout);
  demo::wait_for_client(0);
  return 0;
}
