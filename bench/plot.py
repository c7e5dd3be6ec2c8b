"""`python -m bench.plot RESULTS.json [--out PNG]`: plots a benchmark file.

One panel per hidden size: time per call against tokens per rank, one line
per (impl, op, dtype) at the default SM count. Last: jax_ep's time against
its SM count at the (hidden, tokens) timed with the most SM counts. Needs
matplotlib (not a dependency of jax_ep).
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

  by_tokens = collections.defaultdict(list)  # (hidden, key) -> points
  by_sms = collections.defaultdict(list)
  sms_by_shape = collections.defaultdict(set)
  for r in records:
    if r["impl"] == "jax_ep":
      sms_by_shape[r["hidden"], r["tokens"]].add(r["num_sms"])
  sweep = max(sms_by_shape or [None],
              key=lambda s: len(sms_by_shape.get(s, ())))
  for r in records:
    if r["op"] == "layout":
      continue
    key = f"{r['impl']} {r['op']} {r['dtype']}"
    if r["num_sms"] in (None, default_sms):
      by_tokens[r["hidden"], key].append((r["tokens"], r["time_us"]))
    if r["impl"] == "jax_ep" and (r["hidden"], r["tokens"]) == sweep:
      by_sms[key].append((r["num_sms"], r["time_us"]))

  hiddens = sorted({h for h, _ in by_tokens})
  fig, axes = plt.subplots(1, len(hiddens) + 1,
                           figsize=(6.5 * (len(hiddens) + 1), 5))
  for ax, hidden in zip(axes, hiddens):
    for (h, key), points in sorted(by_tokens.items()):
      if h != hidden:
        continue
      points.sort()
      ax.plot(*zip(*points), marker="o", label=key,
              linestyle="-" if key.startswith("jax_ep") else "--")
    ax.set(xscale="log", yscale="log", xlabel="tokens per rank",
           ylabel="µs per call",
           title=f"H={hidden} ({default_sms} SMs for jax_ep)")
    ax.legend(fontsize=7)
  right = axes[-1]
  for key, points in sorted(by_sms.items()):
    points.sort()
    right.plot(*zip(*points), marker="o", label=key)
  right.set(xlabel="SMs (jax_ep)", ylabel="µs per call",
            title="jax_ep against its SM budget"
            + ("" if sweep is None else
               f", H={sweep[0]}, {sweep[1]} tokens/rank"))
  right.legend(fontsize=7)
  first = records[0]
  fig.suptitle(f"{first['device']} x{first['ranks']}, "
               f"top-{first['topk']}, {first['experts']} experts, "
               f"{first['processes']} process(es)")
  fig.tight_layout()
  out = args.out or str(pathlib.Path(args.results).with_suffix(".png"))
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
