// D2R routing on the CPU: every gate's sources, their flat logit positions, ResRouting's
// endorsement and the k-hot route, from the flat router logits, in one pass per sample.
//
// Computes what routing.py's plain path does on the padded [N, N] logits (select_sources,
// slot_endorsement, route_mask; checked against it in tests/test_routing_slots.py), without
// building the padded tensor. Gate g's candidates are modules 0..g, at flat positions
// g(g+1)/2 + j of a row of logits [R, N(N+1)/2]. Per gate:
//   scores: the logits (TOPK), logits / temperature + Gumbel noise (SAMPLE), or the stored
//     route as 0/1 (rows of `behaviour` with any entry set; the other rows sample);
//   sources: the k highest-scoring candidates in ascending order (among equal scores the
//     lower module; NaN ranks first, as in torch.topk); a gate with fewer than k candidates
//     takes all of them and repeats its last one in the padding slots;
//   endorsed: softmax(logits over the candidates)[source] > 1 / (g + 2), false on padding.
#include "native.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace d2r {
namespace {

// An unsigned integer ordered as the float: -inf < ... < -0 < +0 < ... < +inf < NaN.
inline uint32_t order_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if (value != value) return 0xffffffffu;
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// The `taken` highest of scores[0..candidates) into best[0..taken), in ascending column order;
// among equal scores the lower column ranks higher, and NaN ranks above every number.
inline void select_best(const float* scores, int64_t candidates, int64_t taken, uint64_t* keys, int64_t* best) {
  // one integer key per column, ordered as (score, -column), pushed through a sorted list of
  // the best `taken` keys with min/max only (no data-dependent branch; k = 2 in registers)
  const auto key_of = [&](int64_t j) {
    return (uint64_t(order_key(scores[j])) << 32) | uint64_t(0xffffffffu - uint32_t(j));
  };
  if (taken == 2) {
    uint64_t first = 0, second = 0;
    for (int64_t j = 0; j < candidates; ++j) {
      const uint64_t key = key_of(j);
      second = std::max(second, std::min(first, key));
      first = std::max(first, key);
    }
    keys[0] = first;
    keys[1] = second;
  } else {
    std::fill(keys, keys + taken, uint64_t(0));
    for (int64_t j = 0; j < candidates; ++j) {
      uint64_t key = key_of(j);
      for (int64_t t = 0; t < taken; ++t) {
        const uint64_t higher = std::max(keys[t], key);
        key = std::min(keys[t], key);
        keys[t] = higher;
      }
    }
  }
  for (int64_t t = 0; t < taken; ++t) best[t] = int64_t(0xffffffffu - uint32_t(keys[t] & 0xffffffffu));
  std::sort(best, best + taken);
}

inline void select_best(const double* scores, int64_t candidates, int64_t taken, uint64_t*, int64_t* best) {
  // one pass keeping the best `taken` so far in rank order; a tie stays behind the lower column
  const auto ranks_above = [](double a, double b) { return a > b || (a != a && b == b); };
  int64_t kept = 0;
  for (int64_t j = 0; j < candidates; ++j) {
    int64_t place = kept;
    while (place > 0 && ranks_above(scores[j], scores[best[place - 1]])) --place;
    if (place == taken) continue;
    kept = std::min(kept + 1, taken);
    for (int64_t i = kept - 1; i > place; --i) best[i] = best[i - 1];
    best[place] = j;
  }
  std::sort(best, best + taken);
}

void check_rows(const std::optional<at::Tensor>& t, const at::Tensor& logits, int64_t width, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 2 && t->size(0) == logits.size(0) &&
                  t->size(1) == width,
              "route_slots: ", what, " must be a contiguous CPU tensor [", logits.size(0), ", ", width, "], got ",
              t->sizes());
}

}  // namespace

std::vector<at::Tensor> route_slots(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                                    const std::optional<at::Tensor>& gumbel, const std::optional<at::Tensor>& behaviour,
                                    int64_t modules, int64_t k, bool endorse) {
  const int64_t num_logits = modules * (modules + 1) / 2;
  TORCH_CHECK(logits.device().is_cpu() && logits.is_contiguous() && logits.dim() == 2 && logits.size(1) == num_logits,
              "route_slots: expected contiguous CPU logits [R, ", num_logits, "] for ", modules, " modules, got ",
              logits.sizes());
  TORCH_CHECK(k >= 1 && k <= modules, "route_slots: k must be in [1, ", modules, "], got ", k);
  TORCH_CHECK(gumbel.has_value() == temperature.has_value(), "route_slots: sampling needs both temperature and noise");
  check_rows(gumbel, logits, num_logits, "gumbel");
  check_rows(behaviour, logits, num_logits, "behaviour");
  if (temperature.has_value()) {
    TORCH_CHECK(temperature->is_contiguous() && temperature->dim() == 1 && temperature->size(0) == logits.size(0) &&
                    temperature->scalar_type() == logits.scalar_type(),
                "route_slots: temperature must be contiguous [", logits.size(0), "] of the logits' dtype, got ",
                temperature->sizes());
  }
  if (behaviour.has_value()) {
    TORCH_CHECK(behaviour->scalar_type() == at::kBool, "route_slots: behaviour must be bool");
    TORCH_CHECK(gumbel.has_value(), "route_slots: rows without a stored route sample, so behaviour needs noise");
  }
  const int64_t rows = logits.size(0);
  auto long_options = logits.options().dtype(at::kLong);
  auto sources = at::empty({rows, modules, k}, long_options);
  auto positions = at::empty({rows, modules, k}, long_options);
  auto endorsed = endorse ? at::empty({rows, modules, k}, logits.options().dtype(at::kBool)) : at::Tensor();
  auto route = at::zeros({rows, num_logits}, logits.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "d2r_route_slots", [&] {
    const scalar_t* z_all = logits.data_ptr<scalar_t>();
    const scalar_t* t_all = temperature.has_value() ? temperature->data_ptr<scalar_t>() : nullptr;
    const scalar_t* noise_all = gumbel.has_value() ? gumbel->data_ptr<scalar_t>() : nullptr;
    const bool* stored_all = behaviour.has_value() ? behaviour->data_ptr<bool>() : nullptr;
    int64_t* src = sources.data_ptr<int64_t>();
    int64_t* pos = positions.data_ptr<int64_t>();
    bool* end = endorse ? endorsed.data_ptr<bool>() : nullptr;
    bool* hot = route.data_ptr<bool>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end_row) {
      std::vector<scalar_t> score(num_logits), shifted_exp(modules);
      std::vector<int64_t> best(k);
      std::vector<uint64_t> keys(k);
      for (int64_t r = begin; r < end_row; ++r) {
        const scalar_t* z = z_all + r * num_logits;
        const bool* stored = stored_all == nullptr ? nullptr : stored_all + r * num_logits;
        const bool replay = stored != nullptr && std::any_of(stored, stored + num_logits, [](bool b) { return b; });
        for (int64_t i = 0; i < num_logits; ++i) {
          if (replay) {
            score[i] = stored[i] ? scalar_t(1) : scalar_t(0);
          } else if (noise_all != nullptr) {
            score[i] = noise_all[r * num_logits + i] + z[i] / t_all[r];
          } else {
            score[i] = z[i];
          }
        }
        for (int64_t g = 0; g < modules; ++g) {
          const int64_t offset = g * (g + 1) / 2, candidates = g + 1, taken = std::min(k, candidates);
          select_best(score.data() + offset, candidates, taken, keys.data(), best.data());
          scalar_t total = 0;
          if (endorse) {  // softmax of the gate's logits: exp(z - max) and its sum
            const scalar_t max_z = *std::max_element(z + offset, z + offset + candidates);
            for (int64_t j = 0; j < candidates; ++j) total += shifted_exp[j] = std::exp(z[offset + j] - max_z);
          }
          const scalar_t threshold = static_cast<scalar_t>(1.0f / static_cast<float>(candidates + 1));
          const int64_t at = (r * modules + g) * k;
          for (int64_t t = 0; t < k; ++t) {
            const bool valid = t < taken;
            const int64_t j = valid ? best[t] : g;
            src[at + t] = j;
            pos[at + t] = offset + j;
            if (endorse) end[at + t] = valid && shifted_exp[j] / total > threshold;
            if (valid) hot[r * num_logits + offset + j] = true;
          }
        }
      }
    });
  });
  return {sources, positions, endorsed, route};
}

}  // namespace d2r
