// What the kernels' translation units need of torch: the Tensor type, the two factories they call
// and the thread pool. Not <torch/extension.h> (pybind11 and the whole C++ API), which only
// bindings.cpp needs: it cost each unit ~25 s of compiling, and a build on 2 cores ~1.8 minutes.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace torch {
using at::empty;
using at::empty_like;
using at::Tensor;
}  // namespace torch
