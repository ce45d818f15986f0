// Grouped matmuls for XLA:CPU through the XLA FFI: one BLAS sgemm per expert
// over exactly that expert's rows (XLA:CPU lowers ragged_dot to a dense matmul
// against every expert). Built on first use by moe_jax/kernels/cpu_gmm.py.
//
// Rows are sorted by expert: rows [start_e, start_e + group_sizes[e]) belong
// to expert e, start_e = sum(group_sizes[:e]); rows past the last group are
// zero in the outputs.

#include <cstdint>
#include <cstring>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Checks the group sizes against the row count; on success sets *covered to
// the number of rows the groups own.
ffi::Error CoveredRows(const int32_t* sizes, int64_t groups, int64_t rows,
                       int64_t* covered) {
  *covered = 0;
  for (int64_t e = 0; e < groups; ++e) {
    if (sizes[e] < 0) {
      return ffi::Error::InvalidArgument("group_sizes must be non-negative");
    }
    *covered += sizes[e];
  }
  if (*covered > rows) {
    return ffi::Error::InvalidArgument("group_sizes sum to more than the row count");
  }
  return ffi::Error::Success();
}

// out[rows, n] = x[rows, k] @ w[e] per group; w is [E, k, n], or [E, n, k]
// read transposed when transpose_rhs.
ffi::Error GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> group_sizes,
                         ffi::ResultBuffer<ffi::F32> out, bool transpose_rhs) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3) {
    return ffi::Error::InvalidArgument("expected x [rows, k] and w [experts, ., .]");
  }
  const int64_t rows = x_dims[0], k = x_dims[1], groups = w_dims[0];
  const int64_t n = transpose_rhs ? w_dims[1] : w_dims[2];
  if ((transpose_rhs ? w_dims[2] : w_dims[1]) != k ||
      group_sizes.element_count() != static_cast<size_t>(groups)) {
    return ffi::Error::InvalidArgument("x, w and group_sizes disagree in shape");
  }
  const int32_t* sizes = group_sizes.typed_data();
  int64_t covered = 0;
  if (ffi::Error error = CoveredRows(sizes, groups, rows, &covered); error.failure()) {
    return error;
  }

  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* out_data = out->typed_data();
  int64_t start = 0;
  for (int64_t e = 0; e < groups; ++e) {
    const int64_t m = sizes[e];
    if (m == 0) continue;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_rhs ? CblasTrans : CblasNoTrans,
                m, n, k, 1.0f, x_data + start * k, k, w_data + e * k * n,
                transpose_rhs ? k : n, 0.0f, out_data + start * n, n);
    start += m;
  }
  std::memset(out_data + covered * n, 0, sizeof(float) * (rows - covered) * n);
  return ffi::Error::Success();
}

// dw[e] = x_e^T @ dy_e: [rows, k] x [rows, n] -> [E, k, n].
ffi::Error WeightGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::Buffer<ffi::S32> group_sizes,
                          ffi::ResultBuffer<ffi::F32> dw) {
  const auto x_dims = x.dimensions();
  const auto dy_dims = dy.dimensions();
  const auto dw_dims = dw->dimensions();
  if (x_dims.size() != 2 || dy_dims.size() != 2 || dw_dims.size() != 3 ||
      x_dims[0] != dy_dims[0] || dw_dims[1] != x_dims[1] || dw_dims[2] != dy_dims[1] ||
      group_sizes.element_count() != static_cast<size_t>(dw_dims[0])) {
    return ffi::Error::InvalidArgument("x, dy, group_sizes and dw disagree in shape");
  }
  const int64_t rows = x_dims[0], k = x_dims[1], n = dy_dims[1], groups = dw_dims[0];
  const int32_t* sizes = group_sizes.typed_data();
  int64_t covered = 0;
  if (ffi::Error error = CoveredRows(sizes, groups, rows, &covered); error.failure()) {
    return error;
  }

  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  float* dw_data = dw->typed_data();
  int64_t start = 0;
  for (int64_t e = 0; e < groups; ++e) {
    const int64_t m = sizes[e];
    float* dw_e = dw_data + e * k * n;
    if (m == 0) {
      std::memset(dw_e, 0, sizeof(float) * k * n);
      continue;
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, n, m, 1.0f,
                x_data + start * k, k, dy_data + start * n, n, 0.0f, dw_e, n);
    start += m;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxCpuGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxCpuWeightGradient, WeightGradient,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
