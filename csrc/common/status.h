// Status: what a host launcher in csrc/ returns.
//
// csrc/ knows nothing about XLA, so launchers report failures with this small
// type; xla_ffi/ maps it onto ffi::Error. A launcher validates its sizes
// before enqueuing anything, so an InvalidArgument status means nothing ran.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

namespace jax_ep {

enum class StatusCode {
  kOk,
  kInvalidArgument,  // sizes outside the range a kernel supports
  kCudaError,        // the CUDA runtime refused a call (e.g. a launch)
};

class [[nodiscard]] Status {
 public:
  Status() = default;

  static Status InvalidArgument(std::string message) {
    return Status(StatusCode::kInvalidArgument, std::move(message));
  }

  // Ok when `error` is cudaSuccess; otherwise names the failed step (`what`)
  // and the CUDA error.
  static Status FromCuda(cudaError_t error, const char* what) {
    if (error == cudaSuccess) return Status();
    return Status(StatusCode::kCudaError,
                  std::string(what) + ": " + cudaGetErrorName(error) + ": " +
                      cudaGetErrorString(error));
  }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Status(StatusCode code, std::string message)
      : code_(code), message_(std::move(message)) {}

  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

}  // namespace jax_ep
