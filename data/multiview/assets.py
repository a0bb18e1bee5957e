"""Where the small real geometry sets live, and a fetcher that needs no root.

Four real sets score VGGT-S outside the synthetic scenes (readers in :mod:`data.multiview.visp`
and :mod:`data.multiview.pairs`):

=================  =========================================  ==============================================
set                shipped by                                 files read
=================  =========================================  ==============================================
``castle_simu``    Debian ``visp-images-data``                ``ViSP-images/mbt-depth/Castle-simu``
``castel``         Debian ``visp-images-data``                ``ViSP-images/mbt-depth/castel``
``graf``           Debian ``opencv-doc``                      ``examples/data/{graf1,graf3}.png, H1to3p.xml``
``motorcycle``     PyPI ``scikit-image`` (in the wheel)        ``skimage/data/motorcycle_{left,right}.png,
                                                              motorcycle_disp.npz``
=================  =========================================  ==============================================

Each root is looked up in order: an explicit argument, the environment (``VISP_INPUT_IMAGE_PATH`` is
ViSP's own variable; ``SVD_VGGT_ASSETS`` points at a fetched tree), the system install
(``apt-get install visp-images-data opencv-doc``, ``pip install scikit-image``) and finally
``<venv>/share/svd-vggt/geometry``, where ``python -m data.multiview.assets fetch`` puts them:
``apt-get download`` + ``dpkg-deb --fsys-tarfile`` (no root) for the Debian packages and
``pip download --no-deps`` of the scikit-image wheel, of which only the three motorcycle files are
unpacked (the package is never installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

VISP_SUBDIR = "usr/share/visp-images-data/ViSP-images"
OPENCV_SUBDIR = "usr/share/doc/opencv-doc/examples/data"
SKIMAGE_SUBDIR = "skimage/data"
SKIMAGE_WHEEL = "scikit-image==0.26.0"
MOTORCYCLE_FILES = ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz")
GRAF_FILES = ("graf1.png", "graf3.png", "H1to3p.xml")


def default_share() -> Path:
    """``$SVD_VGGT_ASSETS`` or ``<sys.prefix>/share/svd-vggt/geometry`` (the venv's share dir)."""
    env = os.environ.get("SVD_VGGT_ASSETS")
    return Path(env) if env else Path(sys.prefix) / "share" / "svd-vggt" / "geometry"


def _first_dir(candidates: list[Path], marker: str) -> Path | None:
    for path in candidates:
        if (path / marker).exists():
            return path
    return None


def _missing(what: str, package: str, looked: list[Path]) -> FileNotFoundError:
    tried = ", ".join(str(p) for p in looked)
    return FileNotFoundError(
        f"{what} not found (looked in: {tried}). It ships in {package}: run "
        f"`python -m data.multiview.assets fetch` (downloads it without root into {default_share()}), "
        f"or install {package}, or pass the folder explicitly."
    )


def visp_root(root: str | Path | None = None) -> Path:
    """The ``ViSP-images`` folder (holding ``mbt-depth/``) of Debian ``visp-images-data``."""
    looked = [Path(root)] if root is not None else []
    if root is None:
        if os.environ.get("VISP_INPUT_IMAGE_PATH"):
            looked.append(Path(os.environ["VISP_INPUT_IMAGE_PATH"]))
        looked += [Path("/") / VISP_SUBDIR, default_share() / VISP_SUBDIR]
    found = _first_dir(looked, "mbt-depth")
    if found is None:
        raise _missing("ViSP-images/mbt-depth (Castle-simu, castel)", "the Debian package visp-images-data", looked)
    return found


def opencv_data_root(root: str | Path | None = None) -> Path:
    """The opencv-doc ``examples/data`` folder holding ``graf1.png``, ``graf3.png``, ``H1to3p.xml``."""
    looked = [Path(root)] if root is not None else [Path("/") / OPENCV_SUBDIR, default_share() / OPENCV_SUBDIR]
    found = _first_dir(looked, "H1to3p.xml")
    if found is None:
        raise _missing("the graf pair with H1to3p.xml", "the Debian package opencv-doc", looked)
    return found


def skimage_data_root(root: str | Path | None = None) -> Path:
    """A folder with scikit-image's ``motorcycle_{left,right}.png`` and ``motorcycle_disp.npz``."""
    looked = [Path(root)] if root is not None else []
    if root is None:
        spec = importlib.util.find_spec("skimage")
        if spec is not None and spec.submodule_search_locations:
            looked.append(Path(list(spec.submodule_search_locations)[0]) / "data")
        looked.append(default_share() / SKIMAGE_SUBDIR)
    found = _first_dir(looked, "motorcycle_disp.npz")
    if found is None:
        raise _missing("the Middlebury motorcycle pair", f"the PyPI package scikit-image ({SKIMAGE_WHEEL})", looked)
    return found


# ----------------------------------------------------------------------------- fetching
def _extract_deb(deb: Path, dest: Path, members: list[str]) -> None:
    """Unpack the given member prefixes of a .deb's data tarball into ``dest`` (no root, no maintainer scripts)."""
    tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as buf:
        buf.write(tar_bytes)
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tar:
            wanted = [m for m in tar.getmembers() if any(m.name.lstrip("./").startswith(p) for p in members)]
            if not wanted:
                raise RuntimeError(f"{deb.name} holds none of {members}")
            tar.extractall(dest, members=wanted, filter="data")


def fetch(dest: Path, work: Path | None = None) -> Path:
    """Download and unpack the three sources into ``dest`` (see module docstring); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp_path = Path(tmp)
        subprocess.run(["apt-get", "download", "visp-images-data", "opencv-doc"], cwd=tmp, check=True)
        debs = {p.name.split("_")[0]: p for p in tmp_path.glob("*.deb")}
        _extract_deb(debs["visp-images-data"], dest, [f"{VISP_SUBDIR}/mbt-depth/"])
        _extract_deb(debs["opencv-doc"], dest, [f"{OPENCV_SUBDIR}/{name}" for name in GRAF_FILES])
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SKIMAGE_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(tmp_path.glob("scikit_image-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            for name in MOTORCYCLE_FILES:
                zf.extract(f"{SKIMAGE_SUBDIR}/{name}", dest)
    log.info("geometry assets in %s", dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("fetch", help="apt-get download + dpkg-deb -x, pip download; no root, nothing installed")
    cmd.add_argument("--dest", type=Path, default=None, help="target folder (default: the venv's share dir)")
    sub.add_parser("where", help="print where each set is found (or why not)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "fetch":
        fetch(args.dest or default_share())
        return
    for name, finder in (("visp", visp_root), ("opencv-doc", opencv_data_root), ("skimage", skimage_data_root)):
        try:
            log.info("%s: %s", name, finder())
        except FileNotFoundError as err:
            log.info("%s: %s", name, err)


if __name__ == "__main__":
    main()
