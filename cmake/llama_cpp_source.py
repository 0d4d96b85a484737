"""Obtain the llama.cpp source pyrestkv builds against, and apply patches/*.patch to a copy.

Called by CMakeLists.txt at configure time:

    python cmake/llama_cpp_source.py --dest BUILD/llama.cpp --patches patches \
        --overlay native/llama=. --overlay native/ggml=ggml/src [--source DIR]

Where the source comes from:
  * --source DIR (or the environment variable PYRESTKV_LLAMA_CPP_DIR): a llama.cpp checkout at
    commit 0c1e570 (the tree vendored in llama-cpp-python 0.3.36). It is copied, never modified.
  * otherwise the llama-cpp-python 0.3.36 sdist, fetched once with pip into a cache
    (PYRESTKV_CACHE_DIR, default ~/.cache/pyrestkv) and checked against its pinned sha256.

After the patches, our own files are laid over the tree (--overlay DIR=PATH, once per folder): the
files of native/llama/ at the same paths under the tree's root (our eviction API, query window and
scoring pass under src/, their headers under include/), and those of native/ggml/ under ggml/src/
(the fused scoring op: the shared arithmetic, the CPU code, the CUDA and Metal kernels), so that
llama.cpp's and ggml's own builds compile them. An overlay file never replaces an upstream one; the
patches only hook our files into upstream ones.

The patched copy is rebuilt only when the source, a patch or an overlay file changes (a stamp file
records them), so incremental builds stay incremental.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"


def fail(msg: str) -> None:
    print(f"pyrestkv: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("PYRESTKV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pyrestkv"
    )
    return Path(root)


def fetch_sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded with pip on first use."""
    cache = cache_dir()
    sdist = cache / SDIST_NAME
    if sdist.exists() and sha256_of(sdist) == SDIST_SHA256:
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", tmp,
        ]
        print("pyrestkv: fetching " + SDIST_NAME + " with pip", file=sys.stderr)
        if subprocess.run(cmd).returncode != 0:
            fail(
                f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} from PyPI. "
                f"Put {SDIST_NAME} into {cache}, or point PYRESTKV_LLAMA_CPP_DIR at a llama.cpp "
                f"checkout of commit {LLAMA_CPP_COMMIT}."
            )
        got = Path(tmp) / SDIST_NAME
        if not got.exists():
            fail(f"pip did not produce {SDIST_NAME} (got: {os.listdir(tmp)})")
        digest = sha256_of(got)
        if digest != SDIST_SHA256:
            fail(f"{SDIST_NAME} has sha256 {digest}, expected the pinned {SDIST_SHA256}")
        os.replace(got, sdist)
    return sdist


def extract_vendor(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(VENDOR_PREFIX) or not (m.isfile() or m.isdir()):
                continue
            rel = m.name[len(VENDOR_PREFIX):]
            # the sdist carries llama.cpp's git metadata as a gitfile pointing outside the tree
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def apply_patches(tree: Path, patches: list[Path]) -> None:
    # tree may sit inside another git checkout (our build directory does): stop git from finding
    # it, or `git apply` would take paths as relative to that checkout and silently skip them
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.resolve().parent))
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)

    def git_apply(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "apply", "--whitespace=nowarn", *args], cwd=tree, env=env,
                              capture_output=True, text=True)

    for patch in patches:
        patch = patch.resolve()
        check = git_apply("--check", str(patch))
        if check.returncode != 0:
            fail(
                f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT}:\n{check.stderr}"
                f"pyrestkv needs exactly the llama.cpp vendored in llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}."
            )
        done = git_apply(str(patch))
        if done.returncode != 0 or git_apply("--reverse", "--check", str(patch)).returncode != 0:
            fail(f"patch {patch.name} did not apply cleanly:\n{done.stderr}")
        print(f"pyrestkv: applied {patch.name}", file=sys.stderr)


def overlay_files(spec: str) -> list[tuple[Path, Path]]:
    """(our file, its path in the llama.cpp tree) for an overlay DIR=PATH, in a stable order."""
    folder, sep, dest = spec.partition("=")
    if not sep:
        fail(f"--overlay takes DIR=PATH (a folder of ours and where it goes in the tree), got {spec!r}")
    overlay = Path(folder)
    if not overlay.is_dir():
        fail(f"overlay folder {overlay} does not exist")
    return [(f, Path(dest) / f.relative_to(overlay)) for f in sorted(overlay.rglob("*")) if f.is_file()]


def apply_overlay(tree: Path, files: list[tuple[Path, Path]]) -> None:
    for src, rel in files:
        dst = tree / rel
        if dst.exists():
            fail(f"overlay file {src} would replace llama.cpp's own {rel}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def sync_tree(src: Path, dst: Path) -> None:
    """Make dst a copy of src, rewriting only files whose bytes differ, so that the build
    recompiles only what a patch change touched."""
    dst.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for root, _dirs, files in os.walk(src):
        rel_root = Path(root).relative_to(src)
        (dst / rel_root).mkdir(parents=True, exist_ok=True)
        for name in files:
            rel = rel_root / name
            wanted.add(rel)
            s, d = src / rel, dst / rel
            if d.exists() and d.stat().st_size == s.stat().st_size and d.read_bytes() == s.read_bytes():
                continue
            shutil.copy2(s, d)
    for root, _dirs, files in os.walk(dst):
        for name in files:
            rel = Path(root).relative_to(dst) / name
            if rel not in wanted and rel.name != ".pyrestkv-stamp":
                (dst / rel).unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--patches", required=True, type=Path)
    ap.add_argument("--overlay", action="append", default=[],
                    help="DIR=PATH: the files of our folder DIR laid over the tree at PATH (repeatable)")
    ap.add_argument("--source", default=os.environ.get("PYRESTKV_LLAMA_CPP_DIR") or "")
    args = ap.parse_args()

    patches = sorted(args.patches.glob("*.patch"))
    stamp_hash = hashlib.sha256()
    if args.source:
        source = Path(args.source).expanduser().resolve()
        if not (source / "include" / "llama.h").exists():
            fail(f"{source} is not a llama.cpp checkout (no include/llama.h)")
        stamp_hash.update(f"dir:{source}".encode())
    else:
        sdist = fetch_sdist()
        stamp_hash.update(f"sdist:{SDIST_SHA256}".encode())
    for p in patches:
        stamp_hash.update(p.name.encode() + p.read_bytes())
    overlay = [f for spec in args.overlay for f in overlay_files(spec)]
    for src, rel in overlay:
        stamp_hash.update(str(rel).encode() + src.read_bytes())
    stamp = stamp_hash.hexdigest()

    stamp_file = args.dest / ".pyrestkv-stamp"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return

    tmp = args.dest.with_name(args.dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.source:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".git", "build*"))
    else:
        extract_vendor(sdist, tmp)
    apply_patches(tmp, patches)
    apply_overlay(tmp, overlay)
    # the stamp goes last, so an interrupted run never leaves a half-synced tree behind a valid stamp
    stamp_file.unlink(missing_ok=True)
    sync_tree(tmp, args.dest)
    shutil.rmtree(tmp)
    stamp_file.write_text(stamp)


if __name__ == "__main__":
    main()
