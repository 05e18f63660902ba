// The instruction-set level the kernels may use, set once from Python (kvserve/cpu_features.py:
// the CPU's best, or KVSERVE_CPU_ISA when it asks for less). The build has every path the CPU can
// run (-march=native); this picks among them at run time, so that an AVX-512 machine also runs,
// tests and measures the AVX2 and portable paths.
#pragma once

namespace kvserve {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline int& isa_level() {
  static int level = kAvx512;   // capped by what was compiled in: each path is also guarded by #if
  return level;
}

}  // namespace kvserve
