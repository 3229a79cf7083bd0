"""The WGSL sources' assembly (lab/engine/kernels.py: `#include`, {{NAME}} placeholders) and that every module
compiles, every entry point of it, on the device: an entry point no op test reaches still has to build."""
import re

import pytest

from lab.engine import kernels

# a value for each placeholder the backend fills (optim_many's and sumsq_many's BINDINGS are generated per use)
SUBS = {"ENABLE": "", "A_ELEM": "f32", "B_ELEM": "f32", "TRANS_A": "false", "TRANS_B": "true", "UNARY": "u_gelu",
        "SCALAR": "s_pow", "BINARY": "b_maximum", "COMBINE": "r_max", "MAP": "m_square", "IDENTITY": "0.0",
        "RWG": 64, "KIND": 1, "D": 64, "DPT": 1, "ROWS": 4, "TN_NN": 32, "TN": 32, "BQ": 16, "BK": 32, "TY": 8,
        "D4": 16, "SUMS": "true", "GELU_GRAD": "true"}   # (the epilogues' code compiled, not dropped as untaken)


def _kernel_files():
    return sorted(p.stem for p in kernels.kernel_dir().glob("*.wgsl") if "@compute" in p.read_text())


@pytest.mark.parametrize("kernel", [k for k in _kernel_files() if k not in ("optim_many", "sumsq_many")])
def test_every_kernel_entry_point_compiles(wgpu_backend, kernel):
    text = kernels.source(kernel, wgpu_backend._includes)
    subs = tuple((k, SUBS[k]) for k in sorted(set(re.findall(r"\{\{(\w+)\}\}", text))))
    entries = re.findall(r"@compute @workgroup_size\([^)]*\)\s*fn (\w+)", text)
    assert entries, f"{kernel}.wgsl: no entry point found"
    for entry in entries:
        wgpu_backend._pipeline(kernel, entry, subs)


def _dir(tmp_path, monkeypatch, **files):
    for name, text in files.items():
        (tmp_path / f"{name}.wgsl").write_text(text)
    monkeypatch.setattr(kernels, "kernel_dir", lambda: tmp_path)
    kernels.source.cache_clear()


@pytest.fixture
def fresh_cache():
    kernels.source.cache_clear()
    yield
    kernels.source.cache_clear()   # the real sources again for the tests after


def test_a_file_included_twice_comes_into_the_module_once(tmp_path, monkeypatch, fresh_cache):
    _dir(tmp_path, monkeypatch, flat="const WG: u32 = 256u;\n", helper="#include flat\nfn h() {}\n",
         k="#include flat\n#include helper\n@compute @workgroup_size(WG) fn main() {}\n")
    text = kernels.source("k")
    assert text.count("const WG") == 1 and "fn h()" in text, text


def test_a_missing_include_names_the_file_that_includes_it(tmp_path, monkeypatch, fresh_cache):
    _dir(tmp_path, monkeypatch, k="#include nosuch\n")
    with pytest.raises(FileNotFoundError, match=r"kernel k\.wgsl: `#include nosuch`: no .*nosuch\.wgsl"):
        kernels.source("k")
    with pytest.raises(FileNotFoundError, match=r"no kernel 'absent'"):
        kernels.source("absent")


def test_a_malformed_include_is_one_error_naming_the_file_and_line(tmp_path, monkeypatch, fresh_cache):
    """`#include` lines not of the form `#include NAME` were left in the WGSL for the shader compiler to reject."""
    for line in ("#include ../flat", "#include", "#include flat // prologue", "#include flat helper"):
        _dir(tmp_path, monkeypatch, flat="const WG: u32 = 1u;\n", k=f"fn f() {{}}\n{line}\n")
        with pytest.raises(ValueError, match=rf"^kernel k\.wgsl: line 2: `{re.escape(line)}` is not a directive"):
            kernels.source("k")
    _dir(tmp_path, monkeypatch, flat="const WG: u32 = 1u;\n", k="    #include flat\n#unroll i < 2\nx$i\n#end")
    assert kernels.source("k") == "const WG: u32 = 1u;\n\nx0\nx1\n"   # indented; an #end ending the file


def test_a_circular_include_is_an_error_that_shows_the_chain(tmp_path, monkeypatch, fresh_cache):
    _dir(tmp_path, monkeypatch, a="#include b\n", b="#include c\n", c="#include a\n")
    with pytest.raises(ValueError, match=r"circular: a -> b -> c -> a"):
        kernels.source("a")
    _dir(tmp_path, monkeypatch, s="#include s\n")
    with pytest.raises(ValueError, match=r"circular: s -> s"):
        kernels.source("s")


def test_a_placeholder_without_a_value_is_an_error(tmp_path, monkeypatch, fresh_cache):
    _dir(tmp_path, monkeypatch, k="const R: u32 = {{RWG}}u;\nfn f() -> u32 { return {{X}}; }\n")
    assert "64u" in kernels.specialize("k", RWG=64, X=1)
    with pytest.raises(ValueError, match=r"kernel k\.wgsl: no value given for placeholder\(s\) \['X'\]"):
        kernels.specialize("k", RWG=64)


def test_unroll_writes_a_block_out_once_per_value_and_nests():
    text = ("#unroll R in 4 8\nfn f$R() {\n    #unroll r < $R / 4\n    acc[$r] += a$r * ${R}u;\n    #end\n}\n"
            "#end\n")
    assert kernels.unroll(text) == ("fn f4() {\n    acc[0] += a0 * 4u;\n}\n"
                                    "fn f8() {\n    acc[0] += a0 * 8u;\n    acc[1] += a1 * 8u;\n}\n")
    assert kernels.unroll("#unroll i < 0\nx\n#end\ny\n") == "y\n"


@pytest.mark.parametrize("text,message", [
    ("#unroll r < 2\nx\n", r"`#unroll r < 2` has no #end"),
    ("x\n#end\n", r"an #end without its #unroll"),
    ("#unroll r < 2\n$q\n#end\n", r"\$q outside an #unroll of that name"),
    ("a ${r}\n", r"\$\{r\} outside an #unroll"),
    ("#unroll r < len(x)\n#end\n", r"`#unroll r < len\(x\)`: the bound must be integer arithmetic giving 0..1024"),
    ("#unroll r < 9**9**9\n#end\n", r"integer arithmetic giving 0..1024"),
    ("#unroll r < 2000\n#end\n", r"integer arithmetic giving 0..1024"),
    ("#unroll r < 4 / 0\n#end\n", r"integer arithmetic giving 0..1024"),
    ("#unroll r < (2\n#end\n", r"integer arithmetic giving 0..1024"),
    ("#unroll r < 2\n#unroll r < 3\n$r\n#end\n#end\n", r"an #unroll r inside another"),
    # a `#` line that is no directive, named with its line (it was taken for another, or reached the compiler)
    ("#unroll r\nx$r\n#end\n", r"line 1: `#unroll r` is not a directive; allowed: `#include NAME`"),
    ("#unroll r from 0 4\nx\n#end\n", r"line 1: `#unroll r from 0 4` is not a directive"),
    ("#unroll r in\nx\n#end\n", r"line 1: `#unroll r in` is not a directive"),
    ("#unrol r < 2\nx\n#end\n", r"line 1: `#unrol r < 2` is not a directive"),
    ("#unroll r < 2\nx\n#end r\n", r"line 3: `#end r` is not a directive"),
    ("fn f() {}\n#pragma unroll\n", r"line 2: `#pragma unroll` is not a directive"),
])
def test_a_malformed_unroll_is_one_error_that_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=r"^kernel k\.wgsl: .*" + message):
        kernels.unroll(text, "kernel k.wgsl")


def test_the_matmul_inner_loops_index_their_accumulators_by_constants():
    """The 35.8 against 32.1 TFLOP/s of the header: one FMA per statement, and no accumulator indexed by a loop
    variable (in loops over rows, naga's index clamps kept them out of registers on the H200)."""
    text = kernels.specialize("matmul_aligned", ENABLE="", A_ELEM="f32", B_ELEM="f32", SUMS="false", GELU_GRAD="false")
    fmas = re.findall(r"^\s*acc\[([^\]]*)\] \+= (.*);$", text, flags=re.M)
    assert len(fmas) == 4 * 4 + 4 * 8 + 4 + 8 + 16, len(fmas)   # nn, nn128 | tn, tn128 | wide
    assert all(re.fullmatch(r"[\d +*]+", i) and expr.count("*") == 1 and "+" not in expr for i, expr in fmas), fmas
