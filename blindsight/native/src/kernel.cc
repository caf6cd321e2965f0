// BlindSightAttention compute, built once per instruction set (BS_NS names the
// namespace: bs_baseline, bs_avx2, bs_avx512); op.cc picks one at load time.
//
// A tile holds R query rows that share their key intervals. Everything is laid
// out with the query rows along the vector lanes (Q^T [D][R], S^T [C][R],
// O^T [Dv][R]), so K and V are read row by row as broadcast scalars and never
// transposed, and the online-softmax max/sum run vertically across key rows.
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "attention.h"

#ifndef BS_NS
#error "BS_NS must name the namespace of this build"
#endif

namespace BS_NS {
using blindsight::Interval;
using blindsight::Problem;
using blindsight::Tile;

#if defined(__AVX512F__)
constexpr int VW = 16;
constexpr int JQ = 8;  // keys per QK^T micro step (JQ x NV accumulators)
constexpr int JV = 8;  // value columns per PV micro step
#elif defined(__AVX2__)
constexpr int VW = 8;
constexpr int JQ = 3;
constexpr int JV = 3;
#else
constexpr int VW = 4;
constexpr int JQ = 1;
constexpr int JV = 1;
#endif
constexpr int R = 32;  // query rows per tile
constexpr int NV = R / VW;
constexpr int C = 64;  // keys per block
constexpr int SMALL_ROWS = 8;  // tiles of at most this many rows take run_small (vectors along the head dim)
constexpr int PFB = 2;  // key blocks that run_small fetches ahead into L2

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

static inline vf ld(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(vf));
  return x;
}
static inline void st(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }
static inline vf splat(float s) { return vf{} + s; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) (Cephes polynomial, relative error ~1e-7); exactly 0 below -87.3, so a
// masked score (-inf) contributes nothing.
static inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.3f);
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  vf fx = xc * 1.44269504088896341f + 0.5f;
  vi n = __builtin_convertvector(fx, vi);
  vf nf = __builtin_convertvector(n, vf);
  n += (nf > fx);  // floor: true lanes are -1
  nf = __builtin_convertvector(n, vf);
  vf r = xc - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  vf y = p * r * r + r + 1.0f;
  vi bits = (n + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &bits, sizeof(vf));
  y = y * pow2;
  return x < lo ? vf{} : y;
}

// S^T[c][*] = K[key c] . Q^T for J keys.
template <int J>
static inline void qk_step(const float* qt, const float* const* kr, int D, float* stc) {
  vf acc[J][NV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = vf{};
  for (int d = 0; d < D; ++d) {
    vf qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = ld(qt + (size_t)d * R + v * VW);
    for (int j = 0; j < J; ++j) {
      const float kb = kr[j][d];
      for (int v = 0; v < NV; ++v) acc[j][v] += kb * qv[v];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) st(stc + (size_t)j * R + v * VW, acc[j][v]);
}

// O^T[dv0 .. dv0+J) += V[keys, dv0 .. dv0+J)^T P^T.
template <int J>
static inline void pv_step(float* ot, const float* pt, const float* const* vr, int n, int dv0) {
  vf acc[J][NV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = ld(ot + (size_t)(dv0 + j) * R + v * VW);
  for (int c = 0; c < n; ++c) {
    vf pv[NV];
    for (int v = 0; v < NV; ++v) pv[v] = ld(pt + (size_t)c * R + v * VW);
    const float* row = vr[c] + dv0;
    for (int j = 0; j < J; ++j) {
      const float vb = row[j];
      for (int v = 0; v < NV; ++v) acc[j][v] += vb * pv[v];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) st(ot + (size_t)(dv0 + j) * R + v * VW, acc[j][v]);
}

// rows [a, e) of a key or value matrix into L2, ahead of their use
static inline void prefetch_rows_l2(const float* base, int64_t stride, int a, int e, int n) {
  for (int k = a; k < e; ++k)
    for (int i = 0; i < n; i += 16) __builtin_prefetch(base + (int64_t)k * stride + i, 0, 1);
}

static inline float hsum(vf x) {
  // halving tree; the compiler turns the half-vector adds into shuffles
  float a[VW];
  std::memcpy(a, &x, sizeof(vf));
  for (int w = VW / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// one query row, scaled, as fp32 (from fp32 or fp16 storage)
static inline void load_q(const Problem& p, int b, int h, int i, float* dst, size_t stride) {
  const int64_t off = b * p.qsB + h * p.qsH + (int64_t)i * p.qsS;
  if (p.q16) {
    const _Float16* q = reinterpret_cast<const _Float16*>(p.q16) + off;
    for (int d = 0; d < p.D; ++d) dst[d * stride] = static_cast<float>(q[d]) * p.scale;
  } else {
    const float* q = p.q + off;
    for (int d = 0; d < p.D; ++d) dst[d * stride] = q[d] * p.scale;
  }
}

// one output row from fp32 values src[d * stride] times inv
static inline void store_o(const Problem& p, int b, int h, int i, const float* src, size_t stride, float inv) {
  const int64_t off = b * p.osB + h * p.osH + (int64_t)i * p.osS;
  if (p.out16) {
    _Float16* o = reinterpret_cast<_Float16*>(p.out16) + off;
    for (int d = 0; d < p.Dv; ++d) o[d] = static_cast<_Float16>(src[d * stride] * inv);
  } else {
    float* o = p.out + off;
    for (int d = 0; d < p.Dv; ++d) o[d] = src[d * stride] * inv;
  }
}

struct Scratch {
  std::vector<float> qt, ot, sc, qs, os, ss;
  std::vector<const float*> kr, vr;
  size_t qn = 0, on = 0;  // floats of one tile's Q^T and O^T slab in qt and ot
  void fit(int D, int Dv, int tiles) {
    qn = (size_t)D * R + 16;
    on = (size_t)Dv * R + 16;
    if (qt.size() < qn * tiles) qt.assign(qn * tiles, 0.f);
    if (ot.size() < on * tiles) ot.assign(on * tiles, 0.f);
    if (sc.size() < (size_t)C * R + 16) sc.assign((size_t)C * R + 16, 0.f);
    kr.resize(C);
    vr.resize(C);
  }
  void fit_small(int D, int Dv) {
    if (qs.size() < (size_t)D * SMALL_ROWS) qs.assign((size_t)D * SMALL_ROWS, 0.f);
    if (os.size() < (size_t)Dv * SMALL_ROWS) os.assign((size_t)Dv * SMALL_ROWS, 0.f);
    if (ss.size() < (size_t)C * SMALL_ROWS + VW) ss.assign((size_t)C * SMALL_ROWS + VW, 0.f);
    kr.resize(C);
    vr.resize(C);
  }
};

#if defined(__GNUC__) && !defined(__clang__)
// The lane shuffles of sum_lanes: at level b, two vectors that hold VW / b
// sources of b partial sums each become 2 VW / b sources of b / 2 (the first
// halves, x's sources then y's, plus the second halves).
constexpr int half_index(int b, bool upper, int o) {
  const int h = b / 2, per = VW / b, src = o / h, off = o % h + (upper ? h : 0);
  return src < per ? src * b + off : VW + (src - per) * b + off;
}
template <int b, bool upper, size_t... O>
constexpr vi half_mask(std::index_sequence<O...>) {
  return vi{half_index(b, upper, (int)O)...};
}
// Level b of the tree: b vectors become b / 2.
template <int b>
static inline void sum_tree(vf* x) {
  constexpr vi lo = half_mask<b, false>(std::make_index_sequence<VW>{});
  constexpr vi hi = half_mask<b, true>(std::make_index_sequence<VW>{});
  for (int i = 0; i < b / 2; ++i)
    x[i] = __builtin_shuffle(x[2 * i], x[2 * i + 1], lo) + __builtin_shuffle(x[2 * i], x[2 * i + 1], hi);
  if constexpr (b > 2) sum_tree<b / 2>(x);
}
// Lane j of the result is the sum of x[j]'s lanes: VW - 1 shuffle pairs and
// adds in place of VW horizontal sums (x is overwritten).
static inline vf sum_lanes(vf* x) {
  sum_tree<VW>(x);
  return x[0];
}
#define BS_SUM_LANES 1
#endif

// ss[r][c] = q_r . K[k0 + c] for the block's n keys
static inline void small_scores(const float* qs, int nr, int D, const float* kbase, int64_t ksS, int k0, int n,
                                float* ss) {
  const int nd = D / VW;
  int c = 0;
#ifdef BS_SUM_LANES
  for (; c + VW <= n; c += VW) {
    const float* kr[VW];
    for (int j = 0; j < VW; ++j) kr[j] = kbase + (int64_t)(k0 + c + j) * ksS;
    for (int r = 0; r < nr; ++r) {
      const float* q = qs + (size_t)r * D;
      vf acc[VW];
      for (int j = 0; j < VW; ++j) acc[j] = vf{};
      for (int v = 0; v < nd; ++v) {
        const vf qv = ld(q + v * VW);
        for (int j = 0; j < VW; ++j) acc[j] += qv * ld(kr[j] + v * VW);
      }
      st(ss + (size_t)r * C + c, sum_lanes(acc));
    }
  }
#endif
  for (; c < n; ++c) {
    const float* kr = kbase + (int64_t)(k0 + c) * ksS;
    for (int r = 0; r < nr; ++r) {
      const float* q = qs + (size_t)r * D;
      vf acc = vf{};
      for (int v = 0; v < nd; ++v) acc += ld(q + v * VW) * ld(kr + v * VW);
      ss[(size_t)r * C + c] = hsum(acc);
    }
  }
}

// os[r] += sum_c ss[r][c] V[k0 + c] for all SMALL_ROWS rows (rows past the
// tile's have zero probabilities): a column slice of every output row stays in
// registers while the block's keys go past it.
static inline void small_pv(float* os, const float* ss, const float* vbase, int64_t vsS, int k0, int n, int Dv) {
  for (int v = 0; v < Dv / VW; ++v) {
    vf acc[SMALL_ROWS];
    for (int r = 0; r < SMALL_ROWS; ++r) acc[r] = ld(os + (size_t)r * Dv + v * VW);
    for (int c = 0; c < n; ++c) {
      const vf x = ld(vbase + (int64_t)(k0 + c) * vsS + v * VW);
      for (int r = 0; r < SMALL_ROWS; ++r) acc[r] += ss[(size_t)r * C + c] * x;
    }
    for (int r = 0; r < SMALL_ROWS; ++r) st(os + (size_t)r * Dv + v * VW, acc[r]);
  }
}

// A tile of few rows (decode steps: the query heads of one KV head at one
// position) would waste most vector lanes laid out along rows; these run with
// the vectors along the head dimension instead: row . key dot products, a
// vectorised softmax along the block's keys, and P V as row updates. A decode
// step reads the whole cache from memory once, so the next block's keys and
// values are fetched into L2 while this block computes.
static void run_small(const Problem& p, const Tile& t, Scratch& s) {
  const int D = p.D, Dv = p.Dv, nr = t.nrows;
  s.fit_small(D, Dv);
  float* qs = s.qs.data();
  float* os = s.os.data();
  float* ss = s.ss.data();  // [row][C] scores, then probabilities
  int lo[SMALL_ROWS], end[SMALL_ROWS];
  const float* mrow_f[SMALL_ROWS];
  const uint8_t* mrow_b[SMALL_ROWS];
  float m[SMALL_ROWS], l[SMALL_ROWS];
  int min_lo = p.Skv, max_end = 0, max_lo = 0, min_end = p.Skv;
  for (int r = 0; r < nr; ++r) {
    const int h = t.heads[r], i = t.rows[r];
    load_q(p, t.b, h, i, qs + (size_t)r * D, 1);
    lo[r] = p.row_lo[i];
    end[r] = p.row_end[i];
    min_lo = lo[r] < min_lo ? lo[r] : min_lo;
    max_end = end[r] > max_end ? end[r] : max_end;
    max_lo = lo[r] > max_lo ? lo[r] : max_lo;
    min_end = end[r] < min_end ? end[r] : min_end;
    const int64_t moff = t.b * p.msB + h * p.msH + (int64_t)i * p.msQ;
    mrow_f[r] = p.mask_type == 2 ? p.mask_f + moff : nullptr;
    mrow_b[r] = p.mask_type == 1 ? p.mask_b + moff : nullptr;
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  std::memset(os, 0, sizeof(float) * Dv * SMALL_ROWS);
  const float* kbase = p.k + t.b * p.ksB + t.kvh * p.ksH;
  const float* vbase = p.v + t.b * p.vsB + t.kvh * p.vsH;
  const int ndv = Dv / VW;
  for (int ii = 0; ii < t.niv; ++ii) {
    const int a = t.iv[ii].a > min_lo ? t.iv[ii].a : min_lo;
    const int e = t.iv[ii].e < max_end ? t.iv[ii].e : max_end;
    for (int k0 = a; k0 < e; k0 += C) {
      const int n = (e - k0) < C ? (e - k0) : C;
      {
        // blocks k0 + C .. k0 + PFB * C (all of them at the interval's start, then the newest)
        const int pa = k0 == a ? k0 + n : k0 + PFB * C, pe = k0 + (PFB + 1) * C < e ? k0 + (PFB + 1) * C : e;
        prefetch_rows_l2(kbase, p.ksS, pa, pe, D);
        prefetch_rows_l2(vbase, p.vsS, pa, pe, Dv);
      }
      small_scores(qs, nr, D, kbase, p.ksS, k0, n, ss);
      const bool inside = k0 >= max_lo && k0 + n <= min_end;
      for (int r = 0; r < nr; ++r) {
        float* sr = ss + (size_t)r * C;
        if (!inside || p.mask_type) {
          const float* mf = mrow_f[r];
          const uint8_t* mb = mrow_b[r];
          for (int c = 0; c < n; ++c) {
            const int k = k0 + c;
            bool keep = k >= lo[r] && k < end[r];
            if (keep && mb) keep = mb[k * p.msK] != 0;
            if (keep && mf) {
              const float mv = mf[k * p.msK];
              if (mv > p.mask_min)
                sr[c] += mv;
              else
                keep = false;
            }
            if (!keep) sr[c] = -INFINITY;
          }
        }
        const int nvec = (n + VW - 1) / VW;
        for (int c = n; c < nvec * VW; ++c) sr[c] = -INFINITY;
        vf bm = splat(-INFINITY);
        for (int v = 0; v < nvec; ++v) bm = vmax(bm, ld(sr + v * VW));
        float mx = -INFINITY;
        for (int w = 0; w < VW; ++w) mx = bm[w] > mx ? bm[w] : mx;
        const float mn = mx > m[r] ? mx : m[r];
        const float ms = mn == -INFINITY ? 0.f : mn;
        const float alpha = m[r] == -INFINITY ? 0.f : std::exp(m[r] - ms);
        vf sum = vf{};
        for (int v = 0; v < nvec; ++v) {
          const vf pe = vexp(ld(sr + v * VW) - ms);
          st(sr + v * VW, pe);
          sum += pe;
        }
        l[r] = l[r] * alpha + hsum(sum);
        if (alpha != 1.f) {
          float* o = os + (size_t)r * Dv;
          for (int v = 0; v < ndv; ++v) st(o + v * VW, ld(o + v * VW) * alpha);
        }
        m[r] = mn;
      }
      for (int r = nr; r < SMALL_ROWS; ++r) std::memset(ss + (size_t)r * C, 0, sizeof(float) * n);
      small_pv(os, ss, vbase, p.vsS, k0, n, Dv);
    }
  }
  for (int r = 0; r < nr; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    store_o(p, t.b, t.heads[r], t.rows[r], os + (size_t)r * Dv, 1, inv);
  }
}

int tile_rows() { return R; }

// One tile's running state while key blocks stream past it.
struct TileState {
  float* qt;  // Q^T [D][R], scaled
  float* ot;  // O^T [Dv][R], unnormalised
  vf m[NV], l[NV];
  int lo[R], end[R];
  const float* mrow_f[R];
  const uint8_t* mrow_b[R];
  int nr, min_lo, max_end, max_lo, min_end;
};

static void init_state(const Problem& p, const Tile& t, TileState& ts_) {
  const int D = p.D, Dv = p.Dv, nr = t.nrows;
  std::memset(ts_.qt, 0, sizeof(float) * (size_t)D * R);
  std::memset(ts_.ot, 0, sizeof(float) * (size_t)Dv * R);
  ts_.nr = nr;
  ts_.min_lo = p.Skv, ts_.max_end = 0, ts_.max_lo = 0, ts_.min_end = p.Skv;
  for (int r = 0; r < nr; ++r) {
    const int h = t.heads[r], i = t.rows[r];
    load_q(p, t.b, h, i, ts_.qt + r, R);
    ts_.lo[r] = p.row_lo[i];
    ts_.end[r] = p.row_end[i];
    if (ts_.lo[r] < ts_.min_lo) ts_.min_lo = ts_.lo[r];
    if (ts_.end[r] > ts_.max_end) ts_.max_end = ts_.end[r];
    if (ts_.lo[r] > ts_.max_lo) ts_.max_lo = ts_.lo[r];
    if (ts_.end[r] < ts_.min_end) ts_.min_end = ts_.end[r];
    const int64_t moff = t.b * p.msB + h * p.msH + (int64_t)i * p.msQ;
    ts_.mrow_f[r] = p.mask_type == 2 ? p.mask_f + moff : nullptr;
    ts_.mrow_b[r] = p.mask_type == 1 ? p.mask_b + moff : nullptr;
  }
  for (int v = 0; v < NV; ++v) {
    ts_.m[v] = splat(-INFINITY);
    ts_.l[v] = vf{};
  }
}

// keys k0 .. k0+n (rows kr[0..n), vr[0..n)) into one tile's state
static void run_block(const Problem& p, TileState& ts_, const float* const* kr, const float* const* vr, int k0, int n,
                      float* sc) {
  const int D = p.D, Dv = p.Dv;
  float* qt = ts_.qt;
  float* ot = ts_.ot;
  // scores
  int c = 0;
  for (; c + JQ <= n; c += JQ) qk_step<JQ>(qt, kr + c, D, sc + (size_t)c * R);
  for (; c < n; ++c) qk_step<1>(qt, kr + c, D, sc + (size_t)c * R);
  // the model's mask where the block is not inside every row's range
  const bool inside = k0 >= ts_.max_lo && k0 + n <= ts_.min_end;
  if (!inside || p.mask_type) {
    for (int r = 0; r < ts_.nr; ++r) {
      const float* mf = ts_.mrow_f[r];
      const uint8_t* mb = ts_.mrow_b[r];
      for (int cc = 0; cc < n; ++cc) {
        const int k = k0 + cc;
        float& x = sc[(size_t)cc * R + r];
        bool keep = k >= ts_.lo[r] && k < ts_.end[r];
        if (keep && mb) keep = mb[k * p.msK] != 0;
        if (keep && mf) {
          const float mv = mf[k * p.msK];
          if (mv > p.mask_min)
            x += mv;
          else
            keep = false;
        }
        if (!keep) x = -INFINITY;
      }
    }
  }
  // online softmax, vertically over the block's keys
  vf alpha[NV];
  bool rescale = false;
  for (int v = 0; v < NV; ++v) {
    vf bm = splat(-INFINITY);
    for (int cc = 0; cc < n; ++cc) bm = vmax(bm, ld(sc + (size_t)cc * R + v * VW));
    const vf mn = vmax(ts_.m[v], bm);
    const vf ms = mn == splat(-INFINITY) ? vf{} : mn;
    alpha[v] = vexp(ts_.m[v] - ms);
    vf sum = vf{};
    for (int cc = 0; cc < n; ++cc) {
      float* ptr = sc + (size_t)cc * R + v * VW;
      const vf pe = vexp(ld(ptr) - ms);
      st(ptr, pe);
      sum += pe;
    }
    ts_.l[v] = ts_.l[v] * alpha[v] + sum;
    for (int w = 0; w < VW; ++w) rescale |= (ts_.m[v][w] != mn[w]);
    ts_.m[v] = mn;
  }
  if (rescale) {
    for (int dv = 0; dv < Dv; ++dv)
      for (int v = 0; v < NV; ++v) {
        float* ptr = ot + (size_t)dv * R + v * VW;
        st(ptr, ld(ptr) * alpha[v]);
      }
  }
  int dv = 0;
  for (; dv + JV <= Dv; dv += JV) pv_step<JV>(ot, sc, vr, n, dv);
  for (; dv < Dv; ++dv) pv_step<1>(ot, sc, vr, n, dv);
}

// normalise; a row with no key outputs zeros
static void finish(const Problem& p, const Tile& t, const TileState& ts_) {
  float lsum[R];
  for (int v = 0; v < NV; ++v) st(lsum + v * VW, ts_.l[v]);
  for (int r = 0; r < ts_.nr; ++r) {
    const float inv = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
    store_o(p, t.b, t.heads[r], t.rows[r], ts_.ot + r, R, inv);
  }
}

// Tiles of one batch row, KV head and key-interval set run together, key
// block by key block: each block of K and V is read from memory once for all
// of them and then stays in cache, instead of once per tile. With a long
// prompt and several KV heads, K and V outgrow the caches, and streaming them
// once per 32-row tile made the kernel wait on memory.
void run_tiles(const Problem& p, const Tile* ts, int nt) {
  thread_local Scratch s;
  thread_local std::vector<TileState> states;
  const int D = p.D, Dv = p.Dv;
  // tiles of few rows (decode steps, a group's last rows) take run_small alone
  thread_local std::vector<const Tile*> full;
  full.clear();
  for (int i = 0; i < nt; ++i) {
    if (ts[i].nrows <= SMALL_ROWS && D % VW == 0 && Dv % VW == 0)
      run_small(p, ts[i], s);
    else
      full.push_back(ts + i);
  }
  nt = (int)full.size();
  if (nt == 0) return;
  s.fit(D, Dv, nt);
  if ((int)states.size() < nt) states.resize(nt);
  int gmin = p.Skv, gmax = 0;
  for (int i = 0; i < nt; ++i) {
    TileState& ts_ = states[i];
    ts_.qt = s.qt.data() + s.qn * i;
    ts_.ot = s.ot.data() + s.on * i;
    init_state(p, *full[i], ts_);
    if (ts_.min_lo < gmin) gmin = ts_.min_lo;
    if (ts_.max_end > gmax) gmax = ts_.max_end;
  }
  const Tile& t0 = *full[0];
  const float* kbase = p.k + t0.b * p.ksB + t0.kvh * p.ksH;
  const float* vbase = p.v + t0.b * p.vsB + t0.kvh * p.vsH;
  float* sc = s.sc.data();
  for (int ii = 0; ii < t0.niv; ++ii) {
    // blocks on a grid from the interval's start, so a tile sees the same blocks
    // (and rounds the same) whichever tiles it runs with
    const int base = t0.iv[ii].a;
    const int a = gmin > base ? base + (gmin - base) / C * C : base;
    const int e = t0.iv[ii].e < gmax ? t0.iv[ii].e : gmax;
    for (int k0 = a; k0 < e; k0 += C) {
      const int n = (e - k0) < C ? (e - k0) : C;
      for (int c = 0; c < n; ++c) {
        s.kr[c] = kbase + (int64_t)(k0 + c) * p.ksS;
        s.vr[c] = vbase + (int64_t)(k0 + c) * p.vsS;
      }
      for (int i = 0; i < nt; ++i) {
        TileState& ts_ = states[i];
        const int ka = k0 > ts_.min_lo ? k0 : ts_.min_lo;
        const int ke = (k0 + n) < ts_.max_end ? (k0 + n) : ts_.max_end;
        if (ka >= ke) continue;
        run_block(p, ts_, s.kr.data() + (ka - k0), s.vr.data() + (ka - k0), ka, ke - ka, sc);
      }
    }
  }
  for (int i = 0; i < nt; ++i) finish(p, *full[i], states[i]);
}

void f16_to_f32(const uint16_t* src, float* dst, size_t n) {
  const _Float16* h = reinterpret_cast<const _Float16*>(src);
  for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(h[i]);
}

void f32_to_f16(const float* src, uint16_t* dst, size_t n) {
  _Float16* h = reinterpret_cast<_Float16*>(dst);
  for (size_t i = 0; i < n; ++i) h[i] = static_cast<_Float16>(src[i]);
}

}  // namespace BS_NS
