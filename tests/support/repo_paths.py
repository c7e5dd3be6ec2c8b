"""Where the tests find things, in one place.

Importing this module puts on `sys.path` the folders the tests import from:
the repository (`jax_ep` from a checkout without installing it, and
`bench`), tests/support (the helpers: `dense_model`, `ep_testing`, ...) and
tests/workers (the worker scripts, which the tests also import as modules).
conftest.py imports it for pytest; a worker run as a script puts this folder
on `sys.path` and imports it before anything else.
"""

from __future__ import annotations

import pathlib
import sys

TESTS = pathlib.Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SUPPORT = TESTS / "support"
WORKERS = TESTS / "workers"

for _folder in (REPO, SUPPORT, WORKERS):
  if str(_folder) not in sys.path:
    sys.path.insert(0, str(_folder))
