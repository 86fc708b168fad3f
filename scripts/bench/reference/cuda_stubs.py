#!/usr/bin/env python3
"""Stand-in CUDA libraries so that `import torch` works from the torch wheel in .forge/py on a
machine without them.

On a CPU machine `scripts/setup.sh` installs the PyPI torch 2.13.0 wheel without its
dependencies (forge links only libtorch_cpu.so and needs nothing else). Python's `torch._C`,
however, links libtorch_cuda.so, which links cuBLAS, cuDNN, NCCL, cuFFT, ... (about 2 GB of
NVIDIA wheels). None of them is ever called on a machine without a GPU: this script builds,
for each such library that cannot be found, a tiny shared library with the same soname that
defines exactly the (versioned) symbols torch's libraries import from it; every one of them
traps if it is ever called. The benchmark venv preloads them before torch.

Usage: cuda_stubs.py TORCH_LIB_DIR OUT_DIR   (needs nm, readelf, ldd and a C compiler)
"""

import os
import re
import shutil
import subprocess
import sys

# Libraries that export unversioned symbols: which prefix belongs to which soname.
UNVERSIONED = [
    ("cusparseLt", "libcusparseLt.so"),
    ("cuFile", "libcufile.so"),
    ("nccl", "libnccl.so"),
    ("nvshmem", "libnvshmem_host.so"),
    ("curand", "libcurand.so"),
    ("cudnn", "libcudnn.so"),
]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    lib_dir, out = sys.argv[1], sys.argv[2]
    libs = sorted(
        os.path.join(lib_dir, f) for f in os.listdir(lib_dir) if f.endswith(".so") or ".so." in f
    )
    # sonames that the dynamic linker cannot find (RPATHs of the torch wheel included)
    missing = set()
    for lib in libs:
        for line in run("ldd", lib).splitlines():
            m = re.match(r"\s*(\S+) => not found", line)
            # never the driver (libcuda.so.1): only libcaffe2_nvrtc.so links it, loaded
            # on demand, and the CUDA runtime must keep finding no driver on such a machine
            if m and not m.group(1).startswith("libcuda.so"):
                missing.add(m.group(1))
    if not missing:
        print("cuda_stubs: every library torch links is present; no stubs needed")
        return
    # version name -> soname, from the version-needs sections
    version_file = {}
    for lib in libs:
        current = None
        for line in run("readelf", "-V", "-W", lib).splitlines():
            m = re.search(r"File: (\S+)", line)
            if m:
                current = m.group(1)
                continue
            m = re.search(r"Name: (\S+)\s+Flags", line)
            if m and current:
                version_file[m.group(1)] = current
    defined, undefined = set(), set()
    for lib in libs:
        for line in run("nm", "-D", "--defined-only", lib).splitlines():
            parts = line.split()
            if len(parts) >= 3:
                defined.add(parts[2].split("@")[0])
        for line in run("nm", "-D", "--undefined-only", "--with-symbol-versions", lib).splitlines():
            parts = line.split()
            if parts:
                undefined.add(parts[-1])
    # soname -> {version name or None: symbols}
    wanted = {so: {} for so in missing}
    for sym in undefined:
        name, _, version = sym.partition("@")
        version = version.lstrip("@")
        if version:
            so = version_file.get(version)
            if so in wanted:
                wanted[so].setdefault(version, set()).add(name)
        elif name not in defined:
            for prefix, so_base in UNVERSIONED:
                if name.startswith(prefix):
                    for so in wanted:
                        if so.startswith(so_base + "."):
                            wanted[so].setdefault(None, set()).add(name)
                    break
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        sys.exit("cuda_stubs: no C compiler (cc/gcc) found: install one (Debian: apt-get install gcc)")
    os.makedirs(out, exist_ok=True)
    for so in sorted(wanted):
        by_version = wanted[so]
        names = sorted(set().union(*by_version.values())) if by_version else []
        src = os.path.join(out, so + ".c")
        script = os.path.join(out, so + ".map")
        with open(src, "w") as f:
            f.write(f"/* stand-in for {so}: every function traps (never called on a machine without CUDA) */\n")
            for n in names:
                f.write(f"void {n}(void) {{ __builtin_trap(); }}\n")
        with open(script, "w") as f:
            versions = sorted(v for v in by_version if v)
            plain = sorted(by_version.get(None, ()))
            if not versions:
                f.write("{\n global:\n" + "".join(f"  {n};\n" for n in plain) + " local: *;\n};\n")
            for i, v in enumerate(versions):
                syms = sorted(by_version[v]) + (plain if i == 0 else [])
                f.write(f"{v} {{\n global:\n" + "".join(f"  {n};\n" for n in syms) + " local: *;\n};\n")
        cmd = [cc, "-shared", "-fPIC", "-o", os.path.join(out, so), f"-Wl,-soname,{so}", src]
        if names:
            cmd.insert(-1, f"-Wl,--version-script={script}")
        subprocess.run(cmd, check=True)
        os.remove(src)
        os.remove(script)
        print(f"cuda_stubs: {so}: {len(names)} symbols")


if __name__ == "__main__":
    main()
