"""Importing qlora-lite runs no Hugging Face Hub kernel: bitsandbytes asks the ``kernels`` package for
one at import on AVX512-BF16 CPUs (a Hub request, then downloaded code), and we never let it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A stand-in ``kernels`` package that records every call; the child imports our modules after it. On a CPU
# without AVX512-BF16 bitsandbytes never asks, and the test still checks that the package is given back.
CHILD = textwrap.dedent("""
    import sys, types
    calls = []

    def get_kernel(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("no Hub in this test")

    fake = types.ModuleType("kernels")
    fake.get_kernel = get_kernel
    sys.modules["kernels"] = fake
    import qlora_lite.model.bnb, qlora_lite.kernels.lora_4bit, qlora_lite.train.optim
    assert "bitsandbytes" in sys.modules
    assert sys.modules["kernels"] is fake, "the kernels package was not given back after bitsandbytes' import"
    print("get_kernel calls:", calls)
""")


def test_bitsandbytes_is_imported_without_fetching_a_hub_kernel():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "get_kernel calls: []" in done.stdout, done.stdout
    assert "kernels-community" not in done.stderr, done.stderr
