// The D2R module chain (modules 2..N and the output gate of an ensemble of E networks) as
// one native pass per direction on the CPU, blocked over samples.
//
// Computes exactly what ModuleChain in module_chain.py documents: the specification
// d2r_spec.module_chain (METHOD.md section 2, ResRouting's gradient paths included) on the
// chain's slot layout; tests/test_native_chain.py holds it to the specification
// (test_chain_paths_match_the_specification) and to ModuleChain's PyTorch path. Every sample's route only reads the same sample's module
// outputs, so a block of `block` samples of one member runs the whole chain on its own:
// its module outputs (N x block x d) and, backwards, its two gradient buffers stay in
// cache, and blocks run in parallel (at::parallel_for). Linear maps are matrix products on a
// block's rows; everything between them (source reads, bias, ReLU, residual, masks,
// weighted scatters of gradients) is one loop over the block.
//
// Only the modules a sample's route reaches are computed: those the output gate reads, and
// recursively those a reached module reads (mark_reached). A module outside that set cannot
// change the output, so its value and gradient are not needed; the products run on the
// compacted rows of the samples that reach the module. Table rows and ReLU masks of modules a
// sample does not reach are left unset and never read, and their gates' mixing-weight
// gradients are zero.
//
// Layouts (S = E * B samples, k slots per gate, all contiguous):
//   first [E, B, d]; index [N, E, B, k] int64; weight, endorsed [N, E, B, k];
//   matrices [E, N - 1, d, d], biases [E, N - 1, d]: modules g + 2 = 2..N of member e at [e, g];
//   table [N, E, B, d] (module outputs), active [N - 1, E, B, d] bool (ReLU masks).
#include "native.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

extern "C" {  // the Fortran BLAS that libtorch_cpu exports (MKL on x86)
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace d2r {
namespace {

// BLAS: row-major c[m, n] = op(a) op(b) + beta c, where op(a) is [m, k] (a stored [k, m] if trans_a)
// and op(b) is [k, n] (b stored [n, k] if trans_b); all rows packed. In BLAS's column-major
// terms that is c^T = op(b)^T op(a)^T.
template <typename scalar_t>
void blas_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, const scalar_t* b,
               scalar_t beta, scalar_t* c) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mm = n, nn = m, kk = k, lda = trans_b ? k : n, ldb = trans_a ? m : k, ldc = n;
  const scalar_t one = 1;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&ta, &tb, &mm, &nn, &kk, &one, b, &lda, a, &ldb, &beta, c, &ldc);
  } else {
    dgemm_(&ta, &tb, &mm, &nn, &kk, &one, b, &lda, a, &ldb, &beta, c, &ldc);
  }
}

// Row-major c[m, n] = a[m, k] b[k, n] (+ c when accumulate), all rows packed. Float runs
// oneDNN's batch-reduce GEMM kernel (cpublas::brgemm, which falls back to BLAS where oneDNN has
// no kernel): on the chain's block shapes it is about a third faster than MKL's on the
// benchmark machine (benchmarks/RESULTS.md). Double, and a PyTorch without that kernel, run BLAS.
template <typename scalar_t>
void gemm(int64_t m, int64_t n, int64_t k, const scalar_t* a, const scalar_t* b, bool accumulate, scalar_t* c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::native::cpublas::brgemm(m, n, k, k, n, n, accumulate, a, b, c);
    return;
  }
#endif
  blas_gemm(false, false, m, n, k, a, b, scalar_t(accumulate ? 1 : 0), c);
}

struct Shape {
  int64_t modules, members, batch, width, slots;
  // row of (module j, member e, sample b) in a [N, E, B, d] buffer, in units of d
  int64_t row(int64_t j, int64_t e, int64_t b) const { return (j * members + e) * batch + b; }
  // position of (gate g, member e, sample b)'s first slot in a [N, E, B, k] tensor
  int64_t slot(int64_t g, int64_t e, int64_t b) const { return ((g * members + e) * batch + b) * slots; }
  // (member e, module g + 2) in [E, N - 1, ...] parameter tensors, in units of one module's parameter
  int64_t module(int64_t e, int64_t g) const { return e * (modules - 1) + g; }
};

// Task `task` of a pass's parallel loop over members x blocks: (member, first sample, samples).
// Block-major, so that each thread's contiguous share holds blocks of every member: members
// (the twin critics) route differently, so their blocks cost differently.
std::tuple<int64_t, int64_t, int64_t> block_task(const Shape& s, int64_t task, int64_t block) {
  const int64_t e = task % s.members, b0 = (task / s.members) * block;
  return {e, b0, std::min(block, s.batch - b0)};
}

// Every gate g reads modules already computed, 0..g: checked once per forward, before any read
// (the backward reuses the forward's index).
void check_sources(const at::Tensor& index) {
  const int64_t gates = index.size(0), per_gate = index.numel() / std::max<int64_t>(gates, 1);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t g = 0; g < gates; ++g) {
    const int64_t* row = idx + g * per_gate;
    const bool valid = std::all_of(row, row + per_gate, [g](int64_t j) { return j >= 0 && j <= g; });
    if (valid) continue;
    const int64_t j = *std::find_if(row, row + per_gate, [g](int64_t j) { return j < 0 || j > g; });
    TORCH_CHECK(false, "native D2R chain: gate ", g, " reads module ", j, "; a gate can only read modules 0..", g,
                " (index [N, E, B, k] out of range)");
  }
}

// The block's samples (block-local offsets i, sample b0 + i) whose route reaches each module:
// reached[j * block + i] for table row j (module j + 1). Walks the gates from the output gate
// down, so a module is marked before the gate that computes it reads its sources.
void mark_reached(const Shape& s, const int64_t* index, int64_t e, int64_t b0, int64_t count, int64_t block,
                  uint8_t* reached) {
  std::fill(reached, reached + s.modules * block, uint8_t(0));
  for (int64_t g = s.modules - 1; g >= 0; --g) {
    const bool output_gate = g == s.modules - 1;
    for (int64_t i = 0; i < count; ++i) {
      if (!output_gate && !reached[(g + 1) * block + i]) continue;
      const int64_t at = s.slot(g, e, b0 + i);
      for (int64_t r = 0; r < s.slots; ++r) reached[index[at + r] * block + i] = 1;
    }
  }
}

// The block-local offsets of the samples that reach table row j, into rows; returns their number.
int64_t reached_rows(const uint8_t* reached, int64_t j, int64_t count, int64_t block, int64_t* rows) {
  int64_t m = 0;
  for (int64_t i = 0; i < count; ++i)
    if (reached[j * block + i]) rows[m++] = i;
  return m;
}

// out[r] = sum_t weight[g, e, b0 + i, t] * table[index[g, e, b0 + i, t], e, b0 + i] with
// i = rows[r], for r < m (out compacted)
template <typename scalar_t>
void read_sources(const Shape& s, const scalar_t* table, const int64_t* index, const scalar_t* weight,
                  int64_t g, int64_t e, int64_t b0, const int64_t* rows, int64_t m, scalar_t* out) {
  const int64_t d = s.width;
  for (int64_t r = 0; r < m; ++r) {
    const int64_t b = b0 + rows[r], at = s.slot(g, e, b);
    scalar_t* x = out + r * d;
    const scalar_t* source = table + s.row(index[at], e, b) * d;
    const scalar_t w0 = weight[at];
    for (int64_t c = 0; c < d; ++c) x[c] = w0 * source[c];
    for (int64_t t = 1; t < s.slots; ++t) {
      source = table + s.row(index[at + t], e, b) * d;
      const scalar_t w = weight[at + t];
      for (int64_t c = 0; c < d; ++c) x[c] += w * source[c];
    }
  }
}

// [..., d, d] -> the transposed matrices, contiguous: in tiles that stay in the first-level cache
// (whole tiles with fixed bounds, which the compiler unrolls), one matrix per task of the parallel loop
at::Tensor transpose_matrices(const at::Tensor& matrices) {
  const auto in = matrices.contiguous();
  auto out = at::empty_like(in);
  const int64_t d = in.size(-1), count = d == 0 ? 0 : in.numel() / (d * d);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "d2r_transpose_matrices", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    constexpr int64_t tile = 8;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* a = src + m * d * d;
        scalar_t* t = dst + m * d * d;
        for (int64_t r0 = 0; r0 < d; r0 += tile) {
          for (int64_t c0 = 0; c0 < d; c0 += tile) {
            if (r0 + tile <= d && c0 + tile <= d) {
              for (int64_t r = 0; r < tile; ++r)
                for (int64_t c = 0; c < tile; ++c) t[(c0 + c) * d + r0 + r] = a[(r0 + r) * d + c0 + c];
            } else {
              for (int64_t r = r0; r < std::min(r0 + tile, d); ++r)
                for (int64_t c = c0; c < std::min(c0 + tile, d); ++c) t[c * d + r] = a[r * d + c];
            }
          }
        }
      }
    });
  });
  return out;
}

// Gate g's input gradients back to its sources (the block's local buffers, rows j * block + i),
// and its mixing weights' gradients, for the samples i = rows[r], r < m: grad_x_tilde is
// compacted (row r), grad_x block-local (row i; null at the output gate); own_grad is null
// without ResRouting.
template <typename scalar_t>
void send_back(const Shape& s, const scalar_t* table, const int64_t* index, const scalar_t* weight,
               const scalar_t* endorsed, int64_t g, int64_t e, int64_t b0, const int64_t* rows, int64_t m,
               int64_t block, const scalar_t* grad_x, const scalar_t* grad_x_tilde, scalar_t* shortcut_grad,
               scalar_t* own_grad, scalar_t* grad_weight, scalar_t* both) {
  const int64_t d = s.width;
  for (int64_t r = 0; r < m; ++r) {
    const int64_t i = rows[r];
    const scalar_t* gxt = grad_x_tilde + r * d;
    const scalar_t* gx = grad_x == nullptr ? nullptr : grad_x + i * d;
    if (gx == nullptr) {
      std::memcpy(both, gxt, d * sizeof(scalar_t));
    } else {
      for (int64_t c = 0; c < d; ++c) both[c] = gx[c] + gxt[c];
    }
    const int64_t at = s.slot(g, e, b0 + i);
    for (int64_t t = 0; t < s.slots; ++t) {
      const int64_t j = index[at + t];
      const scalar_t w = weight[at + t];
      const scalar_t* source = table + s.row(j, e, b0 + i) * d;
      scalar_t* shortcut = shortcut_grad + (j * block + i) * d;
      scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) {
        dot += source[c] * both[c];
        shortcut[c] += w * both[c];
      }
      grad_weight[at + t] = dot;
      if (own_grad != nullptr) {
        scalar_t* own = own_grad + (j * block + i) * d;
        const scalar_t endorsed_w = w * endorsed[at + t];
        if (gx == nullptr) {
          for (int64_t c = 0; c < d; ++c) own[c] += endorsed_w * gxt[c];
        } else {
          for (int64_t c = 0; c < d; ++c) own[c] += endorsed_w * gxt[c] + w * gx[c];
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& first, const at::Tensor& index, const at::Tensor& weight,
                  const at::Tensor& matrices, const at::Tensor& biases) {
  TORCH_CHECK(first.device().is_cpu(), "native D2R chain: CPU tensors only, got ", first.device());
  TORCH_CHECK(first.dim() == 3 && index.dim() == 4 && weight.sizes() == index.sizes(),
              "native D2R chain: expected first [E, B, d], index and weight [N, E, B, k]; got ", first.sizes(), ", ",
              index.sizes(), ", ", weight.sizes());
  TORCH_CHECK(index.size(1) == first.size(0) && index.size(2) == first.size(1),
              "native D2R chain: index [N, E, B, k] does not match first [E, B, d]");
  TORCH_CHECK(index.scalar_type() == at::kLong, "native D2R chain: index must be int64");
  const auto members = first.size(0), width = first.size(2), later = index.size(0) - 1;
  TORCH_CHECK(matrices.sizes() == at::IntArrayRef({members, later, width, width}) &&
                  biases.sizes() == at::IntArrayRef({members, later, width}),
              "native D2R chain: expected module weights [E, N - 1, d, d] = [", members, ", ", later, ", ", width, ", ",
              width, "] and biases [E, N - 1, d]; got ", matrices.sizes(), " and ", biases.sizes());
  for (const auto& t : {index, weight}) TORCH_CHECK(t.is_contiguous(), "native D2R chain: inputs must be contiguous");
}

}  // namespace

// Returns (output mixture [E, B, d], table [N, E, B, d], active [N - 1, E, B, d] bool).
std::vector<at::Tensor> chain_forward(const at::Tensor& first, const at::Tensor& index, const at::Tensor& weight,
                                      const at::Tensor& matrices, const at::Tensor& biases, int64_t block) {
  check_inputs(first, index, weight, matrices, biases);
  check_sources(index);
  const Shape s{index.size(0), first.size(0), first.size(1), first.size(2), index.size(3)};
  auto table = at::empty({s.modules, s.members, s.batch, s.width}, first.options());
  auto active = at::empty({s.modules - 1, s.members, s.batch, s.width}, first.options().dtype(at::kBool));
  auto mixed = at::empty({s.members, s.batch, s.width}, first.options());
  const auto first_c = first.contiguous();
  // the module matrices transposed, [E, N - 1, d_in, d_out]: the product's right operand as the kernel reads it
  const auto matrix_t = transpose_matrices(matrices), bias = biases.contiguous();
  const int64_t blocks = (s.batch + block - 1) / block, d = s.width;
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "d2r_chain_forward", [&] {
    const int64_t* idx = index.data_ptr<int64_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    scalar_t* out = table.data_ptr<scalar_t>();
    bool* mask = active.data_ptr<bool>();
    at::parallel_for(0, s.members * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> x(block * d), y(block * d);
      std::vector<int64_t> rows(block), all(block);
      std::iota(all.begin(), all.end(), int64_t(0));
      std::vector<uint8_t> reached(s.modules * block);
      for (int64_t task = begin; task < end; ++task) {
        const auto [e, b0, count] = block_task(s, task, block);
        std::memcpy(out + s.row(0, e, b0) * d, first_c.data_ptr<scalar_t>() + (e * s.batch + b0) * d,
                    count * d * sizeof(scalar_t));
        mark_reached(s, idx, e, b0, count, block, reached.data());
        for (int64_t g = 0; g + 1 < s.modules; ++g) {
          const int64_t m = reached_rows(reached.data(), g + 1, count, block, rows.data());
          if (m == 0) continue;
          read_sources(s, out, idx, w, g, e, b0, rows.data(), m, x.data());
          // y = x W^T on the compacted rows, then the bias, the ReLU mask, the ReLU and the
          // residual in one loop that writes each row back to its sample
          gemm(m, d, d, x.data(), matrix_t.data_ptr<scalar_t>() + s.module(e, g) * d * d, false, y.data());
          const scalar_t* b = bias.data_ptr<scalar_t>() + s.module(e, g) * d;
          for (int64_t r = 0; r < m; ++r) {
            scalar_t* dst = out + s.row(g + 1, e, b0 + rows[r]) * d;
            bool* mk = mask + s.row(g, e, b0 + rows[r]) * d;
            for (int64_t c = 0; c < d; ++c) {
              const scalar_t pre = y[r * d + c] + b[c];
              mk[c] = pre > 0;
              dst[c] = std::max(pre, scalar_t(0)) + x[r * d + c];
            }
          }
        }
        read_sources(s, out, idx, w, s.modules - 1, e, b0, all.data(), count,
                     mixed.data_ptr<scalar_t>() + (e * s.batch + b0) * d);
      }
    });
  });
  return {mixed, table, active};
}

// Returns (grad first [E, B, d], grad weight [N, E, B, k], grad matrices [E, N - 1, d, d], grad
// biases [E, N - 1, d]; the parameter gradients are undefined (None) unless need_params).
std::vector<at::Tensor> chain_backward(const at::Tensor& grad_mixed, const at::Tensor& index, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& endorsed, const at::Tensor& table,
                                       const at::Tensor& active, const at::Tensor& matrices, bool need_params,
                                       int64_t block) {
  const Shape s{index.size(0), table.size(1), table.size(2), table.size(3), index.size(3)};
  const bool res_routing = endorsed.has_value();
  const auto options = table.options();
  const auto grad_out = grad_mixed.contiguous();
  const auto matrix = matrices.contiguous();
  auto grad_first = at::empty({s.members, s.batch, s.width}, options);
  auto grad_weight = at::zeros(index.sizes(), options);  // zero at the gates of modules not reached
  // parameter gradients, [E, N - 1, d, d] and [E, N - 1, d]: one accumulator per thread, summed at the end
  const int64_t threads = need_params ? at::get_num_threads() : 0;
  auto grad_matrices = at::zeros({threads, s.members, s.modules - 1, s.width, s.width}, options);
  auto grad_biases = at::zeros({threads, s.members, s.modules - 1, s.width}, options);
  const int64_t blocks = (s.batch + block - 1) / block, d = s.width;
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "d2r_chain_backward", [&] {
    const int64_t* idx = index.data_ptr<int64_t>();
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const scalar_t* endorse = res_routing ? endorsed->data_ptr<scalar_t>() : nullptr;
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const bool* mask = active.data_ptr<bool>();
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    at::parallel_for(0, s.members * blocks, 1, [&](int64_t begin, int64_t end) {
      // the block's d loss / d (shortcut part) and d loss / d (module's own part) of every
      // module output, rows j * block + i; without ResRouting the shortcut buffer holds both
      std::vector<scalar_t> shortcut(s.modules * block * d), own(res_routing ? s.modules * block * d : 0);
      std::vector<scalar_t> x(block * d), grad_pre(block * d), grad_x_tilde(block * d), both(d);
      std::vector<int64_t> rows(block), all(block);
      std::iota(all.begin(), all.end(), int64_t(0));
      std::vector<uint8_t> reached(s.modules * block);
      scalar_t* own_grad = res_routing ? own.data() : nullptr;
      scalar_t* module_grad = res_routing ? own.data() : shortcut.data();  // d loss / d a_j
      const int64_t thread = need_params ? at::get_thread_num() : 0;
      scalar_t* matrix_acc = need_params ? grad_matrices[thread].data_ptr<scalar_t>() : nullptr;
      scalar_t* bias_acc = need_params ? grad_biases[thread].data_ptr<scalar_t>() : nullptr;
      for (int64_t task = begin; task < end; ++task) {
        const auto [e, b0, count] = block_task(s, task, block);
        mark_reached(s, idx, e, b0, count, block, reached.data());
        // only the rows of reached modules receive or send gradients (module 1's rows are all copied out)
        for (int64_t j = 0; j < s.modules; ++j) {
          for (int64_t i = 0; i < count; ++i) {
            if (j > 0 && !reached[j * block + i]) continue;
            std::fill_n(shortcut.data() + (j * block + i) * d, d, scalar_t(0));
            if (res_routing) std::fill_n(own.data() + (j * block + i) * d, d, scalar_t(0));
          }
        }
        send_back(s, tab, idx, w, endorse, s.modules - 1, e, b0, all.data(), count, block,
                  static_cast<const scalar_t*>(nullptr), grad_out.data_ptr<scalar_t>() + (e * s.batch + b0) * d,
                  shortcut.data(), own_grad, gw, both.data());
        for (int64_t g = s.modules - 2; g >= 0; --g) {
          const int64_t m = reached_rows(reached.data(), g + 1, count, block, rows.data());
          if (m == 0) continue;
          // ReLU's gradient on the compacted rows; read as bytes and with both loads
          // unconditional, the loop vectorises (a branch on the bool mask mispredicts on half
          // the entries: it took as long as the products)
          for (int64_t r = 0; r < m; ++r) {
            const scalar_t* grad_y = module_grad + ((g + 1) * block + rows[r]) * d;
            const auto* mask_bytes = reinterpret_cast<const uint8_t*>(mask + s.row(g, e, b0 + rows[r]) * d);
            for (int64_t c = 0; c < d; ++c) {
              const scalar_t g_y = grad_y[c];
              grad_pre[r * d + c] = mask_bytes[c] ? g_y : scalar_t(0);
            }
          }
          if (need_params) {
            scalar_t* bias_g = bias_acc + s.module(e, g) * d;
            for (int64_t r = 0; r < m; ++r)
              for (int64_t c = 0; c < d; ++c) bias_g[c] += grad_pre[r * d + c];
            // grad W [d_out, d_in] += grad_pre^T x, with the module input x recomputed (cheaper than kept)
            read_sources(s, tab, idx, w, g, e, b0, rows.data(), m, x.data());
            blas_gemm(true, false, d, d, m, grad_pre.data(), x.data(), scalar_t(1),
                      matrix_acc + s.module(e, g) * d * d);
          }
          gemm(m, d, d, grad_pre.data(), matrix.data_ptr<scalar_t>() + s.module(e, g) * d * d, false,
               grad_x_tilde.data());
          send_back(s, tab, idx, w, endorse, g, e, b0, rows.data(), m, block, shortcut.data() + (g + 1) * block * d,
                    grad_x_tilde.data(), shortcut.data(), own_grad, gw, both.data());
        }
        std::memcpy(grad_first.data_ptr<scalar_t>() + (e * s.batch + b0) * d, module_grad, count * d * sizeof(scalar_t));
      }
    });
  });
  if (!need_params) return {grad_first, grad_weight, at::Tensor(), at::Tensor()};
  return {grad_first, grad_weight, threads == 1 ? grad_matrices[0] : grad_matrices.sum(0),
          threads == 1 ? grad_biases[0] : grad_biases.sum(0)};
}

}  // namespace d2r
