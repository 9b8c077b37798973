"""Can the built CUDA kernels run on this GPU? A clear error instead of "no kernel image".

The extension records its ``TORCH_CUDA_ARCH_LIST`` (``fused_flat.backends._native.build_info()
["cuda_archs"]``, default "8.0;9.0+PTX"). CUDA's rules:

* SASS built for ``sm_XY`` runs on devices of the same major version X with minor >= Y
  (sm_80 code runs on sm_86 / sm_89; sm_90 code on 9.x). Arch-specific targets
  (``9.0a``) run only on exactly that capability.
* PTX built for ``compute_XY`` (the ``+PTX`` suffix) is JIT-compiled by the driver on any
  device with capability >= X.Y (the first load takes a while; then it is cached).

``check_capability`` is a pure function of (capability, arch list), tested on CPU;
``check_device`` applies it to a live device once per device.
"""
from __future__ import annotations

from typing import NamedTuple


class Arch(NamedTuple):
    major: int
    minor: int
    ptx: bool        # PTX for this arch is embedded (forward-compatible via JIT)
    specific: bool   # an arch-specific target such as 9.0a: exact match only


def parse_arch_list(archs: str) -> list[Arch]:
    """'8.0;9.0+PTX' (also space/comma separated, '9.0a', named lists are not supported)."""
    out = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        if ptx:
            item = item[:-4]
        specific = item[-1:] in ("a", "f")
        if specific:
            item = item[:-1]
        try:
            major, minor = (int(x) for x in item.split("."))
        except ValueError:
            raise ValueError(f"cannot parse CUDA arch {item!r} in {archs!r}") from None
        out.append(Arch(major, minor, ptx, specific))
    return out


def runs_on(arch: Arch, capability: tuple[int, int]) -> str | None:
    """How code built for ``arch`` runs on a device of ``capability``: 'sass', 'ptx', or None."""
    major, minor = capability
    if arch.specific:
        return "sass" if (major, minor) == (arch.major, arch.minor) else None
    if major == arch.major and minor >= arch.minor:
        return "sass"
    if arch.ptx and (major, minor) >= (arch.major, arch.minor):
        return "ptx"
    return None


def check_capability(capability: tuple[int, int], archs: str) -> str:
    """'sass' or 'ptx' when the build can run on a GPU of this compute capability; raises
    RuntimeError with the fix otherwise."""
    parsed = parse_arch_list(archs)
    ways = [w for w in (runs_on(a, tuple(capability)) for a in parsed) if w]
    if "sass" in ways:
        return "sass"
    if "ptx" in ways:
        return "ptx"
    cc = f"{capability[0]}.{capability[1]}"
    built = ", ".join(f"sm_{a.major}{a.minor}{'a' if a.specific else ''}"
                      f"{' (+PTX)' if a.ptx else ''}" for a in parsed) or "no CUDA architecture"
    raise RuntimeError(
        f"fused_flat: this GPU has compute capability {cc} (sm_{capability[0]}{capability[1]}), "
        f"but the CUDA kernels were built for {built} (TORCH_CUDA_ARCH_LIST={archs!r}), none of "
        f"which can run on it. Rebuild for this GPU: TORCH_CUDA_ARCH_LIST=\"{cc}\" "
        f"pip install --no-build-isolation -e . (or `make build TORCH_CUDA_ARCH_LIST={cc}`), "
        f"or use backend='triton' / 'reference'.")


_checked: dict[int, str] = {}


def check_device(device) -> str:
    """check_capability for a live CUDA device against the built extension (cached)."""
    import torch

    from fused_flat.backends import _native

    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _checked:
        archs = _native.build_info().get("cuda_archs", "")
        _checked[idx] = check_capability(torch.cuda.get_device_capability(idx), archs)
    return _checked[idx]
