"""Loads the WGSL sources in kernels/ and specializes them by substituting {{NAME}} placeholders."""
import functools
import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# Installed wheels carry the sources inside the package (lab/kernels); a source checkout has them at the root.
_CANDIDATES = [_HERE.parent / "kernels", _HERE.parent.parent / "kernels"]


def kernel_dir():
    for d in _CANDIDATES:
        if (d / "matmul.wgsl").is_file():
            return d
    raise FileNotFoundError("WGSL kernel sources not found; looked in: " + ", ".join(map(str, _CANDIDATES)))


@functools.lru_cache(maxsize=None)
def source(name, includes=()):
    """kernels/<name>.wgsl with every `#include other` line replaced by kernels/other.wgsl (WGSL has no
    includes; module-scope declarations may come in any order, so placement does not matter). `includes`,
    (other, instead) pairs, swaps an included file for a variant of it (e.g. a device's subgroup reductions)."""
    text = (kernel_dir() / f"{name}.wgsl").read_text()
    instead = dict(includes)
    return re.sub(r"^#include (\w+)$", lambda m: source(instead.get(m.group(1), m.group(1)), includes), text,
                  flags=re.M)


def specialize(name, includes=(), **subs):
    """The source of kernels/<name>.wgsl (with `includes` as for source()) with every {{KEY}} replaced; a
    placeholder left over is an error."""
    text = source(name, tuple(includes))
    for key, value in subs.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)))
    if left:
        raise ValueError(f"kernel {name}.wgsl: no value given for placeholder(s) {left}")
    return text
