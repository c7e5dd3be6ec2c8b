"""Probe: where the low-latency kernels' time goes, phase by phase, at R = 1.

Copies the repository's tracked files into a temporary folder, adds
globaltimer stamps to the copy's dispatch and combine kernels (each after a
block barrier: the kernel's phases, and the first token's phases of the
dispatch's own-token cast), builds the copy into that folder (the installed
jax_ep is left alone), then runs each op 40 times at the bench's dsv3_ll
shape on one GPU and prints, per phase, the median and the max over the
blocks of one call: µs from each block's start, cumulative.

The stamps add a barrier each: read the phases, not the kernel's total (the
profiler's kernel times, `python -m bench ... --profile`, are the totals).
The patches find their places by the source text and fail with the text
they missed when the kernels change.

  python bench/probes/ll_phase_stamps.py     (a GPU machine, about a minute)
"""
import pathlib
import sys
import tempfile

from variant import build, copy_tracked, run_python

# A kernel's (or function's) stamps: st[0] at its start, then one per mark.
START = """\
  uint64_t st[8];
  int n = 0;
  st[n++] = sync::global_timer_ns();
"""
MARK = ("  __syncthreads();\n"
        "  if (threadIdx.x == 0) st[n++] = sync::global_timer_ns();\n")
# Printed by thread 0 of every block for one call of every 40: the kernels'
# phases for the 31st, 71st, ... call, the own-token cast's for the 30th, 70th,
# ... (its printf would otherwise sit inside the kernel's "own tokens" phase).
REPORT = r"""
  if (threadIdx.x == 0 && seq % 40 == CALL) {
    for (int i = n; i < 8; ++i) st[i] = st[n - 1];
    printf("STAMP \"%s\" %llu %d %llu %llu %llu %llu %llu\n", OP,
           (unsigned long long)seq, (int)blockIdx.x,
           (unsigned long long)(st[1] - st[0]),
           (unsigned long long)(st[2] - st[0]),
           (unsigned long long)(st[3] - st[0]),
           (unsigned long long)(st[4] - st[0]),
           (unsigned long long)(st[5] - st[0]));
  }
"""


def report(phases: str, call: int = 31) -> str:
  return REPORT.replace("OP", f'"{phases}"').replace("CALL", str(call))


DISPATCH, COMBINE = "csrc/low_latency/dispatch.cu", "csrc/low_latency/combine.cu"
# The dispatch reads its arguments as `args` there (it stages the ids first).
ENTRY = """\
  const uint64_t seq = CallSequence<kHalves>(heap, a.ticket);
  const SetPointers set = SetOf(heap, seq);
"""
DISPATCH_ENTRY = ENTRY.replace("a.ticket", "args.ticket")
END = "  EndCall<kHalves>(heap, set, seq, a.options.force_put);\n"
# (file, text, what goes before it, what goes after it): each kernel's
# phases, and the first token's phases of the dispatch's own-token cast.
PATCHES = [
    (DISPATCH, DISPATCH_ENTRY, START, MARK),
    (DISPATCH, "put = SendTokens(heap, a, set, seq);\n", "", MARK),
    (DISPATCH, "    ReceiveExperts(heap, a, set, seq);\n", "", MARK),
    (DISPATCH, "    CastOwnTokens(heap, a, set, seq);\n", "", MARK),
    (DISPATCH, END, "", MARK + report(
        "dispatch: sequence, send, units, own tokens, end")),
    (COMBINE, ENTRY, START, MARK),
    (COMBINE, "put = SendRows(heap, a, set, seq);\n", "", MARK),
    (COMBINE, "ReceiveTokens(heap, a, set, seq);\n", "", MARK),
    (COMBINE, END, "", MARK + report("combine: sequence, send, receive, end")),
    (DISPATCH, """\
  __shared__ int32_t row_of[kMaxTopk];
""", "", START),
    (DISPATCH, """\
    if (!__syncthreads_or(mine)) continue;
""", "", "    if (n == 1) st[n++] = sync::global_timer_ns();\n"),
    (DISPATCH, """\
      pass.Cast(a);
      // With UE8M0 a word packs four groups' exponents: lane 0 gathers its
      // warp's 32 chunks (a row's chunks are a multiple of 32 then).
""", """\
      __syncthreads();
      if (n == 2) st[n++] = sync::global_timer_ns();
""", """\
      __syncthreads();
      if (n == 3) st[n++] = sync::global_timer_ns();
"""),
    (DISPATCH, """\
    __syncthreads();  // expert_of and row_of are the next token's
  }
""", """\
    __syncthreads();
    if (n == 4) {
      st[n++] = sync::global_timer_ns();
      __threadfence();
      __syncthreads();
      st[n++] = sync::global_timer_ns();
    }
""", "  if (n == 6) {" + report(
        "own-token cast: choices, positions, cast, stores issued, stores "
        "done", call=30) + "  }\n"),
]

# Runs in a child process on the stamped build.
RUN = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import jax_ep
from jax_ep._src.timing import random_routing
assert jax_ep.__file__.startswith(%(site)r), jax_ep.__file__
T, H, K, E = 128, 7168, 8, 288
mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
buf = jax_ep.Buffer(mesh, "ep", backend="cuda",
                    num_ll_bytes=jax_ep.ll_buffer_bytes(T, H, E))
rng = np.random.default_rng(0)
idx = jnp.asarray(random_routing(rng, T, K, E))
x = jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16)
w = jnp.asarray(rng.random((T, K)), jnp.float32)
shard = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"),
                                        out_specs=P("ep")))
for fp8 in (True, False):  # calls 1-40 and 41-80
  dispatch = shard(lambda x, i: jax_ep.low_latency_dispatch(
      buf, x, i, num_max_dispatch_tokens_per_rank=T, num_experts=E,
      use_fp8=fp8, zero_padding=False))
  for _ in range(40):
    d = jax.block_until_ready(dispatch(x, idx))
y = jnp.asarray(rng.standard_normal((E, T, H)), jnp.bfloat16)
combine = shard(lambda y, i, w, h: jax_ep.low_latency_combine(buf, y, i, w, h))
for _ in range(40):  # calls 81-120
  jax.block_until_ready(combine(y, idx, w, d.handle))
buf.close()
"""


def stamped_copy(folder: pathlib.Path) -> None:
  """The tracked files under `folder`, the stamps patched in."""
  copy_tracked(folder)
  for name, text, before, after in PATCHES:
    path = folder / name
    source = path.read_text()
    if source.count(text) != 1:
      sys.exit(f"{name}: the stamp's place is gone, update PATCHES:\n{text}")
    path.write_text(source.replace(text, before + text + after))


def summarize(output: str) -> None:
  """Medians and maxima over the blocks, per reported call and phase."""
  rows = {}
  for line in output.splitlines():
    if line.startswith("STAMP "):
      what, numbers = line[6:].rsplit('"', 1)[0], line.rsplit('"', 1)[1]
      values = [int(v) for v in numbers.split()]
      rows.setdefault((what.strip('"'), values[0]), []).append(values[2:])
  for (what, seq), blocks in sorted(rows.items(), key=lambda r: r[0][1]):
    columns = [sorted(c) for c in zip(*blocks)]
    phases = "  ".join(f"{c[len(c) // 2] / 1e3:.2f}/{c[-1] / 1e3:.2f}"
                       for c in columns)
    print(f"call {seq}, {what} ({len(blocks)} blocks), median/max us: "
          f"{phases}")


def main() -> None:
  with tempfile.TemporaryDirectory(prefix="jax_ep_stamps_") as tmp:
    source, target = pathlib.Path(tmp, "src"), pathlib.Path(tmp, "site")
    stamped_copy(source)
    build(source, target)
    run = run_python(target, ["-c", RUN % dict(site=str(target))], cwd=tmp,
                     capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
      sys.exit(f"the stamped run failed ({run.returncode}):\n"
               f"{run.stderr[-4000:]}")
    summarize(run.stdout)


if __name__ == "__main__":
  main()
