"""Probe: run Python on a variant of the kernels, built beside the installed
jax_ep, so that one GPU call can time the code and a variant back to back on
the same machine (runs on different machines differ by more than the small
changes they would compare).

Copies the repository's tracked files (as they are in the working tree) into
a temporary folder, applies each --patch there (`git diff` output, applied
with `git apply`), builds the copy into that folder and runs this
interpreter with the arguments after `--`, importing jax_ep from the
variant's build and the rest of the repository (bench, tests) from the copy:

  git diff > variant.patch; git checkout csrc        # on the CPU machine
  python bench/probes/variant.py --patch variant.patch -- -m bench \\
      --shape dsv3_ll --ops ll_combine --impls jax_ep --profile \\
      --out $OUT/variant.json                         # on the GPU machine

(The patch must sit in the repository, untracked, to reach the GPU machine.)
Without --patch it builds the tree as it is: a control built the same way.
A relative --out lands in the temporary copy and is lost: give $OUT paths.
"""
import argparse
import os
import pathlib
import site
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def copy_tracked(folder: pathlib.Path) -> None:
  """The repository's tracked files, as in the working tree, under `folder`:
  one the index lists but the tree lacks (deleted, or moved and the index
  not updated, as in a GPU machine's copy of a tree) is left out."""
  files = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
  for name in files:
    if not (ROOT / name).is_file():
      continue
    target = folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((ROOT / name).read_bytes())


def build(source: pathlib.Path, target: pathlib.Path) -> None:
  """Builds and installs the tree at `source` into the folder `target`."""
  subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                  "--no-build-isolation", "--no-deps", "--target",
                  str(target), str(source)], check=True)


def run_python(target: pathlib.Path, args: list[str], cwd: pathlib.Path,
               after: tuple[pathlib.Path, ...] = (),
               **kwargs) -> subprocess.CompletedProcess:
  """This interpreter with `args`, importing jax_ep from the build at
  `target`: -S, so that no site hook (the editable install's finder) can
  shadow it; the interpreter's packages, then `after`, come on the path
  after it. `cwd` (the path's first entry) must hold no jax_ep."""
  path = os.pathsep.join([str(target), *site.getsitepackages(),
                          *map(str, after)])
  return subprocess.run([sys.executable, "-S", *args],
                        env=dict(os.environ, PYTHONPATH=path), cwd=cwd,
                        check=False, **kwargs)


def main() -> None:
  argv = sys.argv[1:]
  if "--" not in argv:
    sys.exit("usage: variant.py [--patch FILE ...] -- PYTHON_ARGS...")
  split = argv.index("--")
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patch", action="append", default=[],
                      type=lambda p: pathlib.Path(p).resolve(),
                      help="a `git diff` to apply to the copy (repeatable)")
  options = parser.parse_args(argv[:split])
  with tempfile.TemporaryDirectory(prefix="jax_ep_variant_") as tmp:
    source, target = pathlib.Path(tmp, "src"), pathlib.Path(tmp, "site")
    copy_tracked(source)
    for patch in options.patch:
      subprocess.run(["git", "apply", str(patch)], cwd=source, check=True)
    build(source, target)
    sys.exit(run_python(target, argv[split + 1:], cwd=tmp,
                        after=(source,)).returncode)


if __name__ == "__main__":
  main()
