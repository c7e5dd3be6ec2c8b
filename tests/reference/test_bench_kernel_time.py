"""The profile's arithmetic (bench/kernel_time.py), which the low-latency
records' kernel_us and notes are made of: kernels named from their mangled
names (template kernels included), per-kernel medians per call, and the
GPU's idle time per call."""

from bench import kernel_time
from bench.kernel_time import Kernel


def test_short_names_of_plain_and_template_kernels():
  plain = ("_ZN6jax_ep11low_latency12_GLOBAL__N_118DispatchSendKernelENS0_4"
           "HeapENS0_16DispatchSendArgsE")
  template = ("__nv_static_33__df6bea47_11_dispatch_cu_00bb140b__ZN6jax_ep11"
              "low_latency12_GLOBAL__N_114DispatchKernelILNS0_6HalvesE2EEEvNS0"
              "_4HeapENS0_12DispatchArgsE")
  assert kernel_time.short_name(plain) == "DispatchSendKernel"
  assert kernel_time.short_name(template) == "DispatchKernel"
  assert kernel_time.short_name("jax_ep::Foo(int)") == "Foo"


def test_per_kernel_medians_and_idle_time_per_call():
  # Two calls: a (2 us) then b (3 us, 1 us after a), then a gap of 4 us;
  # a kernel on another stream inside b's span adds no busy time.
  kernels = [Kernel("a", 1, 0.0, 2.0), Kernel("b", 1, 3.0, 6.0),
             Kernel("c", 2, 4.0, 5.0), Kernel("a", 1, 10.0, 12.0),
             Kernel("b", 1, 13.0, 17.0), Kernel("c", 2, 14.0, 15.0)]
  times = kernel_time.per_kernel(kernels, iters=2)
  assert times == {"a": (1, 2.0), "b": (1, 3.5), "c": (1, 1.0)}
  # Busy 2 + 3 + 2 + 4 = 11 of the 17 us span: 6 idle over 2 calls.
  assert kernel_time.idle_per_call(kernels, iters=2) == 3.0
  assert kernel_time.summary(times, "a") == 2.0
