// CUDA exact magnitude select and in-place prune (ops/magnitude_select.h): the twin
// of cpu/magnitude_select_cpu.cpp, with the same keys and the same answers bit for bit.
//
// Keys: the bit pattern of |w| as float (float32/float16/bfloat16 lists) or as double
// (when any tensor is float64), built with integer operations only so that every
// NaN payload gets the key the CPU gives it.
//
// Work is cut on the host into chunks of at most kChunk elements that never cross a
// tensor boundary, in tensor order then element order; the table (address, length,
// dtype per chunk) is copied to the device once. Every kernel walks the chunks with a
// grid stride, one thread block per chunk at a time, using 16-byte loads where the
// data is aligned.
//
// select: one radix pass per 11-bit digit (3 passes for 32-bit keys, 6 for 64-bit):
//   digit_histogram_kernel counts the candidates' digits in shared memory and adds
//   them to a global histogram with atomics; choose_bucket_kernel (one block) finds
//   the bucket holding rank k and narrows the prefix in device memory, so there is no
//   host round trip between passes, and one copy back at the end. After the first pass
//   only a few percent of the weights remain candidates: the second pass also copies
//   their keys into a buffer of at most total/16 keys, and the later passes read only
//   the buffer (the device decides: when the candidates overflowed it, they walk the
//   weights again). The order of the buffer does not matter: a histogram counts a set.
// prune: prune_kernel zeroes |w| < t and, when every tie goes, |w| == t, in one
//   vectorised pass. When only some ties go (0 < k - below < equal), tie_count_kernel
//   and exclusive_scan_kernel first give each chunk the rank of its first tie; only the
//   chunk where the cut falls then ranks its ties one by one (a block scan).
// Extra device memory: 16 B per chunk for the table, 6 x 16 KiB of histograms, the
// candidate buffer (keys of at most total/16 weights, at least kChunk), and 8 B per
// chunk of tie ranks when ties are partial.
// magnitude_select_device_cuda is the same select with no host step once launched (a
// kernel initialises the state, another writes the result to device memory), on a
// table and scratch the caller allocated (torch's allocator): it can be captured in a
// CUDA graph; magnitude_select_plan_cuda makes its table on the host beforehand.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/dtype.h"
#include "cuda/cuda_check.h"
#include "ops/magnitude_select.h"

namespace nnmark {
namespace {

constexpr int kThreads = 512;         // threads per block of the chunk kernels
constexpr int kScanThreads = 1024;    // threads of the one-block kernels
constexpr int kDigitBits = 11;        // radix digit: 2048 buckets, 8 KiB of shared counts
constexpr int kBins = 1 << kDigitBits;
constexpr int64_t kChunk = 16384;     // elements per chunk (a multiple of every vector width)
constexpr int kStage = 2048;          // candidate keys a block gathers in shared memory per chunk

using u64 = unsigned long long;

struct Chunk {
  void* data;  // [len] first element of the chunk, dtype `dtype`
  int len;     // 1..kChunk
  int dtype;   // DType code
};

struct SelectState {
  u64 prefix;      // key bits chosen so far (the digits above the current one)
  long long rank;  // rank of the k-th smallest among the candidates, 1-based
  long long below; // weights with a key below every candidate's
  long long equal; // candidates in the bucket chosen last
  u64 ncand;       // candidate keys put in the buffer (more than its capacity: it overflowed)
};

// ---- keys -----------------------------------------------------------------------

template <int D> struct Raw;
template <> struct Raw<kFloat32> { using type = unsigned int; };
template <> struct Raw<kFloat64> { using type = u64; };
template <> struct Raw<kFloat16> { using type = unsigned short; };
template <> struct Raw<kBFloat16> { using type = unsigned short; };

// Bits of |float(h)| for a float16 h, as the CPU's half_to_float gives them.
__device__ __forceinline__ unsigned int half_key(unsigned int h) {
  const unsigned int exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0) {
    if (man == 0) return 0;
    const int s = __clz(static_cast<int>(man)) - 21;  // shifts until bit 10 is set
    return ((113u - s) << 23) | (((man << s) & 0x3FFu) << 13);
  }
  if (exp == 0x1Fu) return 0x7F800000u | (man << 13);
  return ((exp + 112u) << 23) | (man << 13);
}

// Bits of (double)f for the non-negative float with bits k, as a host float -> double
// conversion gives them: exact, and a signalling NaN comes out quiet (x86 and ARM).
__device__ __forceinline__ u64 widen_key(unsigned int k) {
  const unsigned int e = k >> 23, m = k & 0x7FFFFFu;
  if (e == 0) {
    if (m == 0) return 0;
    const int s = __clz(static_cast<int>(m)) - 8;  // shifts until bit 23 is set
    return (static_cast<u64>(897 - s) << 52) | (static_cast<u64>((m << s) & 0x7FFFFFu) << 29);
  }
  if (e == 0xFFu) return 0x7FF0000000000000ull | (static_cast<u64>(m) << 29) | (m != 0 ? 1ull << 51 : 0ull);
  return (static_cast<u64>(e + 896u) << 52) | (static_cast<u64>(m) << 29);
}

// Key (unsigned int or u64) of one raw element of dtype D.
template <typename Key, int D>
__device__ __forceinline__ Key key_of(typename Raw<D>::type r) {
  if constexpr (D == kFloat64) {
    return static_cast<Key>(r & 0x7FFFFFFFFFFFFFFFull);  // only with 64-bit keys
  } else {
    unsigned int k;
    if constexpr (D == kFloat32) k = r & 0x7FFFFFFFu;
    else if constexpr (D == kBFloat16) k = (static_cast<unsigned int>(r) << 16) & 0x7FFFFFFFu;
    else k = half_key(r);
    if constexpr (sizeof(Key) == 4) return k;
    else return widen_key(k);
  }
}

// ---- walking a chunk ------------------------------------------------------------

// Elements before the first 16-byte boundary (the host checks element alignment).
template <typename R>
__device__ __forceinline__ int head_of(const R* p, int len) {
  const int h = static_cast<int>(((16u - (reinterpret_cast<uintptr_t>(p) & 15u)) & 15u) / sizeof(R));
  return h < len ? h : len;
}

// f(key) for every element of the chunk, read-only; every thread of the block calls it.
template <typename Key, int D, typename F>
__device__ __forceinline__ void visit_typed(const Chunk& ch, F& f) {
  using R = typename Raw<D>::type;
  constexpr int kVec = 16 / sizeof(R);
  const R* p = static_cast<const R*>(ch.data);
  const int head = head_of(p, ch.len);
  const int nvec = (ch.len - head) / kVec;
  const uint4* v = reinterpret_cast<const uint4*>(p + head);
  for (int i = threadIdx.x; i < head; i += blockDim.x) f(key_of<Key, D>(__ldg(p + i)));
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 u = __ldg(v + i);
    R r[kVec];
    memcpy(r, &u, 16);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f(key_of<Key, D>(r[j]));
  }
  for (int i = head + nvec * kVec + threadIdx.x; i < ch.len; i += blockDim.x) f(key_of<Key, D>(__ldg(p + i)));
}

template <typename Key, typename F>
__device__ __forceinline__ void visit_chunk(const Chunk& ch, F& f) {
  switch (ch.dtype) {
    case kFloat32: visit_typed<Key, kFloat32>(ch, f); break;
    case kFloat16: visit_typed<Key, kFloat16>(ch, f); break;
    case kBFloat16: visit_typed<Key, kBFloat16>(ch, f); break;
    default:
      if constexpr (sizeof(Key) == 8) visit_typed<Key, kFloat64>(ch, f);  // float64 forces 64-bit keys
      break;
  }
}

// Zeroes (all bits: +0.0, as the CPU's memset) every element whose key passes zero(key);
// a 16-byte vector is written back only when one of its elements changed.
template <typename Key, int D, typename Z>
__device__ __forceinline__ void zero_typed(const Chunk& ch, Z& zero) {
  using R = typename Raw<D>::type;
  constexpr int kVec = 16 / sizeof(R);
  R* p = static_cast<R*>(ch.data);
  const int head = head_of(p, ch.len);
  const int nvec = (ch.len - head) / kVec;
  uint4* v = reinterpret_cast<uint4*>(p + head);
  for (int i = threadIdx.x; i < head; i += blockDim.x)
    if (zero(key_of<Key, D>(p[i]))) p[i] = 0;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    uint4 u = v[i];
    R r[kVec];
    memcpy(r, &u, 16);
    bool changed = false;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (zero(key_of<Key, D>(r[j]))) {
        r[j] = 0;
        changed = true;
      }
    }
    if (changed) {
      memcpy(&u, r, 16);
      v[i] = u;
    }
  }
  for (int i = head + nvec * kVec + threadIdx.x; i < ch.len; i += blockDim.x)
    if (zero(key_of<Key, D>(p[i]))) p[i] = 0;
}

template <typename Key, typename Z>
__device__ __forceinline__ void zero_chunk(const Chunk& ch, Z& zero) {
  switch (ch.dtype) {
    case kFloat32: zero_typed<Key, kFloat32>(ch, zero); break;
    case kFloat16: zero_typed<Key, kFloat16>(ch, zero); break;
    case kBFloat16: zero_typed<Key, kBFloat16>(ch, zero); break;
    default:
      if constexpr (sizeof(Key) == 8) zero_typed<Key, kFloat64>(ch, zero);
      break;
  }
}

// Exclusive prefix sum of v over the block in thread order, and the block total. Every
// thread of the block calls it (it synchronises); blockDim.x is a multiple of 32.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* total) {
  __shared__ T warp_incl[32];  // [warp] inclusive sums of the warps' totals
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  T incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) warp_incl[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? warp_incl[lane] : T(0);
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const T o = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += o;
    }
    if (lane < warps) warp_incl[lane] = w;
  }
  __syncthreads();
  const T excl = incl - v + (warp > 0 ? warp_incl[warp - 1] : T(0));
  *total = warp_incl[warps - 1];
  __syncthreads();  // warp_incl is free again for the next call
  return excl;
}

// ---- select ---------------------------------------------------------------------

// Adds the block's shared counts to the global histogram and clears them.
__device__ __forceinline__ void flush_counts(unsigned int* counts, int nb, u64* hist) {
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += blockDim.x) {
    const unsigned int c = counts[b];
    if (c != 0) {
      atomicAdd(hist + b, static_cast<u64>(c));
      counts[b] = 0;
    }
  }
  __syncthreads();
}

// Counts, per value of key bits [hi - bits, hi), the candidates: keys whose bits from
// hi up equal the prefix chosen so far. mode kWalk reads the weights; kGather reads
// them and also puts the candidates' keys in cand (capacity cap, count in
// state->ncand); kBuffer reads cand when the gather fitted, else the weights.
enum HistMode : int { kWalk = 0, kGather = 1, kBuffer = 2 };

template <typename Key>
__global__ void __launch_bounds__(kThreads)
digit_histogram_kernel(const Chunk* __restrict__ chunks,  // [nchunks]
                       int64_t nchunks,
                       SelectState* __restrict__ state,   // [1]
                       int hi, int bits,
                       u64* __restrict__ hist,            // [1 << bits], zeroed
                       int mode,
                       Key* __restrict__ cand,            // [cap]
                       u64 cap) {
  __shared__ unsigned int counts[kBins];  // [bucket]
  __shared__ Key stage[kStage];           // [kStage] candidates of the current chunk (kGather)
  __shared__ unsigned int nstage;         // candidates of the current chunk, may pass kStage
  __shared__ u64 base;                    // where the block's staged candidates go in cand
  const int nb = 1 << bits;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) counts[b] = 0;
  if (threadIdx.x == 0) nstage = 0;
  __syncthreads();
  const Key want = static_cast<Key>(state->prefix >> hi);
  const int shift = hi - bits;
  const Key dmask = static_cast<Key>(nb - 1);
  auto count = [&](Key key) {
    if ((key >> hi) == want) atomicAdd(counts + static_cast<int>((key >> shift) & dmask), 1u);
  };
  // kGather: a candidate goes to the block's stage; when the stage is full, straight to
  // cand (a global atomic), unless cand overflowed already. Count > cap marks overflow.
  auto gather = [&](Key key) {
    if ((key >> hi) != want) return;
    atomicAdd(counts + static_cast<int>((key >> shift) & dmask), 1u);
    const unsigned int slot = atomicAdd(&nstage, 1u);
    if (slot < static_cast<unsigned int>(kStage)) {
      stage[slot] = key;
    } else if (*reinterpret_cast<volatile u64*>(&state->ncand) <= cap) {
      const u64 g = atomicAdd(&state->ncand, 1ull);
      if (g < cap) cand[g] = key;
    }
  };
  if (mode == kBuffer) {
    const u64 n = *reinterpret_cast<volatile u64*>(&state->ncand);
    if (n <= cap) {  // the same in every block: ncand no longer changes
      const int64_t tiles = static_cast<int64_t>((n + kChunk - 1) / kChunk);
      for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {  // at most kChunk keys a block between flushes
        const int64_t e = static_cast<int64_t>(n) < (t + 1) * kChunk ? static_cast<int64_t>(n) : (t + 1) * kChunk;
        for (int64_t i = t * kChunk + threadIdx.x; i < e; i += blockDim.x) count(cand[i]);
        flush_counts(counts, nb, hist);
      }
      return;
    }
  }
  long long pending = 0;  // elements seen since the last flush: the 32-bit counts cannot overflow
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk ch = chunks[c];
    if (pending + ch.len > 0xFFFFFFFFll) {  // the same decision in every thread of the block
      flush_counts(counts, nb, hist);
      pending = 0;
    }
    pending += ch.len;
    if (mode != kGather) {
      visit_chunk<Key>(ch, count);
      continue;
    }
    visit_chunk<Key>(ch, gather);
    __syncthreads();  // the stage is complete
    const unsigned int m = nstage < static_cast<unsigned int>(kStage) ? nstage : static_cast<unsigned int>(kStage);
    if (threadIdx.x == 0) base = m > 0 ? atomicAdd(&state->ncand, static_cast<u64>(m)) : 0ull;
    __syncthreads();
    for (unsigned int i = threadIdx.x; i < m; i += blockDim.x)
      if (base + i < cap) cand[base + i] = stage[i];
    __syncthreads();  // the stage is free again
    if (threadIdx.x == 0) nstage = 0;
  }
  flush_counts(counts, nb, hist);
}

// Finds the bucket j holding rank `rank` among the candidates (the CPU's walk: the
// first j whose running count reaches rank) and narrows the state to it.
__global__ void __launch_bounds__(kScanThreads)
choose_bucket_kernel(const u64* __restrict__ hist,  // [nb], nb <= kBins
                     int nb, int shift,
                     SelectState* __restrict__ state) {  // [1]
  constexpr int kPer = kBins / kScanThreads;  // buckets per thread, contiguous
  const int b0 = static_cast<int>(threadIdx.x) * kPer;
  u64 h[kPer];
  u64 mine = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    h[j] = b0 + j < nb ? hist[b0 + j] : 0ull;
    mine += h[j];
  }
  const u64 rank = static_cast<u64>(state->rank);  // read by all before the one write below
  u64 total;
  const u64 before = block_exclusive_scan<u64>(mine, &total);
  if (before < rank && rank <= before + mine) {  // exactly one thread when 1 <= rank <= total
    u64 cum = before;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (rank <= cum + h[j]) {
        state->prefix |= static_cast<u64>(b0 + j) << shift;
        state->below += static_cast<long long>(cum);
        state->rank = static_cast<long long>(rank - cum);
        state->equal = static_cast<long long>(h[j]);
        break;
      }
      cum += h[j];
    }
  }
}

// The state before the first pass (a kernel, not a host copy, so that the select can be
// captured in a CUDA graph).
__global__ void init_state_kernel(SelectState* __restrict__ state, long long k) {
  if (threadIdx.x == 0 && blockIdx.x == 0) *state = SelectState{0ull, k, 0, 0, 0ull};
}

// threshold = the key's float (or double) value, as the CPU's key_value; counts = [below, equal].
template <typename Key>
__global__ void finish_kernel(const SelectState* __restrict__ state, double* __restrict__ threshold,
                              long long* __restrict__ counts) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  if constexpr (sizeof(Key) == 4) {
    const unsigned int u = static_cast<unsigned int>(state->prefix);
    float f;
    memcpy(&f, &u, 4);
    *threshold = f;
  } else {
    double d;
    memcpy(&d, &state->prefix, 8);
    *threshold = d;
  }
  counts[0] = state->below;
  counts[1] = state->equal;
}

// ---- prune ----------------------------------------------------------------------

// tie_rank[c] = number of keys == tkey in chunk c.
template <typename Key>
__global__ void __launch_bounds__(kThreads)
tie_count_kernel(const Chunk* __restrict__ chunks,  // [nchunks]
                 int64_t nchunks, Key tkey,
                 long long* __restrict__ tie_rank) {  // [nchunks + 1]
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk ch = chunks[c];
    unsigned int n = 0;
    auto count = [&](Key key) { n += key == tkey; };
    visit_chunk<Key>(ch, count);
    unsigned int total;
    block_exclusive_scan<unsigned int>(n, &total);
    if (threadIdx.x == 0) tie_rank[c] = total;
  }
}

// v[0..n) counts -> v[0..n] exclusive prefix sums (v[n]: the total), in place, one block.
__global__ void __launch_bounds__(kScanThreads)
exclusive_scan_kernel(long long* __restrict__ v,  // [n + 1]
                      int64_t n) {
  const int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const int64_t b = per * threadIdx.x, e = b + per < n ? b + per : n;
  long long s = 0;
  for (int64_t i = b; i < e; ++i) s += v[i];
  long long total;
  long long run = block_exclusive_scan<long long>(s, &total);
  for (int64_t i = b; i < e; ++i) {
    const long long c = v[i];
    v[i] = run;
    run += c;
  }
  if (threadIdx.x == 0) v[n] = total;
}

// The chunk where the tie cut falls: its ties in element order, the first `left` zeroed.
template <typename Key, int D>
__device__ __forceinline__ void zero_ordered_typed(const Chunk& ch, Key tkey, long long left) {
  using R = typename Raw<D>::type;
  R* p = static_cast<R*>(ch.data);
  unsigned int seen = 0;  // ties of this chunk before the current tile
  for (int t0 = 0; t0 < ch.len; t0 += blockDim.x) {  // the same trip count in every thread
    const int i = t0 + static_cast<int>(threadIdx.x);
    const bool in = i < ch.len;
    const Key key = in ? key_of<Key, D>(p[i]) : Key(0);
    const bool tie = in && key == tkey;
    unsigned int tile_ties;
    const unsigned int rank = seen + block_exclusive_scan<unsigned int>(tie ? 1u : 0u, &tile_ties);
    if (in && (key < tkey || (tie && rank < left))) p[i] = 0;
    seen += tile_ties;
  }
}

template <typename Key>
__device__ __forceinline__ void zero_ordered(const Chunk& ch, Key tkey, long long left) {
  switch (ch.dtype) {
    case kFloat32: zero_ordered_typed<Key, kFloat32>(ch, tkey, left); break;
    case kFloat16: zero_ordered_typed<Key, kFloat16>(ch, tkey, left); break;
    case kBFloat16: zero_ordered_typed<Key, kBFloat16>(ch, tkey, left); break;
    default:
      if constexpr (sizeof(Key) == 8) zero_ordered_typed<Key, kFloat64>(ch, tkey, left);
      break;
  }
}

// Zeroes keys < tkey and the first `ties` keys == tkey (list order). tie_rank: null when
// every tie goes; else the rank of each chunk's first tie ([nchunks + 1], scanned).
template <typename Key>
__global__ void __launch_bounds__(kThreads)
prune_kernel(const Chunk* __restrict__ chunks,          // [nchunks]
             int64_t nchunks, Key tkey, long long ties,
             const long long* __restrict__ tie_rank) {  // [nchunks + 1] or null
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk ch = chunks[c];
    bool all_ties = true;
    if (tie_rank != nullptr) {
      const long long first = tie_rank[c], next = tie_rank[c + 1];
      if (first < ties && ties < next) {  // the cut falls inside this chunk
        zero_ordered<Key>(ch, tkey, ties - first);
        continue;
      }
      all_ties = next <= ties;  // else none of its ties goes
    }
    auto zero = [&](Key key) { return key < tkey || (all_ties && key == tkey); };
    zero_chunk<Key>(ch, zero);
  }
}

// ---- host -----------------------------------------------------------------------

// Stream-ordered scratch, given back in stream order even when a launch throws.
class Scratch {
 public:
  Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
    NNMARK_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  }
  ~Scratch() { cudaFreeAsync(ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* get() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// Checks the list as the CPU op does (plus element alignment, which the GPU needs);
// returns the element count.
int64_t check_list(const MagnitudeList& list) {
  NNMARK_CHECK_ARG(list.L >= 1, "the list of tensors is empty");
  int64_t total = 0;
  for (int64_t t = 0; t < list.L; ++t) {
    check_dtype(list.dtypes[t], "tensor");
    NNMARK_CHECK_ARG(list.sizes[t] >= 0, "tensor ", t, " has negative size ", list.sizes[t]);
    NNMARK_CHECK_ARG(list.sizes[t] == 0 || list.data[t] != nullptr, "tensor ", t, " has a null data pointer");
    NNMARK_CHECK_ARG(reinterpret_cast<uintptr_t>(list.data[t]) % dtype_size(list.dtypes[t]) == 0, "tensor ", t,
                     " data address ", list.data[t], " is not aligned to its element size ",
                     dtype_size(list.dtypes[t]));
    total += list.sizes[t];
  }
  return total;
}

bool needs_64bit(const MagnitudeList& list) {
  for (int64_t t = 0; t < list.L; ++t)
    if (list.dtypes[t] == kFloat64) return true;
  return false;
}

std::vector<Chunk> make_chunks(const MagnitudeList& list, int64_t total) {
  std::vector<Chunk> chunks;
  chunks.reserve(static_cast<size_t>(total / kChunk + list.L));
  for (int64_t t = 0; t < list.L; ++t) {
    char* base = static_cast<char*>(const_cast<void*>(list.data[t]));
    const int64_t es = dtype_size(list.dtypes[t]);
    for (int64_t s = 0; s < list.sizes[t]; s += kChunk)
      chunks.push_back({base + s * es, static_cast<int>(std::min(kChunk, list.sizes[t] - s)), list.dtypes[t]});
  }
  return chunks;
}

// Blocks for a chunk kernel: as many as the GPU holds at once, at most one per chunk.
template <typename K>
unsigned grid_for(K kernel, int64_t nchunks) {
  int per_sm = 0;
  NNMARK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t slots = static_cast<int64_t>(sm_count()) * std::max(1, per_sm);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(slots, nchunks)));
}

constexpr size_t kHead = 256;  // room for the SelectState at the front of the scratch

template <typename Key>
constexpr int key_passes() {
  return ((sizeof(Key) == 4 ? 31 : 63) + kDigitBits - 1) / kDigitBits;  // the sign bit is always clear
}

// The radix passes, on device memory only: state (at the front of the scratch) is
// initialised by a kernel, so nothing here needs the host once launched.
// Capacity of the candidate buffer, in keys: about total/16, at least a chunk.
inline int64_t cand_cap(int64_t total) { return std::max<int64_t>(kChunk, total / 16); }

template <typename Key>
void run_passes(const Chunk* table, int64_t n, int64_t k, SelectState* state, u64* hist, Key* cand, u64 cap,
                cudaStream_t stream) {
  constexpr int kKeyBits = sizeof(Key) == 4 ? 31 : 63;
  NNMARK_CUDA_CHECK(cudaMemsetAsync(hist, 0, sizeof(u64) * kBins * key_passes<Key>(), stream));
  NNMARK_LAUNCH(1, 32, 0, stream, init_state_kernel)(state, static_cast<long long>(k));
  NNMARK_CUDA_CHECK(cudaGetLastError());
  const unsigned grid = grid_for(digit_histogram_kernel<Key>, n);
  int pass = 0;
  for (int hi = kKeyBits; hi > 0; hi -= kDigitBits, ++pass) {
    const int bits = std::min(kDigitBits, hi);
    u64* h = hist + static_cast<size_t>(pass) * kBins;
    const int mode = pass == 0 ? kWalk : pass == 1 ? kGather : kBuffer;
    NNMARK_LAUNCH(grid, kThreads, 0, stream, digit_histogram_kernel<Key>)(table, n, state, hi, bits, h, mode, cand,
                                                                          cap);
    NNMARK_CUDA_CHECK(cudaGetLastError());
    NNMARK_LAUNCH(1, kScanThreads, 0, stream, choose_bucket_kernel)(h, 1 << bits, hi - bits, state);
    NNMARK_CUDA_CHECK(cudaGetLastError());
  }
}

// Scratch layout: [state (kHead bytes) | histograms, one per pass | candidate buffer].
template <typename Key>
size_t cand_offset() {
  return kHead + sizeof(u64) * kBins * key_passes<Key>();
}

template <typename Key>
size_t select_scratch_bytes(int64_t total) {
  return cand_offset<Key>() + sizeof(Key) * static_cast<size_t>(cand_cap(total));
}

template <typename Key>
MagnitudeSelection select(const MagnitudeList& list, int64_t total, int64_t k, cudaStream_t stream) {
  const std::vector<Chunk> chunks = make_chunks(list, total);
  const int64_t n = static_cast<int64_t>(chunks.size());
  // Scratch: [state and histograms | chunk table].
  const size_t table_off = (select_scratch_bytes<Key>(total) + 255) / 256 * 256;
  const size_t table_bytes = chunks.size() * sizeof(Chunk);
  keep_pool_memory();
  Scratch scratch(table_off + table_bytes, stream);
  SelectState* state = reinterpret_cast<SelectState*>(scratch.get());
  u64* hist = reinterpret_cast<u64*>(scratch.get() + kHead);
  const Chunk* table = reinterpret_cast<const Chunk*>(scratch.get() + table_off);
  NNMARK_CUDA_CHECK(cudaMemcpyAsync(scratch.get() + table_off, chunks.data(), table_bytes, cudaMemcpyHostToDevice,
                                    stream));
  Key* cand = reinterpret_cast<Key*>(scratch.get() + cand_offset<Key>());
  run_passes<Key>(table, n, k, state, hist, cand, static_cast<u64>(cand_cap(total)), stream);
  SelectState out{};
  NNMARK_CUDA_CHECK(cudaMemcpyAsync(&out, state, sizeof out, cudaMemcpyDeviceToHost, stream));
  NNMARK_CUDA_CHECK(cudaStreamSynchronize(stream));
  NNMARK_CHECK_RT(out.below < k && k <= out.below + out.equal, "the select lost rank k=", k, " (below=", out.below,
                  ", equal=", out.equal, "): were the weights written to while it ran?");
  double threshold;  // the CPU's key_value: the key's float (or double) value
  if constexpr (sizeof(Key) == 4) {
    const uint32_t u = static_cast<uint32_t>(out.prefix);
    float f;
    std::memcpy(&f, &u, 4);
    threshold = f;
  } else {
    std::memcpy(&threshold, &out.prefix, 8);
  }
  return MagnitudeSelection{threshold, out.below, out.equal};
}

template <typename Key>
void prune(const MagnitudeList& list, int64_t total, int64_t k, const MagnitudeSelection& sel,
           cudaStream_t stream) {
  const int64_t ties = k - sel.below;  // ties to zero, in list order (>= 1)
  Key tkey;                            // the CPU's conversion of the threshold back to a key
  if constexpr (sizeof(Key) == 4) {
    const float f = static_cast<float>(sel.threshold);
    std::memcpy(&tkey, &f, 4);
  } else {
    std::memcpy(&tkey, &sel.threshold, 8);
  }
  // Ties at |w| == 0 are zero already: zeroing all of them changes no value (only -0.0
  // becomes +0.0, as the CPU float32 path does) and saves the ordered pass.
  const bool partial = ties < sel.equal && tkey != 0;
  const std::vector<Chunk> chunks = make_chunks(list, total);
  const int64_t n = static_cast<int64_t>(chunks.size());
  const size_t table_bytes = chunks.size() * sizeof(Chunk);
  const size_t rank_off = (table_bytes + 255) / 256 * 256;
  keep_pool_memory();
  Scratch scratch(rank_off + (partial ? sizeof(long long) * static_cast<size_t>(n + 1) : 0), stream);
  const Chunk* table = reinterpret_cast<const Chunk*>(scratch.get());
  long long* tie_rank = partial ? reinterpret_cast<long long*>(scratch.get() + rank_off) : nullptr;
  NNMARK_CUDA_CHECK(cudaMemcpyAsync(scratch.get(), chunks.data(), table_bytes, cudaMemcpyHostToDevice, stream));
  if (partial) {
    NNMARK_LAUNCH(grid_for(tie_count_kernel<Key>, n), kThreads, 0, stream, tie_count_kernel<Key>)(table, n, tkey, tie_rank);
    NNMARK_CUDA_CHECK(cudaGetLastError());
    NNMARK_LAUNCH(1, kScanThreads, 0, stream, exclusive_scan_kernel)(tie_rank, n);
    NNMARK_CUDA_CHECK(cudaGetLastError());
  }
  NNMARK_LAUNCH(grid_for(prune_kernel<Key>, n), kThreads, 0, stream, prune_kernel<Key>)(table, n, tkey, ties, tie_rank);
  NNMARK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

MagnitudeSelection magnitude_select_cuda(const MagnitudeList& list, int64_t k, uintptr_t stream_handle) {
  const int64_t total = check_list(list);
  NNMARK_CHECK_ARG(k >= 1 && k <= total, "k must be in [1, ", total, "], got ", k);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return needs_64bit(list) ? select<u64>(list, total, k, stream) : select<unsigned int>(list, total, k, stream);
}

MagnitudeSelectPlan magnitude_select_plan_cuda(const MagnitudeList& list) {
  const int64_t total = check_list(list);
  const std::vector<Chunk> chunks = make_chunks(list, total);
  MagnitudeSelectPlan plan;
  plan.table.resize(chunks.size() * sizeof(Chunk));
  std::memcpy(plan.table.data(), chunks.data(), plan.table.size());
  plan.nchunks = static_cast<int64_t>(chunks.size());
  plan.total = total;
  plan.key64 = needs_64bit(list);
  plan.scratch_bytes = static_cast<int64_t>(plan.key64 ? select_scratch_bytes<u64>(total)
                                                      : select_scratch_bytes<unsigned int>(total));
  return plan;
}

void magnitude_select_device_cuda(const void* table, int64_t nchunks, bool key64, int64_t total, int64_t k,
                                  void* scratch, int64_t scratch_bytes, double* threshold, int64_t* counts,
                                  uintptr_t stream_handle) {
  NNMARK_CHECK_ARG(nchunks >= 1 && table != nullptr, "the chunk table is empty");
  NNMARK_CHECK_ARG(k >= 1 && k <= total, "k must be in [1, ", total, "], got ", k);
  const int64_t need = static_cast<int64_t>(key64 ? select_scratch_bytes<u64>(total)
                                                  : select_scratch_bytes<unsigned int>(total));
  NNMARK_CHECK_ARG(scratch != nullptr && scratch_bytes >= need, "scratch of ", scratch_bytes, " bytes; the select needs ",
                   need);
  NNMARK_CHECK_ARG(reinterpret_cast<uintptr_t>(scratch) % 16 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0,
                   "scratch and table must be 16-byte aligned");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  SelectState* state = reinterpret_cast<SelectState*>(scratch);
  u64* hist = reinterpret_cast<u64*>(static_cast<char*>(scratch) + kHead);
  const Chunk* t = static_cast<const Chunk*>(table);
  char* cand = static_cast<char*>(scratch) + (key64 ? cand_offset<u64>() : cand_offset<unsigned int>());
  const u64 cap = static_cast<u64>(cand_cap(total));
  if (key64) {
    run_passes<u64>(t, nchunks, k, state, hist, reinterpret_cast<u64*>(cand), cap, stream);
    NNMARK_LAUNCH(1, 32, 0, stream, finish_kernel<u64>)(state, threshold, reinterpret_cast<long long*>(counts));
  } else {
    run_passes<unsigned int>(t, nchunks, k, state, hist, reinterpret_cast<unsigned int*>(cand), cap, stream);
    NNMARK_LAUNCH(1, 32, 0, stream, finish_kernel<unsigned int>)(state, threshold, reinterpret_cast<long long*>(counts));
  }
  NNMARK_CUDA_CHECK(cudaGetLastError());
}

void magnitude_prune_cuda(const MagnitudeList& list, int64_t k, const MagnitudeSelection& sel,
                          uintptr_t stream_handle) {
  const int64_t total = check_list(list);
  NNMARK_CHECK_ARG(k >= 0 && k <= total, "k must be in [0, ", total, "], got ", k);
  if (k == 0) return;
  NNMARK_CHECK_ARG(sel.below < k && k <= sel.below + sel.equal, "selection does not hold rank k=", k,
                   " (below=", sel.below, ", equal=", sel.equal, ")");
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (needs_64bit(list)) prune<u64>(list, total, k, sel, stream);
  else prune<unsigned int>(list, total, k, sel, stream);
}

}  // namespace nnmark
