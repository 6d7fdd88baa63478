// The native CPU operators of D2R (module_chain.cpp, routing.cpp), bound to Python in extension.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace d2r {

// The module chain, forward: (output mixture [E, B, d], table [N, E, B, d], active [N - 1, E, B, d] bool).
std::vector<at::Tensor> chain_forward(const at::Tensor& first, const at::Tensor& index, const at::Tensor& weight,
                                      const at::Tensor& matrices, const at::Tensor& biases, int64_t block);

// The module chain, backward: (grad first, grad weight, grad matrices, grad biases).
std::vector<at::Tensor> chain_backward(const at::Tensor& grad_mixed, const at::Tensor& index, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& endorsed, const at::Tensor& table,
                                       const at::Tensor& active, const at::Tensor& matrices, bool need_params,
                                       int64_t block);

// Routes of every gate from flat router logits: (sources [R, N, k], positions [R, N, k],
// endorsed [R, N, k] bool or undefined, route [R, N(N+1)/2] bool).
std::vector<at::Tensor> route_slots(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                                    const std::optional<at::Tensor>& gumbel, const std::optional<at::Tensor>& behaviour,
                                    int64_t modules, int64_t k, bool endorse);

}  // namespace d2r
