"""The phase-stamp probe (bench/probes/ll_phase_stamps.py) finds each of its
places in the current kernel sources: a kernel edit that moves one fails
here, on CPU, rather than in a GPU machine's time."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_phase_stamps_find_their_places_in_the_kernels(tmp_path,
                                                           monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT / "bench" / "probes"))  # variant.py
  path = ROOT / "bench" / "probes" / "ll_phase_stamps.py"
  spec = importlib.util.spec_from_file_location("ll_phase_stamps", path)
  probe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(probe)
  probe.stamped_copy(tmp_path)  # exits naming the text it missed
  dispatch = (tmp_path / probe.DISPATCH).read_text()
  combine = (tmp_path / probe.COMBINE).read_text()
  # Reports: the dispatch kernel's and its own-token cast's; the combine's.
  assert dispatch.count('printf("STAMP') == 2
  assert combine.count('printf("STAMP') == 1
  assert (ROOT / probe.DISPATCH).read_text().count("global_timer_ns") == 0
