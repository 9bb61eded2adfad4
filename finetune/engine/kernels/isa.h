// The vector code our kernels run on this CPU, decided once a process for all of them.
#pragma once

#include <cstdlib>
#include <string>

namespace finetune_kernels {

enum class Isa { generic, avx2, avx512 };

// The widest vector code this CPU runs; FINETUNE_INT8_ISA=avx2|generic caps it, so that the tests
// check every path on a machine that has AVX-512.
inline Isa pick_isa() {
  const char* cap = std::getenv("FINETUNE_INT8_ISA");
  const std::string limit = cap ? cap : "avx512";
#if defined(__x86_64__)
  if (limit == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
  if (limit != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

// Decided once a process: int8_linear, int8_isa and decode_attention always agree on the path.
inline Isa active_isa() {
  static const Isa isa = pick_isa();
  return isa;
}

}  // namespace finetune_kernels
