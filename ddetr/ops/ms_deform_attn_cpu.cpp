// Multi-scale deformable attention CPU kernels (forward and backward).
//
// Plain C++ with OpenMP and a C ABI, loaded through ctypes by ms_deform_attn_cpu.py: no torch or Python headers,
// so the build takes about a second and does not depend on the torch version or on ninja.
//
// Layouts (all contiguous, row-major):
//   value              (batch, sequence, heads, head_dim), or heads-first (batch, heads, sequence, head_dim) where
//                      the backward kernel is told so
//   shapes             (levels, 2) int64 as (height, width); starts (levels,) int64 first sequence index of a level
//   locations          (batch, queries, heads, levels, points, 2) as (x, y) normalised to [0, 1]
//   weights            (batch, queries, heads, levels, points)
//   output             (batch, queries, heads, head_dim)
//   grad_value         (chunks, <value layout>), fully overwritten; chunk c holds the contribution of the c-th slice
//                      of queries, the caller sums over chunks
//
// Value may be stored as float, double or bfloat16 (raw uint16 bits); everything else, and all arithmetic, is in the
// compute type (float for bfloat16 values), so grad_value of a bfloat16 value is float.
//
// Sampling is bilinear with align_corners=False (pixel centres at (i + 0.5) / size) and zeros outside the map, the
// same arithmetic as grid_sample: x = loc_x * width - 0.5, corners floor(x) and floor(x) + 1, each corner checked
// against the map on its own.

// Only OpenMP pragmas, no omp.h: without -fopenmp the same source builds as a single-threaded kernel.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The forward pass prefers 512-bit vectors where the CPU has them (AVX-512 and -march=native): on a 2-core Xeon
// with AMX its bfloat16 kernel took 0.79-0.85x the time (fewer instructions to widen bfloat16), float32
// 0.96-0.98x. The backward keeps the compiler's default width: 512 bits made it 1.13-1.18x slower there. GCC only;
// other compilers build without the preference.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define DDETR_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define DDETR_WIDE_VECTORS
#endif

namespace {

using bfloat16_bits = std::uint16_t;

inline float to_compute(float v) { return v; }
inline double to_compute(double v) { return v; }
// bfloat16 is the upper half of a float32.
inline float to_compute(bfloat16_bits v) {
  const std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// One sampling point resolved to its four bilinear corners.
// Corners outside the map point at a row of zeros (reads) or at a scratch row (writes), so the inner loops over
// head_dim are branch-free and vectorise; their weights are zero in the forward pass either way.
template <typename V, typename T>
struct Corners {
  const V* read[4];
  T* write[4];
  T weight[4];
  T frac_x;
  T frac_y;
};

// Returns false when no corner of the point touches the map, including NaN coordinates.
// `x >= -1` rather than `x > -1`: at exactly -1 the inner corner has zero weight but a non-zero gradient, as in
// grid_sample.
template <typename V, typename T>
inline bool resolve(T x, T y, int64_t height, int64_t width, const V* level_value, T* level_grad, int64_t row_stride,
                    const V* zeros, T* scratch, Corners<V, T>& corners) {
  if (!(x >= T(-1) && y >= T(-1) && x < T(width) && y < T(height))) {
    return false;
  }
  const T x_floor = std::floor(x);
  const T y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const T fx = x - x_floor;
  const T fy = y - y_floor;
  corners.frac_x = fx;
  corners.frac_y = fy;
  corners.weight[0] = (T(1) - fx) * (T(1) - fy);
  corners.weight[1] = fx * (T(1) - fy);
  corners.weight[2] = (T(1) - fx) * fy;
  corners.weight[3] = fx * fy;
  for (int corner = 0; corner < 4; ++corner) {
    const int64_t cx = x0 + (corner & 1);
    const int64_t cy = y0 + (corner >> 1);
    if (cx >= 0 && cx < width && cy >= 0 && cy < height) {
      const int64_t offset = (cy * width + cx) * row_stride;
      corners.read[corner] = level_value + offset;
      corners.write[corner] = level_grad == nullptr ? scratch : level_grad + offset;
    } else {
      corners.read[corner] = zeros;
      corners.write[corner] = scratch;
    }
  }
  return true;
}

// kDim > 0 fixes head_dim at compile time so the channel loops unroll into a few vector instructions; kDim == 0 is
// the generic runtime-sized version.
template <typename V, typename T, int kDim>
DDETR_WIDE_VECTORS void forward_impl(const V* value, const int64_t* shapes, const int64_t* starts,
                                     const T* locations, const T* weights, T* output, int64_t batch, int64_t sequence,
                                     int64_t queries, int64_t heads, int64_t head_dim_runtime, int64_t levels,
                                     int64_t points, int num_threads) {
  const int64_t head_dim = kDim > 0 ? kDim : head_dim_runtime;
  const int64_t row_stride = heads * head_dim;
  const int64_t samples = levels * points;
  const std::vector<V> zeros(head_dim, V(0));
  const V* zero_row = zeros.data();

#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t batch_query = 0; batch_query < batch * queries; ++batch_query) {
    const int64_t b = batch_query / queries;
    const V* batch_value = value + b * sequence * row_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t head_index = batch_query * heads + h;
      const T* head_locations = locations + head_index * samples * 2;
      const T* head_weights = weights + head_index * samples;
      T* out = output + head_index * head_dim;
      // Accumulate on the stack for the fixed-size case so the compiler keeps the sum in registers.
      T accumulator[kDim > 0 ? kDim : 1];
      T* acc = kDim > 0 ? accumulator : out;
      for (int64_t c = 0; c < head_dim; ++c) {
        acc[c] = T(0);
      }
      for (int64_t l = 0; l < levels; ++l) {
        const int64_t height = shapes[2 * l];
        const int64_t width = shapes[2 * l + 1];
        const V* level_value = batch_value + starts[l] * row_stride + h * head_dim;
        for (int64_t p = 0; p < points; ++p) {
          const int64_t s = l * points + p;
          const T x = head_locations[2 * s] * T(width) - T(0.5);
          const T y = head_locations[2 * s + 1] * T(height) - T(0.5);
          Corners<V, T> k;
          if (!resolve<V, T>(x, y, height, width, level_value, nullptr, row_stride, zero_row, nullptr, k)) {
            continue;
          }
          const T a = head_weights[s];
          const T w0 = a * k.weight[0], w1 = a * k.weight[1], w2 = a * k.weight[2], w3 = a * k.weight[3];
          const V *v0 = k.read[0], *v1 = k.read[1], *v2 = k.read[2], *v3 = k.read[3];
#pragma omp simd
          for (int64_t c = 0; c < head_dim; ++c) {
            acc[c] += w0 * to_compute(v0[c]) + w1 * to_compute(v1[c]) + w2 * to_compute(v2[c]) +
                      w3 * to_compute(v3[c]);
          }
        }
      }
      if (kDim > 0) {
        for (int64_t c = 0; c < head_dim; ++c) {
          out[c] = acc[c];
        }
      }
    }
  }
}

// Parallel over (batch, head, query chunk): a task owns grad_value[chunk, b, :, h] (or [chunk, b, h] heads-first),
// so the scatter needs no atomics and the result is deterministic.
template <typename V, typename T, int kDim>
void backward_impl(const V* value, const int64_t* shapes, const int64_t* starts, const T* locations, const T* weights,
                   const T* grad_output, T* grad_value, T* grad_locations, T* grad_weights, int64_t batch,
                   int64_t sequence, int64_t queries, int64_t heads, int64_t head_dim_runtime, int64_t levels,
                   int64_t points, int64_t chunks, int heads_first, int num_threads) {
  const int64_t head_dim = kDim > 0 ? kDim : head_dim_runtime;
  // Heads-first, a task's rows are contiguous, which the prefetchers and the TLB like better than rows strided by
  // heads * head_dim; the caller picks it when the transposes pay for themselves.
  const int64_t row_stride = heads_first ? head_dim : heads * head_dim;
  const int64_t head_stride = heads_first ? sequence * head_dim : head_dim;
  const int64_t samples = levels * points;
  const std::vector<V> zeros(head_dim, V(0));
  const V* zero_row = zeros.data();
  const int64_t tasks = batch * heads * chunks;

#pragma omp parallel num_threads(num_threads)
  {
    // Out-of-map corners write here; its contents are never read.
    std::vector<T> scratch(head_dim);
    // grad_value is zeroed here, in contiguous blocks shared among the threads, rather than by the caller: one pass
    // fewer over it, and a few large memsets instead of one per head_dim-sized piece of each task's strided slice.
    const int64_t grad_size = chunks * batch * sequence * heads * head_dim;
    const int64_t block = 1 << 16;
#pragma omp for schedule(static)
    for (int64_t begin = 0; begin < grad_size; begin += block) {
      const int64_t size = begin + block < grad_size ? block : grad_size - begin;
      std::memset(grad_value + begin, 0, size * sizeof(T));
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t chunk = task % chunks;
      const int64_t h = (task / chunks) % heads;
      const int64_t b = task / (chunks * heads);
      const int64_t query_begin = queries * chunk / chunks;
      const int64_t query_end = queries * (chunk + 1) / chunks;
      const V* head_value = value + b * sequence * heads * head_dim + h * head_stride;
      T* head_grad_value = grad_value + (chunk * batch + b) * sequence * heads * head_dim + h * head_stride;
      for (int64_t q = query_begin; q < query_end; ++q) {
        const int64_t head_index = (b * queries + q) * heads + h;
        const T* head_locations = locations + head_index * samples * 2;
        const T* head_weights = weights + head_index * samples;
        T* head_grad_locations = grad_locations + head_index * samples * 2;
        T* head_grad_weights = grad_weights + head_index * samples;
        const T* grad_out = grad_output + head_index * head_dim;
        for (int64_t l = 0; l < levels; ++l) {
          const int64_t height = shapes[2 * l];
          const int64_t width = shapes[2 * l + 1];
          const V* level_value = head_value + starts[l] * row_stride;
          T* level_grad = head_grad_value + starts[l] * row_stride;
          for (int64_t p = 0; p < points; ++p) {
            const int64_t s = l * points + p;
            const T x = head_locations[2 * s] * T(width) - T(0.5);
            const T y = head_locations[2 * s + 1] * T(height) - T(0.5);
            Corners<V, T> k;
            if (!resolve<V, T>(x, y, height, width, level_value, level_grad, row_stride, zero_row, scratch.data(),
                               k)) {
              head_grad_locations[2 * s] = T(0);
              head_grad_locations[2 * s + 1] = T(0);
              head_grad_weights[s] = T(0);
              continue;
            }
            const T a = head_weights[s];
            const T w0 = a * k.weight[0], w1 = a * k.weight[1], w2 = a * k.weight[2], w3 = a * k.weight[3];
            const V *v0 = k.read[0], *v1 = k.read[1], *v2 = k.read[2], *v3 = k.read[3];
            T *g0 = k.write[0], *g1 = k.write[1], *g2 = k.write[2], *g3 = k.write[3];
            // dot[i] = <grad_out, corner i>; they give both the weight gradient and the location gradient.
            T dot0 = T(0), dot1 = T(0), dot2 = T(0), dot3 = T(0);
#pragma omp simd reduction(+ : dot0, dot1, dot2, dot3)
            for (int64_t c = 0; c < head_dim; ++c) {
              const T g = grad_out[c];
              dot0 += g * to_compute(v0[c]);
              dot1 += g * to_compute(v1[c]);
              dot2 += g * to_compute(v2[c]);
              dot3 += g * to_compute(v3[c]);
              g0[c] += w0 * g;
              g1[c] += w1 * g;
              g2[c] += w2 * g;
              g3[c] += w3 * g;
            }
            const T fx = k.frac_x, fy = k.frac_y;
            head_grad_weights[s] = k.weight[0] * dot0 + k.weight[1] * dot1 + k.weight[2] * dot2 + k.weight[3] * dot3;
            // d(sample)/dx and d(sample)/dy of the bilinear interpolant, chained through x = loc_x * width - 0.5.
            const T grad_x = (T(1) - fy) * (dot1 - dot0) + fy * (dot3 - dot2);
            const T grad_y = (T(1) - fx) * (dot2 - dot0) + fx * (dot3 - dot1);
            head_grad_locations[2 * s] = a * grad_x * T(width);
            head_grad_locations[2 * s + 1] = a * grad_y * T(height);
          }
        }
      }
    }
  }
}

template <typename V, typename T>
void forward_dispatch(const V* value, const int64_t* shapes, const int64_t* starts, const T* locations,
                      const T* weights, T* output, int64_t batch, int64_t sequence, int64_t queries, int64_t heads,
                      int64_t head_dim, int64_t levels, int64_t points, int num_threads) {
  switch (head_dim) {
    case 32:
      forward_impl<V, T, 32>(value, shapes, starts, locations, weights, output, batch, sequence, queries, heads,
                             head_dim, levels, points, num_threads);
      break;
    case 64:
      forward_impl<V, T, 64>(value, shapes, starts, locations, weights, output, batch, sequence, queries, heads,
                             head_dim, levels, points, num_threads);
      break;
    default:
      forward_impl<V, T, 0>(value, shapes, starts, locations, weights, output, batch, sequence, queries, heads,
                            head_dim, levels, points, num_threads);
  }
}

template <typename V, typename T>
void backward_dispatch(const V* value, const int64_t* shapes, const int64_t* starts, const T* locations,
                       const T* weights, const T* grad_output, T* grad_value, T* grad_locations, T* grad_weights,
                       int64_t batch, int64_t sequence, int64_t queries, int64_t heads, int64_t head_dim,
                       int64_t levels, int64_t points, int64_t chunks, int heads_first, int num_threads) {
  switch (head_dim) {
    case 32:
      backward_impl<V, T, 32>(value, shapes, starts, locations, weights, grad_output, grad_value, grad_locations,
                              grad_weights, batch, sequence, queries, heads, head_dim, levels, points, chunks,
                              heads_first, num_threads);
      break;
    case 64:
      backward_impl<V, T, 64>(value, shapes, starts, locations, weights, grad_output, grad_value, grad_locations,
                              grad_weights, batch, sequence, queries, heads, head_dim, levels, points, chunks,
                              heads_first, num_threads);
      break;
    default:
      backward_impl<V, T, 0>(value, shapes, starts, locations, weights, grad_output, grad_value, grad_locations,
                             grad_weights, batch, sequence, queries, heads, head_dim, levels, points, chunks,
                             heads_first, num_threads);
  }
}

}  // namespace

// One forward and one backward entry point per value storage type: f32 and f64 compute in their own type, bf16
// values compute in float.
#define DDETR_MSDA_EXPORT(suffix, V, T)                                                                             \
  void ddetr_msda_forward_##suffix(const V* value, const int64_t* shapes, const int64_t* starts, const T* locations, \
                                   const T* weights, T* output, int64_t batch, int64_t sequence, int64_t queries,   \
                                   int64_t heads, int64_t head_dim, int64_t levels, int64_t points,                 \
                                   int num_threads) {                                                               \
    forward_dispatch<V, T>(value, shapes, starts, locations, weights, output, batch, sequence, queries, heads,      \
                           head_dim, levels, points, num_threads);                                                  \
  }                                                                                                                 \
  void ddetr_msda_backward_##suffix(const V* value, const int64_t* shapes, const int64_t* starts,                   \
                                    const T* locations, const T* weights, const T* grad_output, T* grad_value,      \
                                    T* grad_locations, T* grad_weights, int64_t batch, int64_t sequence,            \
                                    int64_t queries, int64_t heads, int64_t head_dim, int64_t levels,               \
                                    int64_t points, int64_t chunks, int heads_first, int num_threads) {             \
    backward_dispatch<V, T>(value, shapes, starts, locations, weights, grad_output, grad_value, grad_locations,     \
                            grad_weights, batch, sequence, queries, heads, head_dim, levels, points, chunks,        \
                            heads_first, num_threads);                                                              \
  }

extern "C" {

// Bumped whenever the C signatures change, checked by the Python loader.
int ddetr_msda_abi_version() { return 5; }

DDETR_MSDA_EXPORT(f32, float, float)
DDETR_MSDA_EXPORT(f64, double, double)
DDETR_MSDA_EXPORT(bf16, bfloat16_bits, float)

}  // extern "C"
