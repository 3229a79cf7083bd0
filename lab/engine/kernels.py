"""Loads the WGSL sources in kernels/, joins their `#include`s, expands their `#unroll` blocks and specializes them
by substituting {{NAME}} placeholders."""
import ast
import functools
import operator
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
    return unroll(_expand(name, dict(includes), (), set()), f"kernel {name}.wgsl")


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
    text = path.read_text()
    _check_directives(text, f"kernel {name}.wgsl")
    return re.sub(r"^[ \t]*#include (\w+)[ \t]*\r?$", include, text, flags=re.M)


_DIRECTIVE = re.compile(r"[ \t]*#(include \w+|unroll \w+ in( +\S+)+|unroll \w+ < .*\S|end)[ \t]*")


def _check_directives(text, where):
    """One error naming the line for a `#` line that is none of the directives: WGSL has no `#`, so such a line
    (a typo, `#include ../x`, `#unroll i in` with no values, `#end i`) would otherwise be read as a directive it is
    not, or reach the shader compiler as a syntax error far from its cause."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#") and not _DIRECTIVE.fullmatch(line):
            raise ValueError(f"{where}: line {number}: `{line.strip()}` is not a directive; allowed: `#include NAME`, "
                             "`#unroll NAME in V1 V2 ...`, `#unroll NAME < N` (integer arithmetic), `#end`")


_UNROLL = re.compile(r"^[ \t]*#unroll (\w+) (in|<) (.*?)\r?\n", re.M)
_END = re.compile(r"^[ \t]*#end[ \t\r]*(?:\n|\Z)", re.M)


def unroll(text, where="kernel"):
    """`text` with every block from `#unroll NAME in V1 V2 ...` (or `#unroll NAME < N`, N integer arithmetic:
    0 .. N - 1) to its `#end` written out once per value, $NAME and ${NAME} replaced by it; blocks nest (an inner
    bound may use an outer name). The matmuls' inner loops are written this way: each multiply-add a statement
    of its own with constant indices, whatever the compiler unrolls (in loops over rows, naga's index clamps kept
    the accumulators out of registers: 4-15x slower with LAB_SHADER_CHECKS=1, and the 128 x 128 tiles 1-3%
    slower without, on the H200)."""
    _check_directives(text, where)
    return _unroll(text, where)


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.floordiv}


def _integer_arithmetic(spec):
    """The value of an #unroll bound: integers with + - * / and parentheses (`/` divides as integers, as WGSL's
    u32 does), read by walking its syntax tree (no eval: a kernel file is data); None when it is anything else."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return v if v is None or isinstance(node.op, ast.UAdd) else -v
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            a, b = value(node.left), value(node.right)
            if a is None or b is None or (isinstance(node.op, ast.Div) and b == 0) or max(abs(a), abs(b)) > 1 << 20:
                return None
            return _ARITHMETIC[type(node.op)](a, b)
        return None
    try:
        return value(ast.parse(spec.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def _unroll(text, where):
    m = _UNROLL.search(text)
    if m is None:
        if "$" in text:
            stray = re.search(r"[$][{]?\w*[}]?", text).group()
            raise ValueError(f"{where}: {stray} outside an #unroll of that name")
        if _END.search(text):
            raise ValueError(f"{where}: an #end without its #unroll")
        return text
    name, kind, spec = m.groups()
    depth, pos = 1, m.end()
    while depth:   # the matching #end
        inner, end = _UNROLL.search(text, pos), _END.search(text, pos)
        if end is None:
            raise ValueError(f"{where}: `#unroll {name} {kind} {spec}` has no #end")
        depth, pos = (depth + 1, inner.end()) if inner and inner.start() < end.start() else (depth - 1, end.end())
    if kind == "in":
        values = spec.split()
    else:
        n = _integer_arithmetic(spec)
        if not isinstance(n, int) or not 0 <= n <= 1024:
            raise ValueError(f"{where}: `#unroll {name} < {spec}`: the bound must be integer arithmetic giving 0..1024")
        values = range(n)
    body = text[m.end():end.start()]
    if re.search(r"^[ \t]*#unroll " + name + " ", body, flags=re.M):
        raise ValueError(f"{where}: an #unroll {name} inside another (the outer {name} would replace the inner's)")
    name_re = re.compile(r"\$\{" + name + r"\}|\$" + name + r"\b")
    return _unroll(text[:m.start()] + "".join(name_re.sub(str(v), body) for v in values) + text[end.end():], where)


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
