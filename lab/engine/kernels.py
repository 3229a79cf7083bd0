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
    includes; module-scope declarations may come in any order, so placement does not matter). A file comes in
    once per module (a second `#include` of it is dropped: its declarations would be duplicates). `includes`,
    (other, instead) pairs, swaps an included file for a variant of it (e.g. a device's subgroup reductions)."""
    return _expand(name, dict(includes), (), set())


def _expand(name, instead, chain, done):
    path = kernel_dir() / f"{name}.wgsl"
    if not path.is_file():
        raise FileNotFoundError(f"kernel {chain[-1]}.wgsl: `#include {name}`: no {path}" if chain
                                else f"no kernel {name!r}: {path} does not exist")
    done.add(name)

    def include(m):
        other = instead.get(m.group(1), m.group(1))
        if other in chain + (name,):
            raise ValueError(f"kernel {name}.wgsl: `#include {other}` is circular: "
                             + " -> ".join(chain + (name, other)))
        return "" if other in done else _expand(other, instead, chain + (name,), done)
    return re.sub(r"^#include (\w+)$", include, path.read_text(), flags=re.M)


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
