"""Raise the C++ standard that pinned upstream build scripts pass to the compiler, for torch 2.13's headers.

    python docker/patch_cxx_std.py flash-attn  SRC/setup.py                # flash-attn 2.8.3
    python docker/patch_cxx_std.py deepspeed   SRC/op_builder/builder.py   # deepspeed 0.19.6

torch 2.13's headers use C++20 (bit-field default initialisers in c10/core/AutogradState.h, designated
initialisers in c10/util/StringUtil.h). g++ only warns at -std=c++17, but nvcc's front end stops there.
- flash-attn 2.8.3's setup.py passes "-std=c++17" to g++ and nvcc (fixed upstream on main only, PR #2899).
- deepspeed 0.19.6's CUDAOpBuilder.nvcc_args picks -std=c++20 only for CUDA 12.5+ *of major 12*, so CUDA
  13 gets -std=c++17 (its cxx_args already use C++20 for torch >= 2.12).
Each rewrite names the exact upstream text it replaces and fails loudly when that text is not there
(another version of the file): the image build then stops here instead of at an nvcc error an hour later.
Standard library only; the Dockerfile's builder stage runs it and tests/test_image_on_cpu.py runs it on the
real sdists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TARGET_STD = "c++20"
# flash-attn: every quoted "-std=c++17" (the nvcc flags, the host-compiler flags, and the ROCm branch's).
FLASH_ATTN_OLD = '"-std=c++17"'
FLASH_ATTN_NEW = f'"-std={TARGET_STD}"'
# deepspeed: the one condition that sends CUDA 13 down the C++17 branch.
DEEPSPEED_OLD = "if cuda_major == 12 and cuda_minor >= 5:"
DEEPSPEED_NEW = "if (cuda_major, cuda_minor) >= (12, 5):"


class PatchError(RuntimeError):
    pass


def patch_flash_attn(text: str, where: str = "setup.py") -> str:
    count = text.count(FLASH_ATTN_OLD)
    if count == 0:
        raise PatchError(f"{where}: no {FLASH_ATTN_OLD} flag found; this is not flash-attn 2.8.3's setup.py, "
                         "check whether the pinned version still needs the C++20 patch")
    return text.replace(FLASH_ATTN_OLD, FLASH_ATTN_NEW)


def patch_deepspeed(text: str, where: str = "op_builder/builder.py") -> str:
    count = text.count(DEEPSPEED_OLD)
    if count != 1:
        raise PatchError(f"{where}: found {count} copies of {DEEPSPEED_OLD!r}, need exactly 1; this is not "
                         "deepspeed 0.19.6's builder, check whether the pinned version still needs the patch")
    return text.replace(DEEPSPEED_OLD, DEEPSPEED_NEW)


PATCHES = {"flash-attn": patch_flash_attn, "deepspeed": patch_deepspeed}


def standards(text: str) -> set[str]:
    """The C++ standards a build script names in quoted -std= flags, e.g. {'c++17'}."""
    return set(re.findall(r"""["']-std=(c\+\+\d+)["']""", text))


def patch_file(package: str, path: Path) -> None:
    if package not in PATCHES:
        raise PatchError(f"no C++-standard patch for {package!r}; known: {sorted(PATCHES)}")
    path.write_text(PATCHES[package](path.read_text(), str(path)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: patch_cxx_std.py {{{','.join(PATCHES)}}} FILE", file=sys.stderr)
        return 2
    try:
        patch_file(argv[0], Path(argv[1]))
    except (PatchError, OSError) as e:
        print(f"patch_cxx_std: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"patch_cxx_std: {argv[0]} {argv[1]} now builds with -std={TARGET_STD}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
