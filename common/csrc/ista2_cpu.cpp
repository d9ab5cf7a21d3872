// Fused CPU kernels for ISTA2's memory-bound parts: the RMSNorms on q/k/v and the top-1 value
// alignment. Each kernel makes one pass over its rows (a token's c channels stay in L1 between
// the reduction and the element-wise work), where eager torch needs 3-10 passes over the whole
// tensor. common/ista2.py builds this file on first use and falls back to its torch code when it
// cannot; tests/test_ista2_kernels.py checks both against each other.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRowsPerTask = 64;

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, " must be 2-d with contiguous rows, got sizes ",
              x.sizes(), " and strides ", x.strides());
}

// Sums of per-thread partial results: a (threads, size) buffer of doubles, one row per thread.
struct ThreadSums {
  explicit ThreadSums(int64_t size) : size(size), data(at::get_num_threads() * size, 0.0) {}
  double* mine() { return data.data() + at::get_thread_num() * size; }
  void add_to(double* total) const {
    for (size_t i = 0; i < data.size(); ++i) total[i % size] += data[i];
  }
  int64_t size;
  std::vector<double> data;
};

// y = x * inv_rms per row, inv_rms = 1 / sqrt(mean(x^2) + eps); x (rows, c) with any row stride.
template <typename T>
void rms_norm_forward_kernel(const at::Tensor& x, double eps, at::Tensor& y, at::Tensor& inv_rms) {
  const int64_t rows = x.size(0), c = x.size(1), stride = x.stride(0);
  const T* xs = x.data_ptr<T>();
  T* ys = y.data_ptr<T>();
  T* inv = inv_rms.data_ptr<T>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xs + r * stride;
      T* yr = ys + r * c;
      T square_sum = 0;
#pragma omp simd reduction(+ : square_sum)
      for (int64_t i = 0; i < c; ++i) square_sum += xr[i] * xr[i];
      const T scale = T(1) / std::sqrt(square_sum / T(c) + T(eps));
      inv[r] = scale;
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) yr[i] = xr[i] * scale;
    }
  });
}

// From the output: grad_x = inv * (g - y * mean(g * y)) per row; y (rows, c) with any row stride.
template <typename T>
void rms_norm_backward_kernel(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& inv_rms,
                              at::Tensor& grad_x) {
  const int64_t rows = y.size(0), c = y.size(1), y_stride = y.stride(0), g_stride = grad.stride(0);
  const T* ys = y.data_ptr<T>();
  const T* gs = grad.data_ptr<T>();
  const T* inv = inv_rms.data_ptr<T>();
  T* out = grad_x.data_ptr<T>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* yr = ys + r * y_stride;
      const T* gr = gs + r * g_stride;
      T* orow = out + r * c;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < c; ++i) dot += gr[i] * yr[i];
      const T scale = inv[r], mean = dot / T(c);
#pragma omp simd
      for (int64_t i = 0; i < c; ++i) orow[i] = scale * (gr[i] - yr[i] * mean);
    }
  });
}

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, double eps) {
  check_rows(x, "x");
  auto y = at::empty({x.size(0), x.size(1)}, x.options());
  auto inv_rms = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_forward",
                             [&] { rms_norm_forward_kernel<scalar_t>(x, eps, y, inv_rms); });
  return {y, inv_rms};
}

at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& inv_rms) {
  check_rows(y, "y");
  check_rows(grad, "grad");
  auto grad_x = at::empty({y.size(0), y.size(1)}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rms_norm_backward",
                             [&] { rms_norm_backward_kernel<scalar_t>(grad, y, inv_rms.contiguous(), grad_x); });
  return grad_x;
}

// Per token and head: r* = the allowed candidate with the largest v.r, w = sigmoid(scale (v.r* - v.v)),
// v' = v + w (r* - v). v (m, tokens, c), candidates (n, c), allowed (m, n) bool.
template <typename T>
void align_forward_kernel(const at::Tensor& v, const at::Tensor& candidates, const at::Tensor& allowed,
                          int64_t heads, double scale, at::Tensor& out, at::Tensor& best, at::Tensor& weight) {
  const int64_t m = v.size(0), tokens = v.size(1), c = v.size(2), n = candidates.size(0), d = c / heads;
  const T* vs = v.data_ptr<T>();
  const T* cs = candidates.data_ptr<T>();
  const bool* ok = allowed.data_ptr<bool>();
  T* os = out.data_ptr<T>();
  int64_t* bs = best.data_ptr<int64_t>();
  T* ws = weight.data_ptr<T>();
  at::parallel_for(0, m * tokens, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool* image_ok = ok + (row / tokens) * n;
      for (int64_t h = 0; h < heads; ++h) {
        const T* vh = vs + row * c + h * d;
        T top = -std::numeric_limits<T>::infinity();
        int64_t pick = 0;
        for (int64_t j = 0; j < n; ++j) {
          if (!image_ok[j]) continue;
          const T* rh = cs + j * c + h * d;
          T s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < d; ++i) s += vh[i] * rh[i];
          if (s > top) top = s, pick = j;
        }
        T self = 0;
#pragma omp simd reduction(+ : self)
        for (int64_t i = 0; i < d; ++i) self += vh[i] * vh[i];
        const T w = T(1) / (T(1) + std::exp(-T(scale) * (top - self)));
        const T* rh = cs + pick * c + h * d;
        T* oh = os + row * c + h * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) oh[i] = vh[i] + w * (rh[i] - vh[i]);
        bs[row * heads + h] = pick;
        ws[row * heads + h] = w;
      }
    }
  });
}

// With z = v.r* - v.v and dz = dL/dw * scale * w (1 - w):
// grad_v = (1 - w) g + dz (r* - 2 v);  grad_r* += w g + dz v.
template <typename T>
void align_backward_kernel(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& candidates,
                           const at::Tensor& best, const at::Tensor& weight, int64_t heads, double scale,
                           at::Tensor& grad_v, double* grad_candidates) {
  const int64_t rows = v.size(0) * v.size(1), c = v.size(2), n = candidates.size(0), d = c / heads;
  const T* gs = grad.data_ptr<T>();
  const T* vs = v.data_ptr<T>();
  const T* cs = candidates.data_ptr<T>();
  const int64_t* bs = best.data_ptr<int64_t>();
  const T* ws = weight.data_ptr<T>();
  T* out = grad_v.data_ptr<T>();
  ThreadSums candidate_sums(grad_candidates ? n * c : 0);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    double* csum = grad_candidates ? candidate_sums.mine() : nullptr;
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t pick = bs[row * heads + h];
        const T w = ws[row * heads + h];
        const T* gh = gs + row * c + h * d;
        const T* vh = vs + row * c + h * d;
        const T* rh = cs + pick * c + h * d;
        T g_dot_r = 0, g_dot_v = 0;
#pragma omp simd reduction(+ : g_dot_r, g_dot_v)
        for (int64_t i = 0; i < d; ++i) g_dot_r += gh[i] * rh[i], g_dot_v += gh[i] * vh[i];
        const T dz = (g_dot_r - g_dot_v) * T(scale) * w * (T(1) - w);
        T* oh = out + row * c + h * d;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) oh[i] = (T(1) - w) * gh[i] + dz * (rh[i] - T(2) * vh[i]);
        if (csum) {
          double* ch = csum + pick * c + h * d;
          for (int64_t i = 0; i < d; ++i) ch[i] += double(w * gh[i] + dz * vh[i]);
        }
      }
    }
  });
  if (grad_candidates) candidate_sums.add_to(grad_candidates);
}

void check_align(const at::Tensor& v, const at::Tensor& candidates, int64_t heads) {
  TORCH_CHECK(v.device().is_cpu() && candidates.device().is_cpu(), "align: tensors must be on the CPU");
  TORCH_CHECK(v.dim() == 3 && v.is_contiguous(), "align: v must be a contiguous (m, tokens, c) tensor");
  TORCH_CHECK(candidates.dim() == 2 && candidates.size(1) == v.size(2), "align: candidates must be (n, c)");
  TORCH_CHECK(heads > 0 && v.size(2) % heads == 0, "align: heads must divide c");
}

std::vector<at::Tensor> align_forward(const at::Tensor& v, const at::Tensor& candidates, const at::Tensor& allowed,
                                      int64_t heads, double scale) {
  check_align(v, candidates, heads);
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 2 && allowed.size(0) == v.size(0) &&
                  allowed.size(1) == candidates.size(0),
              "align: allowed must be a bool (m, n) tensor");
  auto out = at::empty_like(v);
  auto best = at::empty({v.size(0), v.size(1), heads}, v.options().dtype(at::kLong));
  auto weight = at::empty({v.size(0), v.size(1), heads}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "align_forward", [&] {
    align_forward_kernel<scalar_t>(v, candidates.contiguous().to(v.scalar_type()), allowed.contiguous(), heads,
                                   scale, out, best, weight);
  });
  return {out, best, weight};
}

std::vector<at::Tensor> align_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& candidates,
                                       const at::Tensor& best, const at::Tensor& weight, int64_t heads, double scale,
                                       bool candidates_grad) {
  check_align(v, candidates, heads);
  auto grad_v = at::empty_like(v);
  auto grad_candidates = at::zeros({candidates_grad ? candidates.numel() : 0}, v.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "align_backward", [&] {
    align_backward_kernel<scalar_t>(grad.contiguous(), v, candidates.contiguous().to(v.scalar_type()), best, weight,
                                    heads, scale, grad_v,
                                    candidates_grad ? grad_candidates.data_ptr<double>() : nullptr);
  });
  return {grad_v, grad_candidates.view({candidates_grad ? candidates.size(0) : 0, candidates.size(1)})
                      .to(v.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "x (rows, c), eps -> y, inv_rms (rows)");
  m.def("rms_norm_backward", &rms_norm_backward, "grad, y, inv_rms -> grad_x");
  m.def("align_forward", &align_forward, "v (m, T, c), candidates (n, c), allowed (m, n), heads, scale -> out, best, weight");
  m.def("align_backward", &align_backward, "grad, v, candidates, best, weight, heads, scale, candidates_grad -> grad_v, grad_candidates");
}
