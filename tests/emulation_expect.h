// The failure counter and EXPECT of the host emulation programs (tests/*_emulation.cpp):
// a failed check prints its message (the first 20 only) and counts; the program prints the
// count, which the Python test asserts is 0.
#pragma once
#include <cstdio>

static int failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      if (failures < 20) std::printf(__VA_ARGS__);         \
      ++failures;                                          \
    }                                                      \
  } while (0)
