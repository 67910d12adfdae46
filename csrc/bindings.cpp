// pybind11 entry points of fastlddmm._C. Everything is passed as raw buffers: data pointers as
// integers (torch's Tensor.data_ptr()), sizes and scalars as Python numbers, the CUDA stream as an
// integer (torch.cuda.current_stream().cuda_stream). No torch headers: the module does not depend on
// one torch build's C++ ABI. The Python launchers (fastlddmm/ops/flow/cpu.py and cuda.py, and each
// other room's cpu.py) check shapes, dtypes, devices and contiguity before calling in here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "euler_flow/euler_flow.h"
#include "nearest/nearest_cpu.h"
#include "projection/projection_cpu.h"
#include "softmin/softmin_cpu.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using fastlddmm::Activation;
using fastlddmm::FlowSizes;
using ptr_t = std::uintptr_t;

namespace {

FlowSizes make_sizes(int64_t n, int64_t dim, int64_t width, int64_t layers) {
  if (n < 1) throw std::invalid_argument("euler_flow: need at least one point (n >= 1), got " + std::to_string(n));
  if (dim < 1 || width < 1 || layers < 0)
    throw std::invalid_argument("euler_flow: invalid sizes dim=" + std::to_string(dim) + " width=" +
                                std::to_string(width) + " layers=" + std::to_string(layers));
  return FlowSizes{n, dim, width, layers};
}

void require(ptr_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string("euler_flow: null data pointer for ") + name);
}

void require_params(ptr_t w1, ptr_t b1, ptr_t w2, ptr_t b2) {
  require(w1, "weight1");
  require(b1, "bias1");
  require(w2, "weight2");
  require(b2, "bias2");
}

bool is_double(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  throw std::invalid_argument("euler_flow: dtype must be 'float32' or 'float64', got '" + dtype + "'");
}

template <typename T>
T* P(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

void cpu_forward(const std::string& dtype, ptr_t x, ptr_t w1, ptr_t b1, ptr_t w2, ptr_t b2, double dt,
                 const std::string& activation, int64_t n, int64_t dim, int64_t width, int64_t layers,
                 int num_threads, ptr_t x_final, ptr_t kinetic_sum) {
  const FlowSizes s = make_sizes(n, dim, width, layers);
  const Activation act = fastlddmm::parse_activation(activation);
  require(x, "x");
  require(x_final, "x_final");
  require(kinetic_sum, "kinetic_sum");
  if (layers > 0) require_params(w1, b1, w2, b2);
  py::gil_scoped_release release;  // pure C++ from here on: other Python threads may run
  if (is_double(dtype)) {
    fastlddmm::euler_flow_forward_cpu<double>(P<const double>(x), P<const double>(w1), P<const double>(b1),
                                              P<const double>(w2), P<const double>(b2), dt, act, s, num_threads,
                                              P<double>(x_final), P<double>(kinetic_sum));
  } else {
    fastlddmm::euler_flow_forward_cpu<float>(P<const float>(x), P<const float>(w1), P<const float>(b1),
                                             P<const float>(w2), P<const float>(b2), static_cast<float>(dt), act, s,
                                             num_threads, P<float>(x_final), P<double>(kinetic_sum));
  }
}

void cpu_backward(const std::string& dtype, ptr_t grad_x_final, double grad_kinetic_sum, ptr_t x, ptr_t w1,
                  ptr_t b1, ptr_t w2, ptr_t b2, double dt, const std::string& activation, int64_t n, int64_t dim,
                  int64_t width, int64_t layers, int num_threads, ptr_t grad_x, ptr_t gw1, ptr_t gb1, ptr_t gw2,
                  ptr_t gb2) {
  const FlowSizes s = make_sizes(n, dim, width, layers);
  const Activation act = fastlddmm::parse_activation(activation);
  require(grad_x_final, "grad_x_final");
  require(grad_x, "grad_x");
  require(x, "x");
  if (layers > 0) {
    require_params(w1, b1, w2, b2);
    require_params(gw1, gb1, gw2, gb2);
  }
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::euler_flow_backward_cpu<double>(
        P<const double>(grad_x_final), grad_kinetic_sum, P<const double>(x), P<const double>(w1),
        P<const double>(b1), P<const double>(w2), P<const double>(b2), dt, act, s, num_threads, P<double>(grad_x),
        P<double>(gw1), P<double>(gb1), P<double>(gw2), P<double>(gb2));
  } else {
    fastlddmm::euler_flow_backward_cpu<float>(
        P<const float>(grad_x_final), static_cast<float>(grad_kinetic_sum), P<const float>(x), P<const float>(w1),
        P<const float>(b1), P<const float>(w2), P<const float>(b2), static_cast<float>(dt), act, s, num_threads,
        P<float>(grad_x), P<float>(gw1), P<float>(gb1), P<float>(gw2), P<float>(gb2));
  }
}

void softmin(const std::string& dtype, ptr_t x, ptr_t y, ptr_t h, int64_t batch, int64_t n, int64_t m, int64_t dim,
             double eps, int64_t p, int num_threads, ptr_t f, ptr_t grad) {
  require(x, "x");
  require(y, "y");
  require(h, "h");
  require(f, "f");
  if (dim < 1 || batch < 0 || n < 0 || m < 1 || !(eps > 0))
    throw std::invalid_argument("softmin: invalid sizes or eps");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::softmin_cpu<double>(P<const double>(x), P<const double>(y), P<const double>(h), batch, n, m,
                                   static_cast<int>(dim), eps, static_cast<int>(p), num_threads, P<double>(f),
                                   P<double>(grad));
  } else {
    fastlddmm::softmin_cpu<float>(P<const float>(x), P<const float>(y), P<const float>(h), batch, n, m,
                                  static_cast<int>(dim), eps, static_cast<int>(p), num_threads, P<float>(f),
                                  P<float>(grad));
  }
}

void projection_forward(const std::string& dtype, ptr_t x, ptr_t y, ptr_t h, ptr_t v, int64_t batch, int64_t n,
                        int64_t m, int64_t dim, double eps, int64_t p, int num_threads, ptr_t out, ptr_t lse2) {
  for (auto [ptr, name] : {std::pair{x, "x"}, {y, "y"}, {h, "h"}, {v, "v"}, {out, "out"}, {lse2, "lse2"}})
    require(ptr, name);
  if (dim < 1 || batch < 0 || n < 0 || m < 1 || !(eps > 0))
    throw std::invalid_argument("projection: invalid sizes or eps");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::projection_forward_cpu<double>(P<const double>(x), P<const double>(y), P<const double>(h),
                                              P<const double>(v), batch, n, m, static_cast<int>(dim), eps,
                                              static_cast<int>(p), num_threads, P<double>(out), P<double>(lse2));
  } else {
    fastlddmm::projection_forward_cpu<float>(P<const float>(x), P<const float>(y), P<const float>(h),
                                             P<const float>(v), batch, n, m, static_cast<int>(dim), eps,
                                             static_cast<int>(p), num_threads, P<float>(out), P<double>(lse2));
  }
}

void projection_backward(const std::string& dtype, ptr_t x, ptr_t y, ptr_t h, ptr_t v, ptr_t out, ptr_t lse2,
                         ptr_t grad_out, int64_t batch, int64_t n, int64_t m, int64_t dim, double eps, int64_t p,
                         int num_threads, ptr_t grad_x, ptr_t grad_h, ptr_t grad_v) {
  for (auto [ptr, name] : {std::pair{x, "x"}, {y, "y"}, {h, "h"}, {v, "v"}, {out, "out"}, {lse2, "lse2"},
                           {grad_out, "grad_out"}})
    require(ptr, name);
  if (dim < 1 || batch < 0 || n < 0 || m < 1 || !(eps > 0))
    throw std::invalid_argument("projection: invalid sizes or eps");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::projection_backward_cpu<double>(P<const double>(x), P<const double>(y), P<const double>(h),
                                               P<const double>(v), P<const double>(out), P<const double>(lse2),
                                               P<const double>(grad_out), batch, n, m, static_cast<int>(dim), eps,
                                               static_cast<int>(p), num_threads, P<double>(grad_x), P<double>(grad_h),
                                               P<double>(grad_v));
  } else {
    fastlddmm::projection_backward_cpu<float>(P<const float>(x), P<const float>(y), P<const float>(h),
                                              P<const float>(v), P<const float>(out), P<const double>(lse2),
                                              P<const float>(grad_out), batch, n, m, static_cast<int>(dim), eps,
                                              static_cast<int>(p), num_threads, P<float>(grad_x), P<float>(grad_h),
                                              P<float>(grad_v));
  }
}

void knn(const std::string& dtype, ptr_t x, ptr_t y, ptr_t x_lengths, ptr_t y_lengths, int64_t batch, int64_t n,
         int64_t m, int64_t dim, int64_t k, int64_t norm, int num_threads, ptr_t index) {
  require(x, "x");
  require(y, "y");
  require(index, "index");
  if (batch < 0 || n < 0 || m < 0) throw std::invalid_argument("nearest: invalid sizes");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::knn_cpu<double>(P<const double>(x), P<const double>(y), P<const int64_t>(x_lengths),
                               P<const int64_t>(y_lengths), batch, n, m, static_cast<int>(dim), static_cast<int>(k),
                               static_cast<int>(norm), num_threads, P<int64_t>(index));
  } else {
    fastlddmm::knn_cpu<float>(P<const float>(x), P<const float>(y), P<const int64_t>(x_lengths),
                              P<const int64_t>(y_lengths), batch, n, m, static_cast<int>(dim), static_cast<int>(k),
                              static_cast<int>(norm), num_threads, P<int64_t>(index));
  }
}

#ifdef FASTLDDMM_WITH_CUDA
void cuda_forward(const std::string& dtype, ptr_t x, ptr_t w1, ptr_t b1, ptr_t w2, ptr_t b2, double dt,
                  const std::string& activation, int64_t n, int64_t dim, int64_t width, int64_t layers,
                  ptr_t x_final, ptr_t states, ptr_t kinetic_sum, ptr_t stream) {
  const FlowSizes s = make_sizes(n, dim, width, layers);
  const Activation act = fastlddmm::parse_activation(activation);
  require(x, "x");
  require(x_final, "x_final");
  require(kinetic_sum, "kinetic_sum");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::euler_flow_forward_cuda<double>(P<const double>(x), P<const double>(w1), P<const double>(b1),
                                               P<const double>(w2), P<const double>(b2), dt, act, s,
                                               P<double>(x_final), P<double>(states), P<double>(kinetic_sum), stream);
  } else {
    fastlddmm::euler_flow_forward_cuda<float>(P<const float>(x), P<const float>(w1), P<const float>(b1),
                                              P<const float>(w2), P<const float>(b2), static_cast<float>(dt), act, s,
                                              P<float>(x_final), P<float>(states), P<double>(kinetic_sum), stream);
  }
}

void cuda_backward(const std::string& dtype, ptr_t grad_x_final, ptr_t grad_kinetic_sum, ptr_t states, ptr_t w1,
                   ptr_t b1, ptr_t w2, ptr_t b2, double dt, const std::string& activation, int64_t n, int64_t dim,
                   int64_t width, int64_t layers, ptr_t grad_x, ptr_t gw1, ptr_t gb1, ptr_t gw2, ptr_t gb2,
                   ptr_t stream) {
  const FlowSizes s = make_sizes(n, dim, width, layers);
  const Activation act = fastlddmm::parse_activation(activation);
  require(grad_x_final, "grad_x_final");
  require(grad_kinetic_sum, "grad_kinetic_sum");
  require(grad_x, "grad_x");
  py::gil_scoped_release release;
  if (is_double(dtype)) {
    fastlddmm::euler_flow_backward_cuda<double>(
        P<const double>(grad_x_final), P<const double>(grad_kinetic_sum), P<const double>(states), P<const double>(w1),
        P<const double>(b1), P<const double>(w2), P<const double>(b2), dt, act, s, P<double>(grad_x),
        P<double>(gw1), P<double>(gb1), P<double>(gw2), P<double>(gb2), stream);
  } else {
    fastlddmm::euler_flow_backward_cuda<float>(
        P<const float>(grad_x_final), P<const float>(grad_kinetic_sum), P<const float>(states), P<const float>(w1),
        P<const float>(b1), P<const float>(w2), P<const float>(b2), static_cast<float>(dt), act, s,
        P<float>(grad_x), P<float>(gw1), P<float>(gb1), P<float>(gw2), P<float>(gb2), stream);
  }
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlddmm compiled kernels (fused Euler flow) on raw buffers; see csrc/euler_flow/euler_flow.h";

  m.def("has_cuda", [] {
#ifdef FASTLDDMM_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the module was built with the CUDA kernels (FASTLDDMM_CUDA / nvcc found at build time).");

  m.def("has_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "True when the CPU kernels were compiled with OpenMP (multithreaded).");

  m.def("max_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }, "The OpenMP default thread count of this module.");

  m.def("euler_flow_forward_cpu", &cpu_forward, py::arg("dtype"), py::arg("x"), py::arg("weight1"),
        py::arg("bias1"), py::arg("weight2"), py::arg("bias2"), py::arg("dt"), py::arg("activation"), py::arg("n"),
        py::arg("dim"), py::arg("width"), py::arg("layers"), py::arg("num_threads"), py::arg("x_final"),
        py::arg("kinetic_sum"),
        "Fused Euler flow forward on CPU buffers (pointers as integers); stores nothing but x_final and S.");
  m.def("euler_flow_backward_cpu", &cpu_backward, py::arg("dtype"), py::arg("grad_x_final"),
        py::arg("grad_kinetic_sum"), py::arg("x"), py::arg("weight1"), py::arg("bias1"), py::arg("weight2"),
        py::arg("bias2"), py::arg("dt"), py::arg("activation"), py::arg("n"), py::arg("dim"), py::arg("width"),
        py::arg("layers"), py::arg("num_threads"), py::arg("grad_x"), py::arg("grad_weight1"),
        py::arg("grad_bias1"), py::arg("grad_weight2"), py::arg("grad_bias2"),
        "Fused Euler flow backward on CPU buffers (pointers as integers): recomputes the layers from x, tile by "
        "tile; overwrites every gradient buffer.");
  m.def("softmin_cpu", &softmin, py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("h"), py::arg("batch"),
        py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("eps"), py::arg("p"), py::arg("num_threads"),
        py::arg("f"), py::arg("grad"),
        "Soft-min f = -eps log sum_j exp(h_j - |x_i - y_j|^p / (p eps)) on CPU buffers; grad (0: none) "
        "receives df_i/dx_i. See csrc/softmin/softmin_cpu.h.");
  m.def("projection_forward_cpu", &projection_forward, py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("h"),
        py::arg("v"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("eps"), py::arg("p"),
        py::arg("num_threads"), py::arg("out"), py::arg("lse2"),
        "Barycentric projection T_i = sum_j softmax_j(h_j - C_ij/eps) v_j; lse2 (float64) is kept for the "
        "backward. See csrc/projection/projection_cpu.h.");
  m.def("projection_backward_cpu", &projection_backward, py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("h"),
        py::arg("v"), py::arg("out"), py::arg("lse2"), py::arg("grad_out"), py::arg("batch"), py::arg("n"),
        py::arg("m"), py::arg("dim"), py::arg("eps"), py::arg("p"), py::arg("num_threads"), py::arg("grad_x"),
        py::arg("grad_h"), py::arg("grad_v"),
        "Gradients of projection_forward_cpu (grad_x / grad_h / grad_v may be 0: not computed).");
  m.def("knn_cpu", &knn, py::arg("dtype"), py::arg("x"), py::arg("y"), py::arg("x_lengths"), py::arg("y_lengths"),
        py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("k"), py::arg("norm"),
        py::arg("num_threads"), py::arg("index"),
        "Exact K nearest neighbours by a k-d tree; index (B, N, k) int64 must be zero-filled (padded places stay "
        "0). Lengths may be 0 (full). See csrc/nearest/nearest_cpu.h.");
#ifdef FASTLDDMM_WITH_CUDA
  m.def("euler_flow_forward_cuda", &cuda_forward, py::arg("dtype"), py::arg("x"), py::arg("weight1"),
        py::arg("bias1"), py::arg("weight2"), py::arg("bias2"), py::arg("dt"), py::arg("activation"), py::arg("n"),
        py::arg("dim"), py::arg("width"), py::arg("layers"), py::arg("x_final"), py::arg("states"),
        py::arg("kinetic_sum"), py::arg("stream"),
        "Fused Euler flow forward on device buffers; kinetic_sum: zeroed float64 (1,), receives sum |v|^2.");
  m.def("euler_flow_backward_cuda", &cuda_backward, py::arg("dtype"), py::arg("grad_x_final"),
        py::arg("grad_kinetic_sum"), py::arg("states"), py::arg("weight1"), py::arg("bias1"), py::arg("weight2"),
        py::arg("bias2"), py::arg("dt"), py::arg("activation"), py::arg("n"), py::arg("dim"), py::arg("width"),
        py::arg("layers"), py::arg("grad_x"), py::arg("grad_weight1"), py::arg("grad_bias1"),
        py::arg("grad_weight2"), py::arg("grad_bias2"), py::arg("stream"),
        "Fused Euler flow backward on device buffers; parameter gradient buffers must be zeroed (accumulated).");
  m.attr("CUDA_MAX_DIM") = fastlddmm::kCudaMaxDim;
#endif
}
