"""Kernel configuration (SM budget, chunking) and the tuned-config file.

`python -m jax_ep.tune` measures configurations on the local GPUs and records
the best one per (device kind, EP size) in a JSON file:

    {"version": 1,
     "entries": [{"device_kind": "NVIDIA H200", "num_ranks": 2,
                  "config": {"num_sms": 24, "nvl_send_warps": 4,
                             "nvl_chunk": 2},
                  "measured": {...}}]}

`config` holds `Config` fields (the others keep their defaults); `measured`
is free-form (the figures the choice rests on). The file is
`$JAX_EP_CONFIG`, or `~/.cache/jax_ep/config.json` when that is unset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any

CONFIG_ENV = "JAX_EP_CONFIG"
DEFAULT_CONFIG_PATH = "~/.cache/jax_ep/config.json"
FILE_VERSION = 1
# Of the 16 warps of an intranode block at least one receives.
MAX_NVL_SEND_WARPS = 15
# What `Config.num_sms = 0` (automatic) gives a normal kernel
# (docs/measuring.md, "Overlap"). Beside computation (traced inside
# `jax_ep.overlap`): DeepEP's budget, the other SMs left to the model.
OVERLAP_NUM_SMS = 24
# On the compute stream, where nothing runs beside it: the grid that was
# fastest on one H200 (R = 1, DeepSeek-V3 shape, bf16): dispatch 140.5 /
# 101.6 / 113.4 us and combine 155.9 / 105.5 / 101.8 us at 24 / 64 / 132 SMs
# (bench/results/2026-12-02_NVIDIA_H200_dsv3_r1_sms_a23afbb.json); at most
# the GPU's SMs.
ALONE_NUM_SMS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """How a communication kernel uses the GPU (docs/intranode.md, "Tuning").

  Attributes:
    num_sms: streaming multiprocessors a normal kernel may occupy (one block
      each, at most the GPU's SM count); the rest stay free for the model's
      compute when the kernel runs beside it (`jax_ep.overlap`). Even. 0
      (the default): automatic, `OVERLAP_NUM_SMS` (24) for the ops traced
      inside `jax_ep.overlap`, else `ALONE_NUM_SMS` (64, at most the GPU's
      SMs): on XLA's compute stream nothing runs beside the kernel, so a
      budget would only slow it down.
    nvl_send_warps: warps of each 16-warp intranode block that push rows to
      peers (1 to 15); the others receive.
    nvl_chunk: tokens per arrival flag of the intranode kernels (a receiver
      starts on a chunk once its flag is up); 0: automatic.
    nvl_copy_engine: intranode dispatches move every token's row to each
      peer with the GPU's copy engines, so no SM pushes and every warp
      receives; False (the default, faster on 2xH200): `nvl_send_warps` warps
      per block push the selected rows. Combine always pushes with warps.
    rdma_chunk: tokens per arrival flag of the internode exchange, at least
      (a receiving warp starts on a peer's chunk once its flag is up);
      0: automatic, T/64. Rounded up to a multiple of 32 (a warp's sweep)
      and to T/64 (the exchange has 64 flags per peer).

  There is no ring-buffer size: the NVLink buffers hold a whole intranode
  call (`nvl_buffer_bytes`), and the exchange region whole internode calls
  or, when smaller, the pieces of a call that fit (`rdma_buffer_bytes`).

  The reference backend ignores the configuration; it is validated all the same
  so that a bad config fails the same way on every backend.
  """

  num_sms: int = 0
  nvl_send_warps: int = 4
  nvl_chunk: int = 4
  nvl_copy_engine: bool = False
  rdma_chunk: int = 0

  def resolved_num_sms(self, *, beside_compute: bool,
                       sm_count: int | None) -> int:
    """The SMs a normal kernel takes: `num_sms`, or when that is 0 the
    automatic choice for a kernel beside computation or alone on a GPU of
    `sm_count` SMs (None: unknown)."""
    if self.num_sms:
      return self.num_sms
    if beside_compute:
      return OVERLAP_NUM_SMS
    return min(ALONE_NUM_SMS, (sm_count or ALONE_NUM_SMS) // 2 * 2)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      is_int = isinstance(value, int) and not isinstance(value, bool)
      if field.name == "nvl_copy_engine":
        if not isinstance(value, bool):
          raise ValueError(
              f"jax_ep.Config: nvl_copy_engine must be a bool, got {value!r}")
      elif field.name in ("num_sms", "nvl_chunk", "rdma_chunk"):
        if not is_int or value < 0:
          raise ValueError(
              f"jax_ep.Config: {field.name} must be an int >= 0 (0: "
              f"automatic), got {value!r}")
      elif not is_int or value < 1:
        raise ValueError(
            f"jax_ep.Config: {field.name} must be a positive int, got "
            f"{value!r}")
    if self.num_sms % 2:
      raise ValueError(
          f"jax_ep.Config: num_sms must be even, got {self.num_sms}")
    if self.nvl_send_warps > MAX_NVL_SEND_WARPS:
      raise ValueError(
          f"jax_ep.Config: nvl_send_warps must be at most {MAX_NVL_SEND_WARPS} "
          f"(a 16-warp block keeps one warp to receive), got "
          f"{self.nvl_send_warps}")


def tuned_config_path() -> pathlib.Path:
  """The tuned-config file: `$JAX_EP_CONFIG` when set (and not empty), else
  `~/.cache/jax_ep/config.json`."""
  return pathlib.Path(
      os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH).expanduser()


def _entry_config(where: str, entry: Any) -> Config:
  """Checks one entry (`where` names it in errors); returns its `Config`."""
  if not isinstance(entry, dict):
    raise ValueError(f"{where} must be an object, got {entry!r}")
  if not isinstance(entry.get("device_kind"), str):
    raise ValueError(f"{where}: device_kind must be a string, got "
                     f"{entry.get('device_kind')!r}")
  num_ranks = entry.get("num_ranks")
  if (not isinstance(num_ranks, int) or isinstance(num_ranks, bool)
      or num_ranks < 1):
    raise ValueError(
        f"{where}: num_ranks must be a positive int, got {num_ranks!r}")
  fields = entry.get("config")
  if not isinstance(fields, dict):
    raise ValueError(f"{where}: config must be an object, got {fields!r}")
  known = {f.name for f in dataclasses.fields(Config)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"{where}: unknown config fields {unknown} (known: "
                     f"{sorted(known)})")
  try:
    return Config(**fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _read_entries(path: pathlib.Path) -> list[dict] | None:
  """The checked entries of the file at `path`; None when there is no file."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"jax_ep tuned config {path}: not JSON: {e}") from None
  if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
    raise ValueError(
        f"jax_ep tuned config {path}: expected an object with \"version\": "
        f"{FILE_VERSION}, got {str(data)[:80]}")
  entries = data.get("entries")
  if not isinstance(entries, list):
    raise ValueError(
        f"jax_ep tuned config {path}: entries must be a list, got "
        f"{str(entries)[:80]}")
  seen = set()
  for index, entry in enumerate(entries):
    _entry_config(f"jax_ep tuned config {path}: entry {index}", entry)
    key = (entry["device_kind"], entry["num_ranks"])
    if key in seen:
      raise ValueError(
          f"jax_ep tuned config {path}: entry {index} repeats device_kind "
          f"{key[0]!r} with num_ranks {key[1]}")
    seen.add(key)
  return entries


def tuned_config(device_kind: str, num_ranks: int) -> Config | None:
  """The tuned `Config` for these GPUs and EP size, from the tuned-config file.

  Args:
    device_kind: the GPUs' `jax.Device.device_kind`, e.g. "NVIDIA H200".
    num_ranks: EP size.

  Returns:
    The matching entry's `Config` (fields it does not set keep their
    defaults), or None when the file does not exist or has no such entry.

  Raises:
    ValueError: the file is malformed or an entry has a bad field; the message
      names the file.
  """
  path = tuned_config_path()
  for entry in _read_entries(path) or []:
    if (entry["device_kind"], entry["num_ranks"]) == (device_kind, num_ranks):
      return Config(**entry["config"])  # checked by _read_entries
  return None


def write_tuned_config(path: str | os.PathLike, entry: dict) -> None:
  """Adds `entry` to the tuned-config file at `path`, atomically.

  An existing entry with the same (device_kind, num_ranks) is replaced; the
  others are kept. Missing folders are created. Readers see the old file or
  the new one, never a partial write (temporary file + `os.replace`).

  Args:
    path: the file, e.g. `tuned_config_path()`.
    entry: `{"device_kind": str, "num_ranks": int, "config": {Config fields},
      "measured": {...}}`.

  Raises:
    ValueError: `entry` is malformed, or the existing file is (it is left as
      it is).
  """
  path = pathlib.Path(path).expanduser()
  _entry_config(f"jax_ep.write_tuned_config({str(path)!r}): the new entry",
                entry)
  key = (entry["device_kind"], entry["num_ranks"])
  entries = [e for e in _read_entries(path) or []
             if (e["device_kind"], e["num_ranks"]) != key]
  entries.append(entry)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The temporary file sits next to the target so os.replace stays on one
  # file system (and is atomic).
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump({"version": FILE_VERSION, "entries": entries}, f, indent=1)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
