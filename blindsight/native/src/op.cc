// ai.blindsight::BlindSightAttention v1 as an ONNX Runtime custom op (CPU provider).
//
// Plain C API with ORT_API_MANUAL_INIT semantics: nothing links to libonnxruntime;
// the OrtApi comes from the OrtApiBase handed to RegisterCustomOps. Built against
// the headers of ONNX Runtime 1.21 (ORT_API_VERSION 21), so it loads into any
// onnxruntime >= 1.21.
//
// The kernel knows no category names. Every node carries `key_clauses` (INTS,
// one per query head, written by bs-compile from the rule table RULES of
// blindsight/attention/semantics.py): the bit set of the key clauses an image
// query of that head may see, with the bits of CLAUSE_BITS there (any key 1,
// text keys 2, the first sink_tokens of every image 4, the query's own image 8).
// create_kernel reads them from the node's own attributes; compute builds each
// image query's key intervals from its head's bits (text queries see every
// key). A node without `key_clauses` (an older bs-compile's) or with a bit
// outside these is refused when the session is created.
#include <onnxruntime_c_api.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"

using blindsight::Interval;
using blindsight::Problem;
using blindsight::Tile;

namespace {

const OrtApi* g_api = nullptr;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(OrtStatus* st) {
  if (st) {
    std::string msg = g_api->GetErrorMessage(st);
    g_api->ReleaseStatus(st);
    throw Error(msg);
  }
}

// ------------------------------------------------------------------ ISA dispatch

struct Isa {
  const char* name;
  void (*run_tiles)(const Problem&, const Tile*, int);
  int (*tile_rows)();
  void (*f16_to_f32)(const uint16_t*, float*, size_t);
  void (*f32_to_f16)(const float*, uint16_t*, size_t);
};

Isa pick_isa() {
  Isa base{"baseline", bs_baseline::run_tiles, bs_baseline::tile_rows, bs_baseline::f16_to_f32, bs_baseline::f32_to_f16};
#if defined(__x86_64__) || defined(_M_X64)
  Isa avx2{"avx2", bs_avx2::run_tiles, bs_avx2::tile_rows, bs_avx2::f16_to_f32, bs_avx2::f32_to_f16};
  Isa avx512{"avx512", bs_avx512::run_tiles, bs_avx512::tile_rows, bs_avx512::f16_to_f32, bs_avx512::f32_to_f16};
  __builtin_cpu_init();
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool has512 = has2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* want = std::getenv("BLINDSIGHT_NATIVE_ISA");  // testing: force a lower instruction set
  if (want && std::strcmp(want, "baseline") == 0) return base;
  if (want && std::strcmp(want, "avx2") == 0 && has2) return avx2;
  if (has512) return avx512;
  if (has2) return avx2;
#endif
  return base;
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// ------------------------------------------------------------------ attributes

// the bits of `key_clauses` (CLAUSE_BITS of blindsight/attention/semantics.py)
constexpr int64_t CLAUSE_ANY = 1, CLAUSE_TEXT = 2, CLAUSE_SINK = 4, CLAUSE_SAME_IMAGE = 8;
constexpr int64_t CLAUSES_KNOWN = CLAUSE_ANY | CLAUSE_TEXT | CLAUSE_SINK | CLAUSE_SAME_IMAGE;
// what blindsight_native_clauses() reports (the Python side checks it against CLAUSE_BITS)
constexpr const char* CLAUSE_TABLE = "any=1,text=2,sink=4,same_image=8";

struct Op : OrtCustomOp {
  ONNXTensorElementDataType type;
};

bool shape_attr_int(OrtShapeInferContext* ctx, const char* name, int64_t* out) {
  const OrtOpAttr* attr = nullptr;
  OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st || !attr) {
    if (st) g_api->ReleaseStatus(st);
    return false;
  }
  size_t n = 0;
  st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, out, sizeof(int64_t), &n);
  if (st) {
    g_api->ReleaseStatus(st);
    return false;
  }
  return true;
}

// The output's type and shape (ONNX Runtime's graph needs them for the values after the node).
OrtStatus* infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  try {
    int64_t heads = 0, kv_heads = 0;
    shape_attr_int(ctx, "num_heads", &heads);
    shape_attr_int(ctx, "kv_num_heads", &kv_heads);
    // output: the query's type, its shape with the value's head size
    OrtTensorTypeAndShapeInfo* qi = nullptr;
    check(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &qi));
    ONNXTensorElementDataType qt;
    size_t rank = 0;
    check(g_api->GetTensorElementType(qi, &qt));
    check(g_api->GetDimensionsCount(qi, &rank));
    std::vector<int64_t> dims(rank);
    std::vector<std::string> syms(rank);
    if (rank) {
      std::vector<const char*> raw(rank, nullptr);
      check(g_api->GetDimensions(qi, dims.data(), rank));
      check(g_api->GetSymbolicDimensions(qi, raw.data(), rank));
      for (size_t i = 0; i < rank; ++i) syms[i] = raw[i] ? raw[i] : "";
    }
    // (the context owns the input infos)
    if (rank) {  // replace the last dim by the value's head size (times heads for BSD)
      OrtTensorTypeAndShapeInfo* vi = nullptr;
      int64_t vlast = -1;
      if (!g_api->ShapeInferContext_GetInputTypeShape(ctx, 2, &vi) && vi) {
        size_t vr = 0;
        check(g_api->GetDimensionsCount(vi, &vr));
        if (vr == rank) {
          std::vector<int64_t> vd(vr);
          check(g_api->GetDimensions(vi, vd.data(), vr));
          vlast = vd[vr - 1];
        }
      }
      if (vlast > 0 && rank == 3 && kv_heads > 0 && heads > 0) vlast = vlast / kv_heads * heads;
      dims[rank - 1] = vlast > 0 ? vlast : -1;
      syms[rank - 1] = "";
    }
    OrtTensorTypeAndShapeInfo* oi = nullptr;
    check(g_api->CreateTensorTypeAndShapeInfo(&oi));
    check(g_api->SetTensorElementType(oi, qt));
    if (rank) {
      // an unknown dim needs a name: a dim_value of -1 would read as a size (one fresh name each)
      static std::atomic<unsigned long> fresh{0};
      for (size_t i = 0; i < rank; ++i) {
        if (!syms[i].empty() || dims[i] < 0) dims[i] = -1;
        if (dims[i] < 0 && syms[i].empty()) syms[i] = "blindsight_unk_" + std::to_string(fresh++);
      }
      check(g_api->SetDimensions(oi, dims.data(), rank));
      std::vector<const char*> s2(rank);
      for (size_t i = 0; i < rank; ++i) s2[i] = syms[i].c_str();
      check(g_api->SetSymbolicDimensions(oi, s2.data(), rank));
    }
    OrtStatus* res = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, oi);
    g_api->ReleaseTensorTypeAndShapeInfo(oi);
    return res;
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

int64_t info_int(const OrtKernelInfo* info, const char* name, int64_t dflt, bool required = false) {
  int64_t v = 0;
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(info, name, &v);
  if (st) {
    g_api->ReleaseStatus(st);
    if (required) throw Error(std::string("BlindSightAttention needs the attribute '") + name + "'");
    return dflt;
  }
  return v;
}

struct Kernel {
  ONNXTensorElementDataType type;
  int64_t H, Hkv, sink_tokens, layer, is_causal, window, image_blocks;
  float scale;
  bool bsd;
  std::vector<int64_t> clause_sets;  // the distinct key clause bit sets of the heads without CLAUSE_ANY
  std::vector<int> head_set;         // per query head: its index in clause_sets, -1 for CLAUSE_ANY (every key)
};

std::vector<int64_t> info_ints(const OrtKernelInfo* info, const char* name, bool* found) {
  size_t n = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &n);
  if (st) {
    g_api->ReleaseStatus(st);
    *found = false;
    return {};
  }
  *found = true;
  std::vector<int64_t> out(n);
  if (n) check(g_api->KernelInfoGetAttributeArray_int64(info, name, out.data(), &n));
  out.resize(n);
  return out;
}

OrtStatus* create_kernel(const OrtCustomOp* base, const OrtApi*, const OrtKernelInfo* info, void** out) {
  const Op* op = static_cast<const Op*>(base);  // (its type only)
  try {
    auto k = std::make_unique<Kernel>();
    k->type = op->type;
    k->H = info_int(info, "num_heads", 0, true);
    k->Hkv = info_int(info, "kv_num_heads", 0, true);
    k->sink_tokens = info_int(info, "sink_tokens", 1);
    k->layer = info_int(info, "layer", 0);
    k->is_causal = info_int(info, "is_causal", 1);
    k->window = info_int(info, "local_window_size", -1);
    k->image_blocks = info_int(info, "image_blocks", 0);
    float sc = 0.f;
    OrtStatus* st = g_api->KernelInfoGetAttribute_float(info, "scale", &sc);
    if (st) {
      g_api->ReleaseStatus(st);
      throw Error("BlindSightAttention needs the attribute 'scale'");
    }
    k->scale = sc;
    std::string fmt = "BNSH";
    size_t n = 0;
    st = g_api->KernelInfoGetAttribute_string(info, "qkv_format", nullptr, &n);
    if (!st) {
      std::vector<char> buf(n + 1, '\0');
      check(g_api->KernelInfoGetAttribute_string(info, "qkv_format", buf.data(), &n));
      fmt = buf.data();
    } else {
      g_api->ReleaseStatus(st);
    }
    if (fmt != "BNSH" && fmt != "BSD") throw Error("BlindSightAttention: qkv_format must be BNSH or BSD, got '" + fmt + "'");
    k->bsd = fmt == "BSD";
    if (k->H <= 0 || k->Hkv <= 0 || k->H % k->Hkv)
      throw Error("BlindSightAttention: num_heads must be a positive multiple of kv_num_heads");
    if (k->image_blocks != 0 && k->image_blocks != 1) throw Error("BlindSightAttention: image_blocks must be 0 or 1");
    bool found = false;
    const std::vector<int64_t> bits = info_ints(info, "key_clauses", &found);
    if (!found)
      throw Error("BlindSightAttention (native): this node has no 'key_clauses' attribute: it was compiled by an "
                  "older bs-compile; recompile it, or run it on its function bodies (native=False)");
    if ((int64_t)bits.size() != k->H)
      throw Error("BlindSightAttention (native): " + std::to_string(bits.size()) + " key_clauses for " +
                  std::to_string(k->H) + " heads (one per query head)");
    for (size_t h = 0; h < bits.size(); ++h) {
      const int64_t b = bits[h];
      if (b < 0 || (b & ~CLAUSES_KNOWN))
        throw Error("BlindSightAttention (native): head " + std::to_string(h) + " of layer " + std::to_string(k->layer) +
                    " has key_clauses " + std::to_string(b) + ", with bits this kernel does not read (it reads " +
                    CLAUSE_TABLE + "); run the model on its function bodies (native=False)");
      if (b & CLAUSE_ANY) {
        k->head_set.push_back(-1);
        continue;
      }
      auto it = std::find(k->clause_sets.begin(), k->clause_sets.end(), b);
      k->head_set.push_back((int)(it - k->clause_sets.begin()));
      if (it == k->clause_sets.end()) k->clause_sets.push_back(b);
    }
    *out = k.release();
    return nullptr;
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

// ------------------------------------------------------------------ compute

struct TensorView {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  const void* data = nullptr;
  size_t count = 0;
};

TensorView view(OrtKernelContext* ctx, size_t index) {
  TensorView t;
  size_t n_in = 0;
  check(g_api->KernelContext_GetInputCount(ctx, &n_in));
  if (index >= n_in) return t;
  check(g_api->KernelContext_GetInput(ctx, index, &t.value));
  if (!t.value) return t;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(t.value, &info));
  size_t rank = 0;
  check(g_api->GetTensorElementType(info, &t.type));
  check(g_api->GetDimensionsCount(info, &rank));
  t.dims.resize(rank);
  if (rank) check(g_api->GetDimensions(info, t.dims.data(), rank));
  check(g_api->GetTensorShapeElementCount(info, &t.count));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  void* d = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(t.value), &d));
  t.data = d;
  return t;
}

std::string shape_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// a run of consecutive tiles that share batch row, KV head and key intervals
struct Bundle {
  size_t first, count;
};

struct Work {
  const Problem* p;
  const std::vector<Tile>* tiles;
  const std::vector<Bundle>* bundles;
  const std::vector<int>* order;
  int B;
  void (*run)(const Problem&, const Tile*, int);
};

void work_fn(void* data, size_t idx) {
  const Work* w = static_cast<const Work*>(data);
  const Bundle& bu = (*w->bundles)[(*w->order)[idx / w->B]];
  thread_local std::vector<Tile> ts;
  ts.assign(w->tiles->begin() + bu.first, w->tiles->begin() + bu.first + bu.count);
  for (Tile& t : ts) t.b = (int)(idx % w->B);
  w->run(*w->p, ts.data(), (int)ts.size());
}

struct ConvJob {
  const uint16_t* src;
  float* dst;
  size_t n;
  void (*fn)(const uint16_t*, float*, size_t);
};
void conv_fn(void* data, size_t idx) {
  const ConvJob* j = static_cast<const ConvJob*>(data);
  const size_t chunk = 1 << 16, a = idx * chunk, e = std::min(j->n, a + chunk);
  j->fn(j->src + a, j->dst + a, e - a);
}

void to_f32(OrtKernelContext* ctx, const TensorView& t, std::vector<float>& buf) {
  buf.resize(t.count);
  ConvJob j{static_cast<const uint16_t*>(t.data), buf.data(), t.count, isa().f16_to_f32};
  const size_t chunks = (t.count + (1 << 16) - 1) >> 16;
  if (chunks) check(g_api->KernelContext_ParallelFor(ctx, conv_fn, chunks, 0, &j));
}

void compute(const Kernel& K, OrtKernelContext* ctx) {
  TensorView q = view(ctx, 0), k = view(ctx, 1), v = view(ctx, 2), mask = view(ctx, 3), spans = view(ctx, 4);
  if (!q.value || !k.value || !v.value) throw Error("BlindSightAttention: query, key and value are required");
  if (!spans.value) throw Error("BlindSightAttention: the image_spans input is required");
  const bool f16 = K.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (q.type != K.type || k.type != K.type || v.type != K.type)
    throw Error("BlindSightAttention: query, key and value must share one dtype");
  const size_t rank = K.bsd ? 3 : 4;
  if (q.dims.size() != rank || k.dims.size() != rank || v.dims.size() != rank)
    throw Error(std::string("BlindSightAttention: qkv_format ") + (K.bsd ? "BSD takes rank-3" : "BNSH takes rank-4") +
                " query/key/value; got " + shape_str(q.dims) + ", " + shape_str(k.dims) + ", " + shape_str(v.dims));
  Problem p;
  p.H = (int)K.H;
  p.Hkv = (int)K.Hkv;
  p.B = (int)q.dims[0];
  if (K.bsd) {
    p.Sq = (int)q.dims[1];
    p.Skv = (int)k.dims[1];
    if (q.dims[2] % K.H || k.dims[2] % K.Hkv || v.dims[2] % K.Hkv)
      throw Error("BlindSightAttention: BSD hidden sizes " + shape_str(q.dims) + " / " + shape_str(k.dims) +
                  " are not multiples of the head counts");
    p.D = (int)(q.dims[2] / K.H);
    p.Dv = (int)(v.dims[2] / K.Hkv);
    if (k.dims[2] / K.Hkv != p.D) throw Error("BlindSightAttention: query and key head sizes differ");
    if (v.dims[1] != p.Skv) throw Error("BlindSightAttention: key and value lengths differ");
  } else {
    if (q.dims[1] != K.H || k.dims[1] != K.Hkv || v.dims[1] != K.Hkv)
      throw Error("BlindSightAttention: head counts " + shape_str(q.dims) + ", " + shape_str(k.dims) +
                  " disagree with num_heads " + std::to_string(K.H) + " / kv_num_heads " + std::to_string(K.Hkv));
    p.Sq = (int)q.dims[2];
    p.Skv = (int)k.dims[2];
    p.D = (int)q.dims[3];
    p.Dv = (int)v.dims[3];
    if (k.dims[3] != p.D) throw Error("BlindSightAttention: query and key head sizes differ");
    if (v.dims[2] != p.Skv) throw Error("BlindSightAttention: key and value lengths differ");
  }
  if (k.dims[0] != p.B || v.dims[0] != p.B) throw Error("BlindSightAttention: query, key and value batch sizes differ");
  if (p.Skv < p.Sq)
    throw Error("BlindSightAttention: " + std::to_string(p.Sq) + " queries but only " + std::to_string(p.Skv) +
                " keys (a KV cache holds the queries' own keys too)");
  const int past = p.Skv - p.Sq;
  p.scale = K.scale;
  const int64_t H = p.H, Hkv = p.Hkv, Sq = p.Sq, Skv = p.Skv, D = p.D, Dv = p.Dv;
  if (K.bsd) {
    p.qsB = Sq * H * D, p.qsS = H * D, p.qsH = D;
    p.ksB = Skv * Hkv * D, p.ksS = Hkv * D, p.ksH = D;
    p.vsB = Skv * Hkv * Dv, p.vsS = Hkv * Dv, p.vsH = Dv;
    p.osB = Sq * H * Dv, p.osS = H * Dv, p.osH = Dv;
  } else {
    p.qsB = H * Sq * D, p.qsH = Sq * D, p.qsS = D;
    p.ksB = Hkv * Skv * D, p.ksH = Skv * D, p.ksS = D;
    p.vsB = Hkv * Skv * Dv, p.vsH = Skv * Dv, p.vsS = Dv;
    p.osB = H * Sq * Dv, p.osH = Sq * Dv, p.osS = Dv;
  }
  std::vector<int64_t> odims = q.dims;
  odims[rank - 1] = K.bsd ? H * Dv : Dv;
  OrtValue* out = nullptr;
  check(g_api->KernelContext_GetOutput(ctx, 0, odims.data(), odims.size(), &out));
  void* out_data = nullptr;
  check(g_api->GetTensorMutableData(out, &out_data));
  const size_t out_count = (size_t)p.B * Sq * H * Dv;
  if (out_count == 0) return;

  // image spans: int64 [N, 2], sorted, non-overlapping, non-empty
  if (spans.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) throw Error("BlindSightAttention: image_spans must be int64");
  if (!(spans.dims.size() == 2 && spans.dims[1] == 2) && spans.count != 0)
    throw Error("BlindSightAttention: image_spans must have shape [N, 2]; got " + shape_str(spans.dims));
  const int N = spans.count ? (int)spans.dims[0] : 0;
  const int64_t* sp = static_cast<const int64_t*>(spans.data);
  std::vector<int32_t> st(N), en(N);
  for (int i = 0; i < N; ++i) {
    const int64_t a = sp[2 * i], e = sp[2 * i + 1];
    if (a < 0 || e <= a || (i && a < sp[2 * i - 1]))
      throw Error("BlindSightAttention: image span " + std::to_string(i) + " (" + std::to_string(a) + ", " +
                  std::to_string(e) + ") is invalid: spans must be non-empty, sorted and non-overlapping");
    st[i] = (int32_t)std::min<int64_t>(a, Skv);
    en[i] = (int32_t)std::min<int64_t>(e, Skv);
  }
  std::vector<int32_t> image_of(Skv, -1);
  for (int i = 0; i < N; ++i)
    for (int32_t t = st[i]; t < en[i]; ++t) image_of[t] = i;

  // the model's structure per query row: causality (or the same image block), window
  std::vector<int32_t> row_lo(Sq), row_end(Sq);
  for (int i = 0; i < Sq; ++i) {
    const int pos = past + i;
    int lo = 0, end = (int)Skv;
    if (K.is_causal) {
      end = pos + 1;
      const int j = image_of[pos];
      if (K.image_blocks && j >= 0 && pos > sp[2 * j] && pos < sp[2 * j + 1] - 1)
        end = std::max<int>(end, (int)std::min<int64_t>(sp[2 * j + 1] - 1, Skv));
    }
    if (K.window > 0) lo = std::max<int>(0, pos - (int)K.window + 1);
    row_lo[i] = lo;
    row_end[i] = std::max(lo, end);
  }
  p.row_lo = row_lo.data();
  p.row_end = row_end.data();

  // fp16: K and V converted once (every tile reads them); the tiles read fp16
  // queries and write fp16 output themselves; all arithmetic in fp32
  std::vector<float> kf, vf, mf;
  if (f16) {
    to_f32(ctx, k, kf);
    to_f32(ctx, v, vf);
    p.q16 = static_cast<const uint16_t*>(q.data), p.out16 = static_cast<uint16_t*>(out_data);
    p.k = kf.data(), p.v = vf.data();
  } else {
    p.q = static_cast<const float*>(q.data), p.k = static_cast<const float*>(k.data);
    p.v = static_cast<const float*>(v.data), p.out = static_cast<float*>(out_data);
  }

  // the model's mask, broadcast to [B, H, Sq, Skv]
  if (mask.value) {
    if (mask.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) {
      p.mask_type = 1;
      p.mask_b = static_cast<const uint8_t*>(mask.data);
    } else if (mask.type == K.type) {
      p.mask_type = 2;
      if (f16) {
        to_f32(ctx, mask, mf);
        p.mask_f = mf.data();
        p.mask_min = -32752.0f;
      } else {
        p.mask_f = static_cast<const float*>(mask.data);
        p.mask_min = -std::numeric_limits<float>::max() / 2;
      }
    } else {
      throw Error("BlindSightAttention: attn_mask must be bool or of the attention's dtype");
    }
    if (mask.dims.size() > 4 || mask.dims.size() < 2)
      throw Error("BlindSightAttention: attn_mask must broadcast to [B, H, Sq, Skv]; got " + shape_str(mask.dims));
    std::vector<int64_t> md(4 - mask.dims.size(), 1);
    md.insert(md.end(), mask.dims.begin(), mask.dims.end());
    const int64_t want[4] = {p.B, H, Sq, Skv};
    int64_t strides[4], acc = 1;
    for (int d = 3; d >= 0; --d) {
      if (md[d] != 1 && md[d] != want[d])
        throw Error("BlindSightAttention: attn_mask " + shape_str(mask.dims) + " does not broadcast to " +
                    shape_str({p.B, H, Sq, Skv}));
      strides[d] = md[d] == 1 ? 0 : acc;
      acc *= md[d];
    }
    p.msB = strides[0], p.msH = strides[1], p.msQ = strides[2], p.msK = strides[3];
  }

  // plan: per KV head, the query rows grouped by the key intervals they may see:
  // group 0 every key (text queries, heads with CLAUSE_ANY), then one group per
  // (clause set, image) for image queries
  const int G = p.H / p.Hkv, R = isa().tile_rows();
  std::vector<int32_t> heads_buf, rows_buf;
  struct Group {
    std::vector<int32_t> heads, rows;
  };
  std::vector<Interval> iv_buf;
  std::vector<std::pair<size_t, size_t>> group_iv;  // per group key: (offset, count) in iv_buf
  std::vector<bool> have_iv;
  const int nsets = (int)K.clause_sets.size();
  const int nkeys = 1 + nsets * N;
  group_iv.assign(nkeys, {0, 0});
  have_iv.assign(nkeys, false);
  iv_buf.push_back({0, (int32_t)Skv});
  group_iv[0] = {0, 1};
  have_iv[0] = true;
  // an image query's keys under a clause set: the text runs (CLAUSE_TEXT), its own
  // image (CLAUSE_SAME_IMAGE), the first sink_tokens of every image (CLAUSE_SINK)
  auto intervals = [&](int64_t bits, int img) {
    const bool text = bits & CLAUSE_TEXT, own = bits & CLAUSE_SAME_IMAGE, sinks = bits & CLAUSE_SINK;
    const size_t off = iv_buf.size();
    auto add = [&](int32_t a, int32_t e) {
      if (e <= a) return;
      if (iv_buf.size() > off && iv_buf.back().e == a)
        iv_buf.back().e = e;
      else
        iv_buf.push_back({a, e});
    };
    int32_t prev = 0;
    for (int j = 0; j < N; ++j) {
      if (text) add(prev, st[j]);
      if (j == img && own)
        add(st[j], en[j]);
      else if (sinks)
        add(st[j], (int32_t)std::min<int64_t>((int64_t)st[j] + std::max<int64_t>(K.sink_tokens, 0), en[j]));
      prev = std::max(prev, en[j]);
    }
    if (text) add(prev, (int32_t)Skv);
    return std::make_pair(off, iv_buf.size() - off);
  };
  std::vector<Group> groups(nkeys);
  std::vector<Tile> tiles;
  std::vector<std::pair<size_t, size_t>> tile_rows_at;  // offset into heads_buf/rows_buf
  std::vector<int> tile_group;
  for (int g = 0; g < p.Hkv; ++g) {
    for (auto& gr : groups) gr.heads.clear(), gr.rows.clear();
    for (int i = 0; i < Sq; ++i) {
      const int img = image_of[past + i];
      for (int h = g * G; h < (g + 1) * G; ++h) {
        const int set = K.head_set[h];
        const int key = (img < 0 || set < 0) ? 0 : 1 + set * N + img;
        groups[key].heads.push_back(h);
        groups[key].rows.push_back(i);
      }
    }
    for (int key = 0; key < nkeys; ++key) {
      Group& gr = groups[key];
      if (gr.rows.empty()) continue;
      if (!have_iv[key]) {
        group_iv[key] = intervals(K.clause_sets[(key - 1) / N], (key - 1) % N);
        have_iv[key] = true;
      }
      for (size_t r0 = 0; r0 < gr.rows.size(); r0 += R) {
        const size_t n = std::min<size_t>(R, gr.rows.size() - r0);
        Tile t;
        t.kvh = g;
        t.nrows = (int)n;
        tile_rows_at.push_back({heads_buf.size(), n});
        tile_group.push_back(key);
        heads_buf.insert(heads_buf.end(), gr.heads.begin() + r0, gr.heads.begin() + r0 + n);
        rows_buf.insert(rows_buf.end(), gr.rows.begin() + r0, gr.rows.begin() + r0 + n);
        tiles.push_back(t);
      }
    }
  }
  std::vector<double> cost(tiles.size());
  for (size_t t = 0; t < tiles.size(); ++t) {
    tiles[t].heads = heads_buf.data() + tile_rows_at[t].first;
    tiles[t].rows = rows_buf.data() + tile_rows_at[t].first;
    tiles[t].iv = iv_buf.data() + group_iv[tile_group[t]].first;
    tiles[t].niv = (int)group_iv[tile_group[t]].second;
    int lo = (int)Skv, end = 0;
    for (int r = 0; r < tiles[t].nrows; ++r) {
      lo = std::min(lo, row_lo[tiles[t].rows[r]]);
      end = std::max(end, row_end[tiles[t].rows[r]]);
    }
    double keys = 0;
    for (int i = 0; i < tiles[t].niv; ++i)
      keys += std::max(0, std::min(end, tiles[t].iv[i].e) - std::max(lo, tiles[t].iv[i].a));
    cost[t] = keys + 1;
  }
  // Bundles of up to 16 tiles read each key block once for all of them (kernel.cc
  // run_tiles); smaller where that would leave fewer than 64 units of work for
  // the thread pool. Independent of the machine, so the answer is too.
  const size_t per = std::max<size_t>(1, std::min<size_t>(16, tiles.size() * p.B / 64));
  std::vector<Bundle> bundles;
  std::vector<double> bcost;
  for (size_t t = 0; t < tiles.size(); ++t) {
    if (!bundles.empty() && bundles.back().count < per && tile_group[t] == tile_group[t - 1] &&
        tiles[t].kvh == tiles[t - 1].kvh) {
      bundles.back().count++;
      bcost.back() += cost[t];
    } else {
      bundles.push_back({t, 1});
      bcost.push_back(cost[t]);
    }
  }
  std::vector<int> order(bundles.size());
  for (size_t b = 0; b < order.size(); ++b) order[b] = (int)b;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bcost[a] > bcost[b]; });

  Work w{&p, &tiles, &bundles, &order, p.B, isa().run_tiles};
  const size_t total = bundles.size() * (size_t)p.B;
  if (total) check(g_api->KernelContext_ParallelFor(ctx, work_fn, total, 0, &w));
}

OrtStatus* kernel_compute(void* kernel, OrtKernelContext* ctx) {
  try {
    compute(*static_cast<Kernel*>(kernel), ctx);
    return nullptr;
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  }
}

// ------------------------------------------------------------------ registration

Op* make_op(ONNXTensorElementDataType type) {
  Op* op = new Op();
  std::memset(static_cast<OrtCustomOp*>(op), 0, sizeof(OrtCustomOp));
  op->type = type;
  op->version = ORT_API_VERSION;
  op->GetName = [](const OrtCustomOp*) { return "BlindSightAttention"; };
  op->GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op->GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 5; };
  op->GetInputType = [](const OrtCustomOp* o, size_t i) {
    if (i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // bool or the attention's float type
    if (i == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return static_cast<const Op*>(o)->type;
  };
  op->GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op->GetOutputType = [](const OrtCustomOp* o, size_t) { return static_cast<const Op*>(o)->type; };
  op->GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op->GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op->GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op->GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op->GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op->GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op->GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op->KernelDestroy = [](void* k) { delete static_cast<Kernel*>(k); };
  op->CreateKernelV2 = create_kernel;
  op->KernelComputeV2 = kernel_compute;
  op->InferOutputShapeFn = infer_shape;
  op->GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op->GetEndVersion = [](const OrtCustomOp*) { return 1; };
  return op;
}

std::mutex g_keep_mu;
std::vector<std::unique_ptr<Op>> g_keep;  // ops live as long as the process (sessions may outlive options)

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                 const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // cannot even report: the runtime is older than the headers (1.21)
  g_api = api;
  try {
    OrtCustomOpDomain* domain = nullptr;
    check(api->CreateCustomOpDomain("ai.blindsight", &domain));
    std::lock_guard<std::mutex> lock(g_keep_mu);
    for (auto type : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16}) {
      g_keep.emplace_back(make_op(type));
      check(api->CustomOpDomain_Add(domain, g_keep.back().get()));
    }
    check(api->AddCustomOpDomain(options, domain));  // the options own the domain from here
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

// Which compute object this process runs (baseline, avx2, avx512), and the header API version.
__attribute__((visibility("default"))) const char* blindsight_native_isa() { return isa().name; }
__attribute__((visibility("default"))) int blindsight_native_api_version() { return ORT_API_VERSION; }
// The key clauses this kernel reads, as name=bit pairs (blindsight.native checks them against CLAUSE_BITS).
__attribute__((visibility("default"))) const char* blindsight_native_clauses() { return CLAUSE_TABLE; }
}
