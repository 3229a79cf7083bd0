// tanh and GELU, shared by the elementwise kernels and the matmul's GELU epilogue (`#include activation`).

const SQRT_2_OVER_PI: f32 = 0.7978845608028654;
const GELU_C: f32 = 0.044715;

// NaN from the bits: a compiler may fold x != x to false (lavapipe does)
fn is_nan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }

// tanh(x) = 1 - 2/(exp(2x)+1): stable at both ends, and the builtin is NaN for |x| > ~44 on some drivers. clamp()
// turns a NaN into -20, so u_tanh passes a NaN on by itself. GELU uses the bare form: its factor x already makes
// GELU(NaN) NaN, and the NaN select, inlined into the matmul's GELU epilogue, made every wide matmul about 18x
// slower on the H200 (benchmarks/h200-reliability-before-after.log).
fn tanh_clamped(x: f32) -> f32 { let e = exp(2.0 * clamp(x, -20.0, 20.0)); return 1.0 - 2.0 / (e + 1.0); }
fn u_tanh(x: f32) -> f32 { return select(tanh_clamped(x), x, is_nan(x)); }

// GELU, tanh approximation (GPT-2's "gelu_new").
fn u_gelu(x: f32) -> f32 { return 0.5 * x * (1.0 + tanh_clamped(SQRT_2_OVER_PI * (x + GELU_C * x * x * x))); }
