// A C interface to libtorch's multi-tensor optimizer kernels, which tch 0.26 does not bind:
// the fused AdamW step (`_fused_adamw_`, one kernel over a list of tensors, CPU and CUDA)
// and the foreach ops gradient clipping needs (`_foreach_norm`, `_foreach_mul_`) and
// zeroing (`_foreach_zero_`), and dropping gradients (tch cannot unset one).
//
// As in c10d_shim.cpp: every entry point catches C++ exceptions and returns them as a
// malloc'd error string (NULL on success) that the caller frees with
// forge_optim_free_error; tensors arrive as arrays of `at::Tensor*` (tch's C_tensor).

#include <ATen/ATen.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_foreach_zero.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "guarded.h"

namespace {

using forge_shim::guarded;

std::vector<at::Tensor> list(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

}  // namespace

extern "C" {

void forge_optim_free_error(char* e) { std::free(e); }

// One AdamW step (torch.optim.AdamW's arithmetic, amsgrad and maximize off) over n
// parameters with their gradients and moments, all of one dtype on one device, in place.
// `step` is the 1-based step used for bias correction.
char* forge_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                        int64_t n, double step, double lr, double beta1, double beta2, double weight_decay,
                        double eps) {
  return guarded([&] {
    if (n == 0) {
      return;
    }
    auto p = list(params, n);
    // the kernel reads each parameter's step from a float tensor on the parameters' device
    auto steps_t = at::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(static_cast<size_t>(n), steps_t);
    at::_fused_adamw_(p, list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// The sum over the n tensors of their squared L2 norms (each norm computed in the tensor's
// own precision by one multi-tensor kernel, as torch.nn.utils.clip_grad_norm_ does; the sum
// of squares in fp64), written to *out.
char* forge_foreach_sq_norm(at::Tensor** ts, int64_t n, double* out) {
  return guarded([&] {
    *out = 0.0;
    if (n == 0) {
      return;
    }
    auto norms = at::_foreach_norm(list(ts, n), 2);
    *out = at::stack(norms).to(at::kDouble).square().sum().item<double>();
  });
}

// ts[i] *= s for every tensor, in place.
char* forge_foreach_mul_(at::Tensor** ts, int64_t n, double s) {
  return guarded([&] {
    if (n > 0) {
      at::_foreach_mul_(list(ts, n), s);
    }
  });
}

// Drops every tensor's gradient (torch's zero_grad(set_to_none=True)): the next backward
// then stores its gradient instead of adding it to zeros.
char* forge_release_grads(at::Tensor** ts, int64_t n) {
  return guarded([&] {
    for (int64_t i = 0; i < n; ++i) {
      ts[i]->mutable_grad().reset();
    }
  });
}

// ts[i] = 0 for every tensor, in place.
char* forge_foreach_zero_(at::Tensor** ts, int64_t n) {
  return guarded([&] {
    if (n > 0) {
      at::_foreach_zero_(list(ts, n));
    }
  });
}

}  // extern "C"
