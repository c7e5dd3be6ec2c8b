"""`python -m bench.plot RESULTS.json [--out PNG]`: plots a benchmark file.

Left: time per call against tokens per rank, one line per (impl, op, dtype)
at the default SM count. Right: jax_ep's time against its SM count at the
token count timed with the most SM counts. Needs matplotlib (not a
dependency of jax_ep).
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bench.plot",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("results")
  parser.add_argument("--out", help="PNG path (default: RESULTS with .png)")
  args = parser.parse_args(argv)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f"bench.plot needs matplotlib: {e}") from e
  records = json.loads(pathlib.Path(args.results).read_text())
  sms_counts = sorted({r["num_sms"] for r in records if r["num_sms"]})
  default_sms = 24 if 24 in sms_counts else (sms_counts or [None])[0]

  by_tokens = collections.defaultdict(list)
  by_sms = collections.defaultdict(list)
  sms_by_tokens = collections.defaultdict(set)
  for r in records:
    if r["impl"] == "jax_ep":
      sms_by_tokens[r["tokens"]].add(r["num_sms"])
  sweep_tokens = max(sms_by_tokens or [None],
                     key=lambda t: len(sms_by_tokens.get(t, ())))
  for r in records:
    if r["op"] == "layout":
      continue
    key = f"{r['impl']} {r['op']} {r['dtype']}"
    if r["num_sms"] in (None, default_sms):
      by_tokens[key].append((r["tokens"], r["time_us"]))
    if r["impl"] == "jax_ep" and r["tokens"] == sweep_tokens:
      by_sms[key].append((r["num_sms"], r["time_us"]))

  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  for key, points in sorted(by_tokens.items()):
    points.sort()
    left.plot(*zip(*points), marker="o", label=key,
              linestyle="-" if key.startswith("jax_ep") else "--")
  left.set(xscale="log", yscale="log", xlabel="tokens per rank",
           ylabel="µs per call",
           title=f"time per call ({default_sms} SMs for jax_ep)")
  left.legend(fontsize=7)
  for key, points in sorted(by_sms.items()):
    points.sort()
    right.plot(*zip(*points), marker="o", label=key)
  right.set(xlabel="SMs (jax_ep)", ylabel="µs per call",
            title=f"jax_ep against its SM budget, {sweep_tokens} tokens/rank")
  right.legend(fontsize=7)
  first = records[0]
  fig.suptitle(f"{first['device']} x{first['ranks']}, H={first['hidden']}, "
               f"top-{first['topk']}, {first['experts']} experts, "
               f"{first['processes']} process(es)")
  fig.tight_layout()
  out = args.out or str(pathlib.Path(args.results).with_suffix(".png"))
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
