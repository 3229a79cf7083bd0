// Elementwise maps over float32 tensors.
//   unary_main:  y[i] = f(x[i])
//   scalar_main: y[i] = f(x[i], c)          c = bitcast<f32>(P[1])
//   binary_main: y[i] = f(a[ia], b[ib])     ia, ib from the broadcast strides in P
//   add_into_main: y[i] += b[i]            a running sum kept in place (no third array beside it and its term)
// Specialized per op by substituting {{UNARY}}, {{SCALAR}}, {{BINARY}} with one of the fns below.
// Bindings: @binding(0) P: params (u32), @binding(1) a, @binding(2) b (binary only), @binding(3) y.
// Params: unary/scalar: [n, c]; binary: [n, ndim, shape[MAXDIM], astride[MAXDIM], bstride[MAXDIM]].

#include flat
const MAXDIM: u32 = 6u;

@group(0) @binding(1) var<storage, read> A: array<f32>;
@group(0) @binding(2) var<storage, read> B: array<f32>;
@group(0) @binding(3) var<storage, read_write> Y: array<f32>;

#include activation

// ---- unary ----
fn u_neg(x: f32) -> f32 { return -x; }
fn u_exp(x: f32) -> f32 { return exp(x); }
fn u_log(x: f32) -> f32 { return log(x); }
fn u_sqrt(x: f32) -> f32 { return sqrt(x); }
// a NaN passes, as in numpy: found from the bits, since NVIDIA's compiler turns select(x, 0, x < 0) into a max()
// that drops it, as lavapipe's max() does
fn u_relu(x: f32) -> f32 { return select(max(x, 0.0), x, is_nan(x)); }

// ---- scalar ----
fn s_add(x: f32, c: f32) -> f32 { return x + c; }
fn s_mul(x: f32, c: f32) -> f32 { return x * c; }
fn s_rsub(x: f32, c: f32) -> f32 { return c - x; }
fn s_rdiv(x: f32, c: f32) -> f32 { return c / x; }
fn s_div(x: f32, c: f32) -> f32 { return x / c; }
// x^c as numpy computes it: WGSL's pow() is exp2(c log2 x), undefined for x <= 0, and on lavapipe pow(0, -1) is 0 and
// pow(NaN, c) is 0. So: x^0 = 1 for every x; NaN passes; a finite negative x with a non-integer c is NaN; 0 and inf are
// taken apart (0^-1 = inf, inf^-1 = 0); the sign comes back for a negative x and an odd c.
fn s_pow(x: f32, c: f32) -> f32 {
    let inf = bitcast<f32>(0x7f800000u);
    let integral = fract(c) == 0.0;
    let odd = integral && fract(c * 0.5) != 0.0;
    let ax = abs(x);
    var m = pow(ax, c);
    if (ax == 0.0) { m = select(0.0, inf, c < 0.0); }
    if (ax == inf) { m = select(0.0, inf, c > 0.0); }
    if (x < 0.0 && odd) { m = -m; }
    if ((x < 0.0 && ax != inf && !integral) || is_nan(x)) { m = bitcast<f32>(0x7fc00000u); }  // (-inf)^1.5 = inf (C99)
    return select(m, 1.0, c == 0.0);
}

// ---- binary ----
fn b_add(a: f32, b: f32) -> f32 { return a + b; }
fn b_sub(a: f32, b: f32) -> f32 { return a - b; }
fn b_mul(a: f32, b: f32) -> f32 { return a * b; }
fn b_div(a: f32, b: f32) -> f32 { return a / b; }
// NaN passes (is_nan: activation.wgsl), as numpy's maximum passes it
fn b_maximum(a: f32, b: f32) -> f32 { return select(max(a, b), a + b, is_nan(a) || is_nan(b)); }
fn b_eq(a: f32, b: f32) -> f32 { return select(0.0, 1.0, a == b); }
// Backward helpers: a is the saved forward value (x or y), b the incoming gradient.
fn b_relu_bwd(x: f32, g: f32) -> f32 { return select(g, 0.0, x <= 0.0); }  // a NaN input passes g on, as PyTorch's
fn b_tanh_bwd(y: f32, g: f32) -> f32 { return g * (1.0 - y * y); }
fn b_sqrt_bwd(y: f32, g: f32) -> f32 { return g * 0.5 / y; }
fn b_gelu_bwd(x: f32, g: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    let t = u_tanh(u);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
    return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
}

@compute @workgroup_size(WG)
fn unary_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    Y[i] = {{UNARY}}(A[i]);
}

@compute @workgroup_size(WG)
fn scalar_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    Y[i] = {{SCALAR}}(A[i], bitcast<f32>(P[1]));
}

@compute @workgroup_size(WG)
fn binary_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    let ndim = P[1];
    var rem = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = 0u; d < ndim; d++) {
        let k = ndim - 1u - d;
        let size = P[2u + k];
        let coord = rem % size;
        rem = rem / size;
        ia += coord * P[2u + MAXDIM + k];
        ib += coord * P[2u + 2u * MAXDIM + k];
    }
    Y[i] = {{BINARY}}(A[ia], B[ib]);
}

@compute @workgroup_size(WG)
fn add_into_main(inv: Invocation) {
    let i = flat(inv);
    if (i >= P[0]) { return; }
    Y[i] = Y[i] + B[i];
}
