// BCE-with-logits per element, in double, for the CPU kernels of BCE (pointwise_cpu.cpp) and of the
// fused D head (bn_cpu_kernels.h, compiled once per ISA: internal linkage keeps each build's copy).
#pragma once

#include <algorithm>
#include <cmath>

namespace gan_fast {
namespace {

// Per-element BCE-with-logits in double as torch arranges it: (1 - t) * l - log_sigmoid(l), with
// log_sigmoid(l) = min(l, 0) - log1p(exp(-|l|)); an infinite logit then gives the reference's inf or
// NaN (l = +inf, t = 0 is +inf, where max(l, 0) - l * t would give inf - inf).
inline double bce_term(double l, double t) {
  return (1.0 - t) * l - std::min(l, 0.0) + std::log1p(std::exp(-std::abs(l)));
}

// sigmoid(l) without overflow for either sign of l.
inline double stable_sigmoid(double l) {
  if (l >= 0) return 1.0 / (1.0 + std::exp(-l));
  const double e = std::exp(l);
  return e / (1.0 + e);
}

// dloss/dl = (sigmoid(l) - t) * scale, in double.
inline double bce_grad(double l, double t, double scale) { return (stable_sigmoid(l) - t) * scale; }

}  // namespace
}  // namespace gan_fast
