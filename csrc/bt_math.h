// Scalar math shared by the CPU and CUDA kernels: numerically stable softplus/sigmoid and the
// per-pair Bradley-Terry loss with its gradient. No PyTorch headers: compiles under nvcc -c.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace prefkernels {

// softplus(x) = log(1 + e^x), stable for |x| up to float max; NaN propagates.
PK_HOST_DEVICE float stable_softplus(float x) {
  return (x > 0.f ? x : 0.f) + log1pf(expf(-fabsf(x)));
}

// sigmoid(x) without overflow; NaN propagates.
PK_HOST_DEVICE float stable_sigmoid(float x) {
  if (x >= 0.f) return 1.f / (1.f + expf(-x));
  const float e = expf(x);
  return e / (1.f + e);
}

struct PairLossResult {
  float loss;
  float grad_chosen;    // d loss / d r_chosen
  float grad_rejected;  // d loss / d r_rejected
};

// l = (1-eps)*softplus(-d) + eps*softplus(d) + c*(rc+rr)^2 with d = rc - rr - margin.
PK_HOST_DEVICE PairLossResult bt_pair_loss(float r_chosen, float r_rejected, float margin,
                                           float label_smoothing, float center_coef) {
  const float gap = r_chosen - r_rejected - margin;
  const float sum = r_chosen + r_rejected;
  // A term whose weight is 0 is left out, not multiplied by 0: with an infinite reward it would
  // be 0 * inf = NaN where the loss is 0 (TRL's -logsigmoid(gap) at gap = +inf).
  const bool smoothed = label_smoothing > 0.f, centered = center_coef > 0.f;
  PairLossResult out;
  out.loss = (1.f - label_smoothing) * stable_softplus(-gap) + (smoothed ? label_smoothing * stable_softplus(gap) : 0.f)
             + (centered ? center_coef * sum * sum : 0.f);
  const float d_gap = -(1.f - label_smoothing) * stable_sigmoid(-gap) + label_smoothing * stable_sigmoid(gap);
  const float d_center = centered ? 2.f * center_coef * sum : 0.f;
  out.grad_chosen = d_gap + d_center;
  out.grad_rejected = -d_gap + d_center;
  return out;
}

}  // namespace prefkernels
