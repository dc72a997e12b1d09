#include "cpu/sha256.h"

#include <cstring>
#include <type_traits>

#include "cpu/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#define NNMARK_X86 1
#endif

namespace nnmark {
namespace {

const uint32_t kIv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                         0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

alignas(16) const uint32_t kK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

inline uint32_t load_be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

void blocks_generic(uint32_t h[8], const uint8_t* p, size_t nblocks) {
  for (; nblocks; --nblocks, p += 64) {
    uint32_t w[64];
    for (int t = 0; t < 16; ++t) w[t] = load_be32(p + 4 * t);
    for (int t = 16; t < 64; ++t) {
      const uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      const uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int t = 0; t < 64; ++t) {
      const uint32_t t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + kK[t] + w[t];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
  }
}

#if NNMARK_X86
// The SHA extensions keep the state as two registers, ABEF and CDGH; each sha256rnds2
// does two rounds, sha256msg1/msg2 extend the message schedule four words at a time.
//
// L messages of the same length at once: each sha256rnds2 waits for the one before it
// in its own message, so with one message the SHA unit idles between them; L independent
// chains interleaved keep it busier. Measured on a 147 kB carrier (Xeon, SHA extensions):
// 82 us one at a time, 67 us at L = 2, 63 us at L = 4, 66 us at L = 5 or 6.
template <int L>
__attribute__((target("sha,sse4.1,ssse3"))) void blocks_shani_many(uint32_t* const h[L], const uint8_t* const src[L],
                                                                    size_t nblocks) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  __m128i abef[L], cdgh[L];
  const uint8_t* p[L];
  for (int l = 0; l < L; ++l) {
    const __m128i dcba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h[l]));
    const __m128i hgfe = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h[l] + 4));
    const __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
    const __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    abef[l] = _mm_alignr_epi8(cdab, efgh, 8);
    cdgh[l] = _mm_blend_epi16(efgh, cdab, 0xF0);
    p[l] = src[l];
  }
  for (; nblocks; --nblocks) {
    __m128i abef0[L], cdgh0[L], w[L][4];
    for (int l = 0; l < L; ++l) abef0[l] = abef[l], cdgh0[l] = cdgh[l];
    for (int i = 0; i < 16; ++i) {  // four rounds of every message each
      const __m128i k = _mm_load_si128(reinterpret_cast<const __m128i*>(kK + 4 * i));
      for (int l = 0; l < L; ++l) {
        if (i < 4) {
          w[l][i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[l] + 16 * i)), bswap);
        } else {
          const __m128i prev = w[l][(i + 3) % 4];
          __m128i x = _mm_sha256msg1_epu32(w[l][i % 4], w[l][(i + 1) % 4]);
          x = _mm_add_epi32(x, _mm_alignr_epi8(prev, w[l][(i + 2) % 4], 4));
          w[l][i % 4] = _mm_sha256msg2_epu32(x, prev);
        }
        __m128i m = _mm_add_epi32(w[l][i % 4], k);
        cdgh[l] = _mm_sha256rnds2_epu32(cdgh[l], abef[l], m);
        m = _mm_shuffle_epi32(m, 0x0E);
        abef[l] = _mm_sha256rnds2_epu32(abef[l], cdgh[l], m);
      }
    }
    for (int l = 0; l < L; ++l) {
      abef[l] = _mm_add_epi32(abef[l], abef0[l]);
      cdgh[l] = _mm_add_epi32(cdgh[l], cdgh0[l]);
      p[l] += 64;
    }
  }
  for (int l = 0; l < L; ++l) {
    const __m128i feba = _mm_shuffle_epi32(abef[l], 0x1B);
    const __m128i dchg = _mm_shuffle_epi32(cdgh[l], 0xB1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h[l]), _mm_blend_epi16(feba, dchg, 0xF0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h[l] + 4), _mm_alignr_epi8(dchg, feba, 8));
  }
}

bool cpu_has_sha() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  __builtin_cpu_init();
  return (b & (1u << 29)) && __builtin_cpu_supports("sse4.1") && __builtin_cpu_supports("ssse3");
}
const bool kHasSha = cpu_has_sha();
#endif

void blocks(uint32_t h[8], const uint8_t* p, size_t nblocks) {
#if NNMARK_X86
  if (kHasSha && active_isa() != Isa::kGeneric) {
    uint32_t* const hs[1] = {h};
    const uint8_t* const ps[1] = {p};
    return blocks_shani_many<1>(hs, ps, nblocks);
  }
#endif
  blocks_generic(h, p, nblocks);
}

void digest_out(const uint32_t h[8], uint8_t out[32]) {
  for (int i = 0; i < 8; ++i) {
    out[4 * i] = uint8_t(h[i] >> 24), out[4 * i + 1] = uint8_t(h[i] >> 16);
    out[4 * i + 2] = uint8_t(h[i] >> 8), out[4 * i + 3] = uint8_t(h[i]);
  }
}

// Hashes msg after `before` bytes already absorbed into h, pads, and writes the digest.
void finish(uint32_t h[8], uint64_t before, const uint8_t* msg, size_t n, uint8_t out[32]) {
  const size_t full = n / 64;
  blocks(h, msg, full);
  uint8_t tail[128] = {0};
  const size_t rest = n - 64 * full;
  std::memcpy(tail, msg + 64 * full, rest);
  tail[rest] = 0x80;
  const size_t len = rest + 9 <= 64 ? 64 : 128;
  const uint64_t bits = (before + n) * 8;
  for (int i = 0; i < 8; ++i) tail[len - 1 - i] = uint8_t(bits >> (8 * i));
  blocks(h, tail, len / 64);
  digest_out(h, out);
}

}  // namespace

constexpr int kLanes = 4;  // messages hashed side by side (see blocks_shani_many)

void sha256_same_length(const uint8_t* const* msgs, size_t count, size_t n, uint8_t* out /* [count, 32] */) {
  size_t i = 0;
#if NNMARK_X86
  if (kHasSha && active_isa() != Isa::kGeneric && n >= 64) {
    const size_t full = n / 64;
    auto group = [&](auto lanes) {
      constexpr int L = decltype(lanes)::value;
      uint32_t h[L][8];
      uint32_t* hs[L];
      for (int l = 0; l < L; ++l) std::memcpy(h[l], kIv, sizeof h[l]), hs[l] = h[l];
      blocks_shani_many<L>(hs, msgs + i, full);
      for (int l = 0; l < L; ++l) finish(h[l], 64 * full, msgs[i + l] + 64 * full, n - 64 * full, out + 32 * (i + l));
      i += L;
    };
    while (count - i >= kLanes) group(std::integral_constant<int, kLanes>{});
    while (count - i >= 2) group(std::integral_constant<int, 2>{});
  }
#endif
  for (; i < count; ++i) sha256(msgs[i], n, out + 32 * i);
}

bool sha256_native() {
#if NNMARK_X86
  return kHasSha && active_isa() != Isa::kGeneric;
#else
  return false;
#endif
}

void sha256(const uint8_t* msg, size_t n, uint8_t out[32]) {
  uint32_t h[8];
  std::memcpy(h, kIv, sizeof h);
  finish(h, 0, msg, n, out);
}

HmacSha256::HmacSha256(const uint8_t* key, size_t n) {
  uint8_t k[64] = {0}, pad[64];
  if (n > 64) {
    sha256(key, n, k);
  } else if (n) {
    std::memcpy(k, key, n);
  }
  std::memcpy(inner_, kIv, sizeof inner_);
  std::memcpy(outer_, kIv, sizeof outer_);
  for (int i = 0; i < 64; ++i) pad[i] = k[i] ^ 0x36;
  blocks(inner_, pad, 1);
  for (int i = 0; i < 64; ++i) pad[i] = k[i] ^ 0x5c;
  blocks(outer_, pad, 1);
}

void HmacSha256::mac(const uint8_t* msg, size_t n, uint8_t out[32]) const {
  uint32_t h[8];
  uint8_t inner[32];
  std::memcpy(h, inner_, sizeof h);
  finish(h, 64, msg, n, inner);
  std::memcpy(h, outer_, sizeof h);
  finish(h, 64, inner, 32, out);
}

}  // namespace nnmark
