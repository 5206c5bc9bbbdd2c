"""diffuse.merge's start-up: DIALS's unused heavy imports are deferred, not changed.

dxtbx.model imports sklearn.cluster and dials.array_family.flex imports pandas at
module level (1 s of every start); dials_compat.defer_imports puts stand-ins in
sys.modules that import the real module at the first attribute access. Run in a
fresh interpreter (the test process may have imported them already).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import importlib.util, inspect, sys
    from diffuse_cli import dials_compat
    deferred = dials_compat.defer_imports()
    import dials.util.options  # noqa: F401  (as diffuse.merge's parser)
    import dxtbx.model.detector_helpers as dh
    from dials.array_family import flex_ext
    inspect.stack()  # libtbx runs it at import: it probes every module's __file__
    stand_in = dials_compat._Deferred
    print("deferred", sorted(deferred))
    print("still_deferred", sorted(n for n in ("sklearn", "sklearn.cluster", "pandas")
                                   if isinstance(sys.modules.get(n), stand_in)))
    # first use: the real modules, the same objects as a plain import gives
    dbscan = dh.sklearn.cluster.DBSCAN
    frame = flex_ext.pd.DataFrame
    import sklearn.cluster, pandas
    print("real", dbscan is sklearn.cluster.DBSCAN, frame is pandas.DataFrame,
          not isinstance(sys.modules["sklearn"], stand_in), not isinstance(sys.modules["pandas"], stand_in))
    print("cluster_result", list(dbscan(eps=0.1, min_samples=2).fit_predict([[0.0], [0.05], [5.0]])))
""")


def _have(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_have("sklearn") and _have("pandas")), reason="sklearn and pandas not installed")
def test_deferred_imports_load_on_first_use():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["deferred"] == "['pandas', 'sklearn.cluster']"
    # importing DIALS and inspect.stack() did not import them
    assert lines["still_deferred"] == "['pandas', 'sklearn', 'sklearn.cluster']"
    assert lines["real"] == "True True True True"
    # DBSCAN itself works (two points within eps form a cluster, the far one is noise)
    assert lines["cluster_result"] == "[0, 0, -1]"


def test_defer_imports_skips_loaded_and_missing_modules():
    script = ("import sys, numpy\nfrom diffuse_cli import dials_compat\n"
              "print(dials_compat.defer_imports(('numpy', 'no_such_module_xyz')))\n"
              "print(type(sys.modules['numpy']).__name__)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "module"]


def test_deferred_modules_answer_find_spec_without_importing():
    """Libraries probe optional dependencies with importlib.util.find_spec: a stand-in answers
    with the real module's spec (a stand-in without one made find_spec raise ValueError)."""
    if not (_have("sklearn") and _have("pandas")):
        pytest.skip("sklearn and pandas not installed")
    script = textwrap.dedent("""
        import importlib.util, sys
        from diffuse_cli import dials_compat
        dials_compat.defer_imports()
        specs = [importlib.util.find_spec(n) for n in ("pandas", "sklearn", "sklearn.cluster")]
        print([s.name for s in specs], [s.origin.endswith("__init__.py") for s in specs])
        print(all(isinstance(sys.modules[n], dials_compat._Deferred) for n in ("pandas", "sklearn.cluster")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["['pandas', 'sklearn', 'sklearn.cluster'] [True, True, True]", "True"]


@pytest.mark.parametrize("user", [None, "2"])
def test_programs_run_blas_single_threaded_unless_told(user):
    """Importing diffuse_cli before numpy gives OpenBLAS one thread (the programs run one
    process per core); a count the user set is kept. Checked in OpenBLAS itself."""
    import os

    code = textwrap.dedent("""
        import ctypes, os
        import diffuse_cli
        import numpy  # loads the BLAS with the variables set
        names = [l.split()[-1] for l in open('/proc/self/maps') if 'openblas' in l or 'libblas' in l]
        blas = ctypes.CDLL(names[0]) if names else None
        threads = blas.openblas_get_num_threads() if blas is not None and hasattr(blas, 'openblas_get_num_threads') else -1
        print(os.environ.get('OPENBLAS_NUM_THREADS'), threads)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
    if user is not None:
        env["OPENBLAS_NUM_THREADS"] = user
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert out[0] == (user or "1")
    if int(out[1]) >= 0:  # an OpenBLAS is loaded: its own thread count
        assert int(out[1]) == min(int(user or "1"), os.cpu_count())
