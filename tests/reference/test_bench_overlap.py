"""bench/overlap.py on CPUs (reference backend): the script a GPU call runs
(`scripts/gpu_check.sh` OVERLAP=1) must not first fail there. Only `base`
runs without kernels; every variant must name where its parts run."""

from bench import overlap


def test_overlap_runs_its_base_variant_on_the_reference():
  records = overlap.run(shape_name="ci", matmuls=2, n=128,
                        variants=list(overlap.VARIANTS), iters=1, reps=1,
                        warmup=0, seed=0, dump=None)
  assert [r.op for r in records] == [
      "overlap_comm", "overlap_compute", "overlap_base"]
  assert all(r.impl == "reference" and r.time_us > 0 for r in records)
  assert "(as written, defaults)" in records[-1].note


def test_every_variant_says_where_its_parts_run():
  placements = {name: overlap._placement(v)  # pylint: disable=protected-access
                for name, v in overlap.VARIANTS.items()}
  assert placements["base"] == "as written"
  assert placements["both_streams"] == (
      "the comm on gpu_stream:1, the matmuls on gpu_stream:2")
  assert placements["stream_group"] == (
      "the comm on gpu_stream:1, scheduling group 1")
  assert all(p != "as written" for name, p in placements.items()
             if name != "base")
