// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), for the ledger's row MACs
// (python/nnmark/ledger.py) and the carrier hashes of a scan batch. The x86 SHA extensions are used when the CPU has them
// and the generic ISA is not forced (set_isa("generic") tests the portable path).
#pragma once
#include <cstddef>
#include <cstdint>

namespace nnmark {

void sha256(const uint8_t* msg, size_t n, uint8_t out[32]);
// `count` messages of the same length n, hashed side by side (faster than one after the other).
void sha256_same_length(const uint8_t* const* msgs, size_t count, size_t n, uint8_t* out /* [count, 32] */);

// HMAC-SHA256 under one key, its padded key blocks hashed once.
class HmacSha256 {
 public:
  HmacSha256(const uint8_t* key, size_t n);
  void mac(const uint8_t* msg, size_t n, uint8_t out[32]) const;

 private:
  uint32_t inner_[8], outer_[8];
};

bool sha256_native();  // whether the SHA extensions are in use now

}  // namespace nnmark
