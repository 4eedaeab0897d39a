// Python binding of the scan kernels and of the lattice conv: checks the tensors, allocates outputs and scratch,
// picks the dtype.
// The kernels compute the recurrences, their sums over states and channels, and the elementwise ends (D u, the
// silu(z) gate, the softplus derivative, dD, d delta_bias): ops/selective_scan.py only adapts dtypes and shapes.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "lattice_conv_params.h"
#include "m2d_params.h"
#include "scan_params.h"

namespace {

// The checks' messages are built here, numbers and sizes as std::to_string text, and reach TORCH_CHECK as one string,
// never an integer through std::ostream: on the device machine's torch 2.11 build, an integer written to a
// std::ostringstream by extension code (a minimal load_inline module too) crashes the process, so a bad input would
// end in a segfault instead of its message. OPS_CHECK for every check of this file.
std::string txt(const char* s) { return s; }
std::string txt(int64_t v) { return std::to_string(v); }
std::string txt(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
std::string txt(at::ScalarType t) { return c10::toString(t); }
template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += txt(args)), ...);
  return out;
}

#define OPS_CHECK(cond, ...) TORCH_CHECK(cond, message(__VA_ARGS__))
#define SCAN_CHECK(cond, ...) OPS_CHECK(cond, "wsi_pipeline scan: ", __VA_ARGS__)

void check_input(const torch::Tensor& t, const char* name, at::ScalarType dtype) {
  SCAN_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  SCAN_CHECK(t.is_contiguous(), name, " must be contiguous");
  SCAN_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

struct Shape {
  int batch, dim, dstate, groups, height, width, strip, n_strips, n_tiles;
};

// u, delta (batch, dim, L); A (dim, n) fp32; B, C (batch, groups, n, L) in u's dtype.
Shape shape_of(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& B,
               const torch::Tensor& C, int64_t height, int64_t width, int64_t strip) {
  check_input(u, "u", u.scalar_type());
  check_input(delta, "delta", u.scalar_type());
  check_input(A, "A", at::kFloat);
  check_input(B, "B", u.scalar_type());
  check_input(C, "C", u.scalar_type());
  SCAN_CHECK(u.dim() == 3 && B.dim() == 4 && C.sizes() == B.sizes(), "bad ranks: u ", u.sizes(), ", B ", B.sizes());
  SCAN_CHECK(height >= 1 && width >= 1 && height * width == u.size(2), "height*width must equal L = ", u.size(2));
  SCAN_CHECK(delta.sizes() == u.sizes(), "delta ", delta.sizes(), " must match u ", u.sizes());
  Shape s{};
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.dstate = A.size(1);
  s.groups = B.size(1);
  s.height = height;
  s.width = width;
  SCAN_CHECK(A.size(0) == s.dim && B.size(0) == s.batch && B.size(2) == s.dstate && B.size(3) == u.size(2),
        "A ", A.sizes(), " / B ", B.sizes(), " do not fit u ", u.sizes());
  SCAN_CHECK(s.dim % s.groups == 0, "dim ", s.dim, " is not a multiple of the ", s.groups, " groups of B/C");
  SCAN_CHECK(strip == scan::kStrip, "strip must be ", scan::kStrip, ", got ", strip);
  s.strip = std::min<int64_t>(strip, height);
  s.n_strips = (s.height + s.strip - 1) / s.strip;
  const int tile = 32 * scan::cols_per_lane(width);
  s.n_tiles = (s.width + tile - 1) / tile;
  return s;
}

scan::Params params_of(const Shape& s, const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                       const torch::Tensor& B, const torch::Tensor& C, const c10::optional<torch::Tensor>& D,
                       const c10::optional<torch::Tensor>& z, const c10::optional<torch::Tensor>& bias,
                       bool softplus) {
  scan::Params p{};
  p.batch = s.batch, p.dim = s.dim, p.dstate = s.dstate, p.groups = s.groups;
  p.height = s.height, p.width = s.width, p.strip = s.strip, p.n_strips = s.n_strips;
  p.softplus = softplus;
  p.atomic_out = s.dstate > scan::kWarpsPerBlock;
  p.u = u.data_ptr(), p.delta = delta.data_ptr(), p.B = B.data_ptr(), p.C = C.data_ptr();
  p.A = A.data_ptr<float>();
  if (bias.has_value()) {
    check_input(*bias, "delta_bias", at::kFloat);
    SCAN_CHECK(bias->numel() == s.dim, "delta_bias must have dim = ", s.dim, " values");
    p.delta_bias = bias->data_ptr<float>();
  }
  if (D.has_value()) {
    check_input(*D, "D", at::kFloat);
    SCAN_CHECK(D->numel() == s.dim, "D must have dim = ", s.dim, " values");
    p.D = D->data_ptr<float>();
  }
  if (z.has_value()) {
    check_input(*z, "z", u.scalar_type());
    SCAN_CHECK(z->sizes() == u.sizes(), "z ", z->sizes(), " must match u ", u.sizes());
    p.z = z->data_ptr();
  }
  return p;
}

using Launcher = void (*)(const scan::Params&, cudaStream_t);

// The launchers of one dtype: forward, backward, and the forward's elementwise end for atomic_out.
struct Launchers {
  Launcher fwd, bwd, finish;
};

Launchers pick(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return {scan::scan2d_fwd_f32, scan::scan2d_bwd_f32, scan::scan2d_finish_f32};
    case at::kHalf: return {scan::scan2d_fwd_f16, scan::scan2d_bwd_f16, scan::scan2d_finish_f16};
    case at::kBFloat16: return {scan::scan2d_fwd_bf16, scan::scan2d_bwd_bf16, scan::scan2d_finish_bf16};
    default: SCAN_CHECK(false, "unsupported dtype ", dtype);
  }
}

torch::Tensor scratch(const Shape& s, int64_t rows, int64_t cols, const torch::Tensor& like) {
  return torch::empty({std::max<int64_t>(1, (int64_t)s.batch * s.dim * s.dstate * rows * cols)},
                      like.options().dtype(at::kFloat));
}

// Returns (out = (sum_n C h + D u) * silu(z) in u's dtype, ypre = sum_n C h + D u in fp32 when z is given (else
// empty), checkpoints).
std::vector<torch::Tensor> scan2d_fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                      torch::Tensor C, c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                                      c10::optional<torch::Tensor> delta_bias, bool softplus, int64_t height,
                                      int64_t width, int64_t strip) {
  const Shape s = shape_of(u, delta, A, B, C, height, width, strip);
  const c10::cuda::CUDAGuard guard(u.device());
  scan::Params p = params_of(s, u, delta, A, B, C, D, z, delta_bias, softplus);
  auto f32 = u.options().dtype(at::kFloat);
  auto out = torch::empty_like(u);
  torch::Tensor ypre;
  if (p.atomic_out) ypre = torch::zeros(u.sizes(), f32);
  else if (z.has_value()) ypre = torch::empty(u.sizes(), f32);
  auto ckpt = scratch(s, s.n_strips - 1, s.width, u);  // the last strip needs none
  auto carry = scratch(s, s.n_tiles > 1 && s.height > 1 ? 1 : 0, s.width, u);
  p.out = out.data_ptr(), p.ypre = ypre.defined() ? ypre.data_ptr<float>() : nullptr;
  p.ckpt = ckpt.data_ptr<float>(), p.carry = carry.data_ptr<float>();
  const Launchers run = pick(u.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  run.fwd(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.atomic_out) {
    run.finish(p, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, z.has_value() ? ypre : torch::Tensor(), ckpt};
}

// Returns du, d delta (u's dtype), dA, dB, dC (fp32), dD, dz (z's dtype), d delta_bias (fp32); the last three
// undefined when D, z, delta_bias are not given.
std::vector<torch::Tensor> scan2d_bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                                      torch::Tensor C, c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                                      c10::optional<torch::Tensor> delta_bias, bool softplus, int64_t height,
                                      int64_t width, int64_t strip, torch::Tensor ckpt,
                                      c10::optional<torch::Tensor> ypre, torch::Tensor dout) {
  const Shape s = shape_of(u, delta, A, B, C, height, width, strip);
  check_input(dout, "dout", u.scalar_type());
  SCAN_CHECK(dout.sizes() == u.sizes(), "dout ", dout.sizes(), " must match u ", u.sizes());
  const c10::cuda::CUDAGuard guard(u.device());
  scan::Params p = params_of(s, u, delta, A, B, C, D, z, delta_bias, softplus);
  auto f32 = u.options().dtype(at::kFloat);
  // with atomic_out the blocks of a channel add their shares: fp32 sums, rounded to u's dtype at the end
  auto du = p.atomic_out ? torch::zeros(u.sizes(), f32) : torch::empty_like(u);
  auto ddelta = p.atomic_out ? torch::zeros(u.sizes(), f32) : torch::empty_like(u);
  // the kernel's sums start from zero: one buffer (one fill) for all of them
  const int64_t nD = D.has_value() ? s.dim : 0, nbias = delta_bias.has_value() ? s.dim : 0;
  auto sums = torch::zeros({A.numel() + B.numel() + C.numel() + nD + nbias}, f32);
  int64_t offset = 0;
  auto take = [&](int64_t n, at::IntArrayRef shape) {
    auto t = sums.narrow(0, offset, n).view(shape);
    offset += n;
    return t;
  };
  auto dA = take(A.numel(), A.sizes()), dB = take(B.numel(), B.sizes()), dC = take(C.numel(), C.sizes());
  torch::Tensor dD, dz, dbias;
  if (D.has_value()) dD = take(nD, {s.dim});
  if (delta_bias.has_value()) dbias = take(nbias, {s.dim});
  if (z.has_value()) {
    SCAN_CHECK(ypre.has_value(), "ypre from the forward is needed when z is given");
    check_input(*ypre, "ypre", at::kFloat);
    dz = torch::empty_like(u);
    p.ypre = ypre->data_ptr<float>(), p.dz = dz.data_ptr();
  }
  // the strip scratch, a slot (of P x kWarpsPerBlock states) per persistent block of the backward (scratch_slots)
  const int P = scan::plan_of(p, false, u.element_size()).P;
  p.n_slots = scan::scratch_slots(p, P);
  const int64_t slot_states = (int64_t)p.n_slots * P * scan::kWarpsPerBlock;
  auto hbuf = torch::empty({std::max<int64_t>(1, slot_states * (s.strip - 1) * s.width)}, f32);
  auto gbuf = torch::empty({slot_states * s.strip * s.n_tiles}, f32);
  auto carry = scratch(s, s.n_tiles > 1 && s.height > 1 ? 1 : 0, s.width, u);
  p.ckpt = ckpt.data_ptr<float>(), p.dout = dout.data_ptr();
  p.du = du.data_ptr(), p.ddelta = ddelta.data_ptr();
  p.dA = dA.data_ptr<float>(), p.dB = dB.data_ptr<float>(), p.dC = dC.data_ptr<float>();
  p.dD = dD.defined() ? dD.data_ptr<float>() : nullptr, p.dbias = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  p.hbuf = hbuf.data_ptr<float>(), p.gbuf = gbuf.data_ptr<float>(), p.carry = carry.data_ptr<float>();
  pick(u.scalar_type()).bwd(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.atomic_out) {
    du = du.to(u.scalar_type());
    ddelta = ddelta.to(u.scalar_type());
  }
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

namespace m2d {
namespace {

void check(const torch::Tensor& t, const char* name) {
  OPS_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == at::kFloat, "wavefront_scan_m2d: ", name,
            " must be a contiguous float32 CUDA tensor");
}

Params params_of(const torch::Tensor& u, const torch::Tensor& dh, const torch::Tensor& dv, const torch::Tensor& Ah,
                 const torch::Tensor& Av, const torch::Tensor& Bh, const torch::Tensor& Bv, const torch::Tensor& C,
                 int64_t height, int64_t width) {
  const char* names[] = {"u", "delta_h", "delta_v", "A_h", "A_v", "B_h", "B_v", "C"};
  const torch::Tensor* ts[] = {&u, &dh, &dv, &Ah, &Av, &Bh, &Bv, &C};
  for (int k = 0; k < 8; ++k) check(*ts[k], names[k]);
  OPS_CHECK(height * width == u.size(2) && width <= 1024, "wavefront_scan_m2d: need height*width == L and "
            "width <= 1024, got ", height, "x", width, " for L = ", u.size(2));
  OPS_CHECK(Bh.dim() == 4 && Bv.sizes() == Bh.sizes() && C.sizes() == Bh.sizes(), "wavefront_scan_m2d: B/C");
  Params p{};
  p.dim = u.size(1), p.dstate = Ah.size(1), p.groups = Bh.size(1), p.height = height, p.width = width;
  p.u = u.data_ptr<float>(), p.dh = dh.data_ptr<float>(), p.dv = dv.data_ptr<float>();
  p.Ah = Ah.data_ptr<float>(), p.Av = Av.data_ptr<float>();
  p.Bh = Bh.data_ptr<float>(), p.Bv = Bv.data_ptr<float>(), p.C = C.data_ptr<float>();
  return p;
}

void launch_sweep(const Params& p, int channels, bool backward) {
  launch(p, channels, backward, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::vector<torch::Tensor> forward(torch::Tensor u, torch::Tensor delta_h, torch::Tensor delta_v, torch::Tensor A_h,
                                   torch::Tensor A_v, torch::Tensor B_h, torch::Tensor B_v, torch::Tensor C,
                                   int64_t height, int64_t width) {
  Params p = params_of(u, delta_h, delta_v, A_h, A_v, B_h, B_v, C, height, width);
  const c10::cuda::CUDAGuard guard(u.device());
  auto y = torch::zeros_like(u);
  p.y = y.data_ptr<float>();
  launch_sweep(p, u.size(0) * u.size(1), false);
  return {y};
}

std::vector<torch::Tensor> backward(torch::Tensor u, torch::Tensor delta_h, torch::Tensor delta_v,
                                    torch::Tensor A_h, torch::Tensor A_v, torch::Tensor B_h, torch::Tensor B_v,
                                    torch::Tensor C, int64_t height, int64_t width, torch::Tensor dy) {
  Params p = params_of(u, delta_h, delta_v, A_h, A_v, B_h, B_v, C, height, width);
  check(dy, "dy");
  const c10::cuda::CUDAGuard guard(u.device());
  auto hall = torch::empty({u.size(0), u.size(1), A_h.size(1), u.size(2)}, u.options());
  p.hall = hall.data_ptr<float>();
  launch_sweep(p, u.size(0) * u.size(1), false);  // recompute every state once
  auto du = torch::zeros_like(u), ddh = torch::zeros_like(u), ddv = torch::zeros_like(u);
  auto dAh = torch::zeros_like(A_h), dAv = torch::zeros_like(A_v);
  auto dBh = torch::zeros_like(B_h), dBv = torch::zeros_like(B_v), dC = torch::zeros_like(C);
  p.dy = dy.data_ptr<float>();
  p.du = du.data_ptr<float>(), p.ddh = ddh.data_ptr<float>(), p.ddv = ddv.data_ptr<float>();
  p.dAh = dAh.data_ptr<float>(), p.dAv = dAv.data_ptr<float>();
  p.dBh = dBh.data_ptr<float>(), p.dBv = dBv.data_ptr<float>(), p.dC = dC.data_ptr<float>();
  launch_sweep(p, u.size(0) * u.size(1), true);
  return {du, ddh, ddv, dAh, dAv, dBh, dBv, dC};
}

}  // namespace m2d

namespace latconv {
namespace {

// x (..., C, height * width) contiguous in a kernel dtype; w (C, 1, k, k), b (C) fp32 contiguous.
Params params_of(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                 int64_t height, int64_t width) {
  OPS_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() >= 2, "lattice_conv_silu: x must be a contiguous CUDA "
            "tensor (..., C, L), got ", x.sizes());
  OPS_CHECK(height >= 1 && width >= 1 && height * width == x.size(-1), "lattice_conv_silu: height*width = ",
            height, "*", width, " must equal L = ", x.size(-1));
  OPS_CHECK(w.is_cuda() && w.is_contiguous() && w.scalar_type() == at::kFloat && w.dim() == 4 &&
            w.size(0) == x.size(-2) && w.size(1) == 1 && w.size(2) == w.size(3) && supported(w.size(2)),
            "lattice_conv_silu: weight must be fp32 (C, 1, k, k) with k in 1, 3, 5, 7, got ", w.sizes());
  const auto dtype = x.scalar_type();
  OPS_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "lattice_conv_silu: dtype ", dtype);
  Params p{};
  p.channels = x.numel() / x.size(-1), p.dim = x.size(-2), p.height = height, p.width = width, p.kernel = w.size(2);
  p.dtype = dtype == at::kFloat ? DType::kF32 : dtype == at::kHalf ? DType::kF16 : DType::kBF16;
  p.x = x.data_ptr(), p.w = w.data_ptr<float>();
  if (b) {
    OPS_CHECK(b->is_cuda() && b->is_contiguous() && b->scalar_type() == at::kFloat && b->numel() == p.dim,
              "lattice_conv_silu: bias must be fp32 (C,)");
    p.b = b->data_ptr<float>();
  }
  return p;
}

}  // namespace

torch::Tensor conv_fwd(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b, int64_t height,
                       int64_t width) {
  Params p = params_of(x, w, b, height, width);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty_like(x);
  p.out = out.data_ptr();
  forward(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (gx, gw, gb); gb is empty without a bias.
std::vector<torch::Tensor> conv_bwd(torch::Tensor gu, torch::Tensor x, torch::Tensor w,
                                    c10::optional<torch::Tensor> b, int64_t height, int64_t width) {
  Params p = params_of(x, w, b, height, width);
  OPS_CHECK(gu.sizes() == x.sizes() && gu.scalar_type() == x.scalar_type() && gu.is_contiguous(),
            "lattice_conv_silu: the output gradient must be contiguous, of x's shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = torch::empty_like(x);
  auto sums = torch::zeros({w.numel() + (b ? p.dim : 0)}, w.options());  // one zero-fill for gw and gb
  p.gu = gu.data_ptr(), p.gx = gx.data_ptr(), p.gw = sums.data_ptr<float>();
  p.gb = b ? p.gw + w.numel() : nullptr;
  backward(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gx, sums.narrow(0, 0, w.numel()).view(w.sizes()), sums.narrow(0, w.numel(), b ? p.dim : 0)};
}

}  // namespace latconv

namespace scan {

// The plan the launchers pick for a scan of this shape on the current device: (channels per warp, columns per
// lane, uniform-rows kernels, states per warp). For tests and benchmarks, which check that a shape takes the path
// they mean.
std::tuple<int64_t, int64_t, bool, int64_t> plan(int64_t batch, int64_t dim, int64_t dstate, int64_t groups, int64_t height,
                                        int64_t width, int64_t itemsize, bool forward) {
  SCAN_CHECK(batch >= 1 && dim >= 1 && dstate >= 1 && groups >= 1 && height >= 1 && width >= 1,
             "scan_plan: sizes must be positive, got batch ", batch, ", dim ", dim, ", dstate ", dstate,
             ", groups ", groups, ", ", height, "x", width);
  SCAN_CHECK(dim % groups == 0, "scan_plan: dim ", dim, " is not a multiple of the ", groups, " groups of B/C");
  SCAN_CHECK(itemsize == 2 || itemsize == 4, "scan_plan: itemsize must be 2 (fp16/bf16) or 4 (fp32), got ", itemsize);
  Params p{};
  p.batch = batch, p.dim = dim, p.dstate = dstate, p.groups = groups, p.height = height, p.width = width;
  const Plan q = plan_of(p, forward, itemsize);
  return {q.P, q.K, q.uniform, q.S};
}

}  // namespace scan

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_plan", &scan::plan,
        "the scan kernels' plan for a shape: (channels per warp, columns per lane, uniform, states per warp)");
  m.def("scan2d_fwd", &scan2d_fwd, "2D selective scan, forward (out, ypre when z is given, strip checkpoints)");
  m.def("scan2d_bwd", &scan2d_bwd, "2D selective scan, backward (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)");
  m.def("m2d_fwd", &m2d::forward, "Mamba2D wavefront scan, forward");
  m.def("m2d_bwd", &m2d::backward, "Mamba2D wavefront scan, backward");
  m.def("lattice_conv_fwd", &latconv::conv_fwd, "depthwise conv on a lattice + SiLU, forward");
  m.def("lattice_conv_bwd", &latconv::conv_bwd, "depthwise conv on a lattice + SiLU, backward (gx, gw, gb)");
}
