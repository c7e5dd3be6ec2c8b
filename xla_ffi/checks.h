// What the FFI handlers check that XLA's decoding cannot (the sizes of
// buffer dimensions, against each other and the attributes), and the mapping
// of csrc's Status onto ffi::Error. Errors are returned, never thrown: XLA
// calls handlers without a try/catch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "xla/ffi/api/ffi.h"

namespace jax_ep::ffi_checks {

namespace ffi = ::xla::ffi;

using Dimensions = ffi::AnyBuffer::Dimensions;

inline std::string ShapeString(Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// InvalidArgument "<op>: <arg> must have rank <rank>, got shape [..]" unless
// `dims` has `rank` dimensions. Only untyped buffers need it: XLA checks the
// rank of a Buffer<dtype, rank>.
inline ffi::Error ExpectRank(std::string_view op, std::string_view arg,
                             Dimensions dims, size_t rank) {
  if (dims.size() == rank) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(op) + ": " + std::string(arg) + " must have rank " +
      std::to_string(rank) + ", got shape " + ShapeString(dims));
}

// InvalidArgument "<op>: <arg> must have shape [..], got [..]" unless `dims`
// equals `expected`.
inline ffi::Error ExpectShape(std::string_view op, std::string_view arg,
                              Dimensions dims,
                              std::initializer_list<int64_t> expected) {
  const std::vector<int64_t> want(expected);
  if (dims == Dimensions(want)) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(
      std::string(op) + ": " + std::string(arg) + " must have shape " +
      ShapeString(want) + ", got " + ShapeString(dims));
}

// The first failure of `errors`, or success.
inline ffi::Error FirstFailure(std::initializer_list<ffi::Error> errors) {
  for (const ffi::Error& error : errors) {
    if (error.failure()) return error;
  }
  return ffi::Error::Success();
}

// InvalidArgument unless `num_experts` is a multiple of `num_ranks` >= 1: the
// handlers size per-rank outputs by num_experts / num_ranks before the
// launchers see the call.
inline ffi::Error ExpectExpertsPerRank(std::string_view op, int64_t num_experts,
                                       int64_t num_ranks) {
  if (num_ranks >= 1 && num_experts % num_ranks == 0) {
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument(
      std::string(op) + ": num_experts (" + std::to_string(num_experts) +
      ") must be a multiple of num_ranks (" + std::to_string(num_ranks) + ")");
}

inline ffi::Error ToFfiError(const Status& status) {
  switch (status.code()) {
    case StatusCode::kOk:
      return ffi::Error::Success();
    case StatusCode::kInvalidArgument:
      return ffi::Error::InvalidArgument(status.message());
    case StatusCode::kCudaError:
      return ffi::Error::Internal(status.message());
  }
  return ffi::Error::Internal("unknown jax_ep status: " + status.message());
}

}  // namespace jax_ep::ffi_checks
