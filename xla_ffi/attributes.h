// The struct attributes of the FFI handlers: csrc structs that XLA decodes
// from a dictionary attribute, so that one Python dict crosses into C++ as the
// struct the launchers take. Python passes e.g. `tuning=dict(num_sms=...)`;
// every key below must be present, with exactly the value type named, and
// no other key.
//
// XLA builds each struct by aggregate initialization from the members in the
// order listed, so the order must be the csrc struct's declaration order.
#pragma once

#include <cstdint>

#include "intranode/dispatch_combine.cuh"
#include "low_latency/low_latency.cuh"
#include "xla/ffi/api/api.h"

// How the intranode kernels use the GPU: jax_ep.Config's num_sms,
// nvl_send_warps, nvl_chunk and nvl_copy_engine, and the backend's timeout.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jax_ep::intranode::Tuning,
                                      StructMember<int64_t>("num_sms"),
                                      StructMember<int64_t>("nvl_send_warps"),
                                      StructMember<int64_t>("nvl_chunk"),
                                      StructMember<int64_t>("timeout_ns"),
                                      StructMember<int64_t>("nvl_copy_engine"));

// The shapes of one low-latency dispatch and the combine that returns it:
// every rank derives the heap offsets from them.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jax_ep::low_latency::Shape,
                                      StructMember<int64_t>("num_tokens"),
                                      StructMember<int64_t>("max_tokens"),
                                      StructMember<int64_t>("hidden"),
                                      StructMember<int64_t>("num_topk"),
                                      StructMember<int64_t>("num_experts"),
                                      StructMember<int64_t>("num_ranks"));

// How the low-latency kernels move data and wait: the backend's force_put and
// timeout, the same for all four halves.
XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(::jax_ep::low_latency::Options,
                                      StructMember<bool>("force_put"),
                                      StructMember<int64_t>("timeout_ns"));
