// BlindSightAttention, native CPU kernel: the problem description shared by the
// operator glue (op.cc) and the per-ISA compute objects (kernel.cc, built once
// per instruction set). Nothing here depends on ONNX Runtime, so a CUDA
// implementation can take the same plan (tiles of query rows and key intervals).
#pragma once
#include <cstddef>
#include <cstdint>

namespace blindsight {

// Half-open key interval [a, e).
struct Interval {
  int32_t a, e;
};

// Everything a tile needs; pointers are fp32 (fp16 tensors are converted first).
struct Problem {
  int B = 0, H = 0, Hkv = 0, Sq = 0, Skv = 0, D = 0, Dv = 0;
  float scale = 1.f;
  const float* q = nullptr;
  int64_t qsB = 0, qsH = 0, qsS = 0;  // element strides; the head dim is contiguous
  const float* k = nullptr;
  int64_t ksB = 0, ksH = 0, ksS = 0;
  const float* v = nullptr;
  int64_t vsB = 0, vsH = 0, vsS = 0;
  float* out = nullptr;
  int64_t osB = 0, osH = 0, osS = 0;
  // fp16 queries and output are read and written by the tiles directly (q16/out16
  // instead of q/out, same strides); fp16 K and V are converted once into k/v
  const uint16_t* q16 = nullptr;
  uint16_t* out16 = nullptr;
  int mask_type = 0;  // 0 none, 1 bool (true keeps), 2 additive float (kept where > mask_min)
  const uint8_t* mask_b = nullptr;
  const float* mask_f = nullptr;
  int64_t msB = 0, msH = 0, msQ = 0, msK = 0;  // 0 where the mask broadcasts
  float mask_min = 0.f;
  // per query index i (0..Sq-1): the model's structural key range [row_lo[i], row_end[i])
  const int32_t* row_lo = nullptr;
  const int32_t* row_end = nullptr;
};

// Up to tile_rows() query rows (head, query index) of one batch row and one KV
// head that share the same key intervals. A unit of work is a run of tiles with
// the same batch row, KV head and intervals (run_tiles), which reads each block
// of keys once for all of them.
struct Tile {
  int b = 0, kvh = 0, nrows = 0;
  const int32_t* heads = nullptr;  // query head per row
  const int32_t* rows = nullptr;   // query index per row
  const Interval* iv = nullptr;    // sorted, disjoint key intervals the rows' key clauses allow
  int niv = 0;
};

}  // namespace blindsight

#define BS_DECLARE_ISA(ns)                                                        \
  namespace ns {                                                                  \
  void run_tiles(const blindsight::Problem& p, const blindsight::Tile* t, int n); \
  int tile_rows();                                                                \
  void f16_to_f32(const uint16_t* src, float* dst, size_t n);                     \
  void f32_to_f16(const float* src, uint16_t* dst, size_t n);                     \
  }

BS_DECLARE_ISA(bs_baseline)
#if defined(__x86_64__) || defined(_M_X64)
BS_DECLARE_ISA(bs_avx2)
BS_DECLARE_ISA(bs_avx512)
#endif
