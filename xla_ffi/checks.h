// Helpers shared by the FFI handlers: buffer shape checks and the mapping of
// csrc's Status onto ffi::Error. Both return errors, never throw: XLA calls
// handlers without a try/catch.
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
// `dims` has `rank` dimensions.
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

// Bytes per row of a rank-2 buffer (0 otherwise): rows travel as bytes.
inline int64_t RowBytes(const ffi::AnyBuffer& b) {
  return b.dimensions().size() == 2
             ? b.dimensions()[1] *
                   static_cast<int64_t>(ffi::ByteWidth(b.element_type()))
             : 0;
}

// The row arrays of a dispatch: x [T, C0] and scales [T, C1] (C1 may be 0)
// in, recv_x [M, C0] and recv_scales [M, C1] of the same types out.
inline ffi::Error ExpectDispatchRows(std::string_view op,
                                     const ffi::AnyBuffer& x,
                                     const ffi::AnyBuffer& scales,
                                     const ffi::AnyBuffer& recv_x,
                                     const ffi::AnyBuffer& recv_scales,
                                     int64_t capacity) {
  for (auto error : {ExpectRank(op, "x", x.dimensions(), 2),
                     ExpectRank(op, "scales", scales.dimensions(), 2)}) {
    if (error.failure()) return error;
  }
  const int64_t T = x.dimensions()[0];
  for (auto error : {
           ExpectShape(op, "scales", scales.dimensions(),
                       {T, scales.dimensions()[1]}),
           ExpectShape(op, "recv_x", recv_x.dimensions(),
                       {capacity, x.dimensions()[1]}),
           ExpectShape(op, "recv_scales", recv_scales.dimensions(),
                       {capacity, scales.dimensions()[1]}),
       }) {
    if (error.failure()) return error;
  }
  if (recv_x.element_type() != x.element_type() ||
      recv_scales.element_type() != scales.element_type()) {
    return ffi::Error::InvalidArgument(
        std::string(op) + ": recv_x and recv_scales must have the types of "
                          "x and scales");
  }
  return ffi::Error::Success();
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
