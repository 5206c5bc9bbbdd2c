"""All DIALS / dxtbx / cctbx glue that depends on how they were installed.

Everything version- or packaging-specific lives here, so the rest of the
package can import DIALS as if it were a complete conda-forge build.

Quirks handled:

* **LIBTBX_BUILD.** In a venv made from Debian's ``/usr/bin/python3`` with
  ``--system-site-packages``, libtbx looks for ``<venv>/lib/cctbx/python3.11``
  and fails with ``FileNotFoundError``. Pointing ``LIBTBX_BUILD`` at Debian's
  build directory fixes it; it must be set before libtbx is first imported.
* **xfel_mono_sim_ext.** Debian's cctbx lacks this extension. Stills indexing
  (``dials.algorithms.indexing.nave_parameters``) imports
  ``xfel.mono_simulation.max_like``, whose package ``__init__`` imports the
  missing extension; the ImportError is swallowed per candidate lattice and
  every still ends as "No suitable indexing solution found". ``max_like.py``
  and ``util.py`` are pure Python, so we register the package without running
  its ``__init__``. On a cctbx that has the extension this does nothing.
* **Unused heavy imports.** ``dxtbx.model.detector_helpers`` imports
  ``sklearn.cluster`` (for one multi-panel 2D projection of the image
  viewers) and ``dials.array_family.flex_ext`` imports ``pandas`` (for one
  reflection-table method): 1 s of every start. :func:`defer_imports` puts
  stand-ins in ``sys.modules`` that import the real module at its first
  attribute access, so nothing changes but the time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

_DEBIAN_LIBTBX_BUILD = "/usr/lib/cctbx/python{}.{}".format(*sys.version_info[:2])


def prepare_environment() -> None:
    """Set LIBTBX_BUILD when needed, BLAS to one thread, and install the mono_simulation shim."""
    if not os.environ.get("LIBTBX_BUILD") and os.path.isdir(_DEBIAN_LIBTBX_BUILD):
        # only needed when running from a venv; harmless for /usr/bin/python3
        if sys.prefix != sys.base_prefix:
            os.environ["LIBTBX_BUILD"] = _DEBIAN_LIBTBX_BUILD
    single_threaded_blas()
    install_mono_simulation_shim()


#: the BLAS libraries' thread-count variables (OpenBLAS, as Debian's numpy uses; MKL; BLIS)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def single_threaded_blas() -> list[str]:
    """One BLAS thread, unless the user set a count: the programs run one process per core
    (``nproc``, MPI), and BLAS threads on top oversubscribe the cores. The scaling fits'
    tall-and-thin products are where it showed: OpenBLAS's idle threads spin, and a merge of
    160 XFEL shots cost 19 s user + 14 s system CPU instead of 18 + 0.7 s, with the same map.
    Takes effect only before numpy loads its BLAS (the console scripts import this first).
    Returns the variables set."""
    if "numpy" in sys.modules:
        return []
    done = [name for name in BLAS_THREAD_VARIABLES if name not in os.environ]
    for name in done:
        os.environ[name] = "1"
    return done


class _Deferred(types.ModuleType):
    """Stands in for a module not imported yet: any attribute imports the real one, except
    ``__file__`` and ``__cached__`` (``inspect.getmodule``, run by libtbx at import, probes
    every module in ``sys.modules`` for them)."""

    def __getattr__(self, attr):
        if attr in ("__file__", "__cached__"):
            raise AttributeError(attr)
        return getattr(_import_deferred(self.__name__), attr)


def _import_deferred(name: str):
    import importlib

    root = name.partition(".")[0]
    for n in [n for n, m in list(sys.modules.items()) if isinstance(m, _Deferred) and n.partition(".")[0] == root]:
        del sys.modules[n]
    return importlib.import_module(name)


#: modules DIALS imports at start-up but needs only in functions diffuse never calls
DEFERRED_IMPORTS = ("sklearn.cluster", "pandas")


def defer_imports(names=DEFERRED_IMPORTS) -> list[str]:
    """Install :class:`_Deferred` stand-ins for ``names`` (and their parent packages) that are
    installed but not imported yet; returns the names deferred."""
    import importlib.machinery

    done = []
    for name in names:
        root = name.partition(".")[0]
        if root in sys.modules:
            continue
        # each stand-in carries the real module's spec (importlib.util.find_spec returns it;
        # found on the file system, nothing imported)
        specs, spec, path = [], importlib.util.find_spec(root), root
        for part in name.split(".")[1:]:
            if spec is None or not spec.submodule_search_locations:
                spec = None
                break
            specs.append(spec)
            path = f"{path}.{part}"
            spec = importlib.machinery.PathFinder.find_spec(path, list(spec.submodule_search_locations))
        if spec is None:
            continue
        specs.append(spec)
        parent, path = None, ""
        for part, spec in zip(name.split("."), specs):
            path = f"{path}.{part}" if path else part
            module = sys.modules.get(path)
            if module is None:
                module = sys.modules[path] = _Deferred(path)
                module.__spec__ = spec
            if parent is not None:
                setattr(parent, part, module)
            parent = module
        done.append(name)
    return done


def has_mono_sim_extension() -> bool:
    return importlib.util.find_spec("xfel_mono_sim_ext") is not None


def install_mono_simulation_shim() -> bool:
    """Make ``xfel.mono_simulation.max_like`` importable without the extension.

    Returns True if the shim was installed, False if it was not needed (the
    extension exists, the package is already imported, or xfel is absent).
    """
    if has_mono_sim_extension() or "xfel.mono_simulation" in sys.modules:
        return False
    spec = importlib.util.find_spec("xfel")
    if spec is None or not spec.submodule_search_locations:
        return False
    for location in spec.submodule_search_locations:
        pkg_dir = os.path.join(location, "mono_simulation")
        if os.path.isfile(os.path.join(pkg_dir, "max_like.py")):
            break
    else:
        return False
    package = types.ModuleType("xfel.mono_simulation")
    package.__path__ = [pkg_dir]
    package.__package__ = "xfel.mono_simulation"
    package.__file__ = os.path.join(pkg_dir, "__init__.py")
    package.__diffuse_shim__ = True
    sys.modules["xfel.mono_simulation"] = package
    return True


def uninstall_mono_simulation_shim() -> None:
    """Remove the shim (for tests that show indexing fails without it)."""
    package = sys.modules.get("xfel.mono_simulation")
    if package is None or not getattr(package, "__diffuse_shim__", False):
        return
    for name in list(sys.modules):
        if name == "xfel.mono_simulation" or name.startswith("xfel.mono_simulation."):
            del sys.modules[name]


def dials_version() -> str:
    from dials.util.version import dials_version as _dials_version

    return _dials_version()


def exposure_time(imageset, index: int = 0) -> float:
    """Exposure time (s) of image ``index`` (counted within ``imageset``).

    In order:

    * miniCBF header ``Exposure_time``: dxtbx 3.11's miniCBF formats put
      ``Exposure_period`` into the scan, which includes the read-out gap
      (0.020 s instead of 0.019 s for the thaumatin Pilatus stills: a 5% error
      on an absolute scale);
    * the scan's exposure time;
    * full CBF ``_diffrn_scan_frame.integration_time`` (multi-panel stills
      such as FormatCBFMultiTileHierarchyStill have no scan).

    Raises ValueError if none of them gives a positive value.
    """
    from diffuse_cli import image_read

    path = imageset.get_path(index)
    # multi-panel CBF stills: the same header item, without dxtbx's format instance
    # (its detector model costs 0.25 s per CSPAD file)
    value = image_read.still_integration_time(imageset, index)
    if value is not None:
        if value > 0:
            return value
        raise ValueError(f"no exposure time for {path}")
    fmt = None
    try:
        fmt = imageset.get_format_class().get_instance(path)
    except (AttributeError, RuntimeError, OSError):
        fmt = None  # not a file-backed format: fall back to the scan
    header = getattr(fmt, "_cif_header_dictionary", None) or {}
    if "Exposure_time" in header:
        value = float(header["Exposure_time"].split()[0])
        if value > 0:
            return value
    scan = imageset.get_scan() if hasattr(imageset, "get_scan") else None
    if scan is None and fmt is not None and hasattr(fmt, "get_scan"):
        scan = fmt.get_scan()
    if scan is not None:
        times = scan.get_exposure_times()
        if len(times):
            value = float(times[min(index, len(times) - 1)])
            if value > 0:
                return value
    if fmt is not None and hasattr(fmt, "_get_cbf_handle"):
        cbf = fmt._get_cbf_handle()
        try:
            cbf.find_category(b"diffrn_scan_frame")
            cbf.find_column(b"integration_time")
            value = float(cbf.get_value())
        except Exception as e:  # pycbf raises plain Exception for a missing item
            raise ValueError(f"no exposure time in {path}: {e}") from e
        if value > 0:
            return value
    raise ValueError(f"no exposure time for {path}")
