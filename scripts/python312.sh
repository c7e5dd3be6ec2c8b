#!/bin/sh
# Runs Python 3.12: a plain `python3.12` where it works, else pyenv's 3.12.
if python3.12 -c '' 2>/dev/null; then exec python3.12 "$@"; fi
version=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.[0-9]+)?$' | tail -n 1)
if [ -n "$version" ]; then PYENV_VERSION=$version exec python3.12 "$@"; fi
echo "error: Python 3.12 not found (tried python3.12 and pyenv); install it" >&2
exit 1
