"""The kernel probes' CPU side, so that a break fails here rather than in a
GPU machine's time: the phase-stamp probe (bench/probes/ll_phase_stamps.py)
finds each of its places in the current kernel sources, and a variant's
copy of the tree (bench/probes/variant.py) holds what the tree holds."""

import importlib.util
import pathlib
import subprocess

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


def test_a_variant_copies_the_tracked_files_the_tree_has(tmp_path,
                                                         monkeypatch):
  """A path the index lists but the working tree lacks (a GPU machine's copy
  of a tree whose folder was renamed) is left out; the others are copied as
  they are in the tree, uncommitted edits included."""
  monkeypatch.syspath_prepend(str(ROOT / "bench" / "probes"))
  import variant
  repo = tmp_path / "repo"
  (repo / "kept").mkdir(parents=True)
  (repo / "kept" / "a.txt").write_text("committed")
  (repo / "gone.txt").write_text("deleted after the commit")
  git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True,
                                     capture_output=True)
  git("init", "-q")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
  (repo / "gone.txt").unlink()
  (repo / "kept" / "a.txt").write_text("edited")
  monkeypatch.setattr(variant, "ROOT", repo)
  copy = tmp_path / "copy"
  variant.copy_tracked(copy)
  assert (copy / "kept" / "a.txt").read_text() == "edited"
  assert not (copy / "gone.txt").exists()
