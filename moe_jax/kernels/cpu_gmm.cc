// Grouped matmuls for XLA:CPU through the XLA FFI: one BLAS sgemm per expert
// over exactly that expert's rows (XLA:CPU lowers ragged_dot to a dense matmul
// against every expert). Built on first use by moe_jax/kernels/cpu_gmm.py.
//
// Rows are sorted by expert: rows [start_e, start_e + group_sizes[e]) belong
// to expert e, start_e = sum(group_sizes[:e]); rows past the last group are
// zero in the outputs.
//
// Threads: OpenBLAS runs single-threaded (cpu_gmm.py sets it once); the
// parallelism comes from XLA's own intra-op thread pool (`ThreadPool`
// context), on which the products are split into column blocks. OpenBLAS's
// own threads busy-wait between calls and compete with XLA's threads and with
// other processes: beside a busy process a tiny layer ran 10x slower.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

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

// One sgemm of a grouped product: expert `expert`, rows [row, row + m),
// output columns [col, col + width).
struct Task {
  int64_t expert, row, m, col, width;
};

// Splits every expert's product into column blocks, about 8 per worker over
// all experts in proportion to each expert's rows (so one busy expert still
// spreads over the workers), largest first: pulled in this order, the blocks
// balance the workers' loads.
std::vector<Task> MakeTasks(const int32_t* sizes, int64_t groups, int64_t covered,
                            int64_t n, int64_t workers) {
  std::vector<Task> tasks;
  const int64_t max_blocks = std::max<int64_t>(1, n / 64);  // Blocks of >= 64 columns.
  int64_t start = 0;
  for (int64_t e = 0; e < groups; ++e) {
    const int64_t m = sizes[e];
    if (m == 0) continue;
    int64_t blocks = workers == 1 ? 1 : (8 * workers * m + covered - 1) / covered;
    blocks = std::clamp<int64_t>(blocks, 1, max_blocks);
    const int64_t width = (n + blocks - 1) / blocks;
    for (int64_t col = 0; col < n; col += width) {
      tasks.push_back({e, start, m, col, std::min(width, n - col)});
    }
    start += m;
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return a.m * a.width > b.m * b.width;
  });
  return tasks;
}

// Tasks shared by the calling thread and its helpers on XLA's pool. Shared
// ownership: a helper that starts after all tasks are done finds none left
// and touches nothing else.
struct Work {
  std::vector<Task> tasks;
  std::function<void(const Task&)> run;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable all_done;

  void RunAvailable() {
    const int64_t total = static_cast<int64_t>(tasks.size());
    int64_t finished = 0;
    for (int64_t i = next.fetch_add(1); i < total; i = next.fetch_add(1)) {
      run(tasks[i]);
      ++finished;
    }
    if (finished > 0 && done.fetch_add(finished) + finished == total) {
      std::lock_guard<std::mutex> lock(mutex);
      all_done.notify_all();
    }
  }
};

// Runs `run` on every task: on the calling thread and on up to
// `pool.num_threads() - 1` helpers (the caller counts as one worker). The
// caller never waits for a helper that has not started: it runs whatever is
// left itself, then waits only for tasks already being run, so a saturated
// pool cannot deadlock it.
void RunTasks(ffi::ThreadPool& pool, int64_t workers, std::vector<Task> tasks,
              std::function<void(const Task&)> run) {
  if (workers <= 1 || tasks.size() <= 1) {
    for (const Task& task : tasks) run(task);
    return;
  }
  auto work = std::make_shared<Work>();
  work->tasks = std::move(tasks);
  work->run = std::move(run);
  const int64_t helpers =
      std::min<int64_t>(workers - 1, static_cast<int64_t>(work->tasks.size()) - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([work] { work->RunAvailable(); });
  }
  work->RunAvailable();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->all_done.wait(lock, [&] {
    return work->done.load() == static_cast<int64_t>(work->tasks.size());
  });
}

int64_t Workers(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

// out[rows, n] = x[rows, k] @ w[e] per group; w is [E, k, n], or [E, n, k]
// read transposed when transpose_rhs.
ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> group_sizes,
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
  const int64_t workers = Workers(pool);
  RunTasks(pool, workers, MakeTasks(sizes, groups, covered, n, workers),
           [&](const Task& t) {
             // Columns [col, col + width) of w[e]: a column offset in [k, n],
             // a row offset in the transposed [n, k].
             const float* w_block = w_data + t.expert * k * n +
                                    (transpose_rhs ? t.col * k : t.col);
             scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans,
                               transpose_rhs ? CblasTrans : CblasNoTrans, t.m, t.width, k,
                               1.0f, x_data + t.row * k, k, w_block, transpose_rhs ? k : n,
                               0.0f, out_data + t.row * n + t.col, n);
           });
  std::memset(out_data + covered * n, 0, sizeof(float) * (rows - covered) * n);
  return ffi::Error::Success();
}

// dw[e] = x_e^T @ dy_e: [rows, k] x [rows, n] -> [E, k, n].
ffi::Error WeightGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> group_sizes,
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
  for (int64_t e = 0; e < groups; ++e) {
    if (sizes[e] == 0) std::memset(dw_data + e * k * n, 0, sizeof(float) * k * n);
  }
  const int64_t workers = Workers(pool);
  RunTasks(pool, workers, MakeTasks(sizes, groups, covered, n, workers),
           [&](const Task& t) {
             scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, k, t.width, t.m,
                               1.0f, x_data + t.row * k, k, dy_data + t.row * n + t.col, n,
                               0.0f, dw_data + t.expert * k * n + t.col, n);
           });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxCpuGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxCpuWeightGradient, WeightGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
