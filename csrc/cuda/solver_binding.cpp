// Torch binding of the CUDA solver kernels: the cuda_neumann_step / axpy_dot /
// cg_update / multi_dot kernel ops. Builds the multi-tensor table (pointers,
// block -> tensor map) in pinned host memory and copies it asynchronously.
#include <torch/library.h>

#include <initializer_list>
#include <vector>

#include "binding_common.h"
#include "solver.h"

namespace commentaries_ext {
namespace {

namespace ck = cuda_kernels;
using namespace cuda_binding;

struct Table {
  at::Tensor ptrs, numel, block_tensor, block_start;  // device tensors kept alive until the launch is queued
  ck::TensorTable tab;
};

// The table is copied from pinned host memory that is reused after the call, so a CUDA graph
// capturing these ops would replay copies of stale tables: refused with an error.
void check_not_capturing(const char* op) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(current_stream(), &status), op);
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op,
              ": cannot be captured in a CUDA graph (its tensor table is copied from host memory at each call)");
}

Table make_table(std::initializer_list<at::TensorList> lists, const char* op) {
  check_not_capturing(op);
  const at::TensorList& first = *lists.begin();  // not empty: checked by each op before its device guard
  const int64_t T = static_cast<int64_t>(first.size());
  const auto dev = first[0].device();
  std::vector<int64_t> nblocks(T);
  int64_t blocks = 0;
  for (int64_t i = 0; i < T; ++i) {
    nblocks[i] = (first[i].numel() + ck::kSolverBlockElems - 1) / ck::kSolverBlockElems;
    blocks += nblocks[i];
  }
  const auto pinned = at::TensorOptions().dtype(at::kLong).pinned_memory(true);
  at::Tensor ptrs = at::empty({static_cast<int64_t>(lists.size()) * T}, pinned);
  at::Tensor numel = at::empty({T}, pinned);
  at::Tensor bt = at::empty({std::max<int64_t>(blocks, 1)}, pinned.dtype(at::kInt));
  at::Tensor bs = at::empty({std::max<int64_t>(blocks, 1)}, pinned);
  int64_t* pp = ptrs.data_ptr<int64_t>();
  int64_t l = 0;
  for (const at::TensorList& ts : lists) {
    TORCH_CHECK(static_cast<int64_t>(ts.size()) == T, "cuda solver op: lists of different lengths");
    for (int64_t i = 0; i < T; ++i) {
      TORCH_CHECK(ts[i].is_contiguous() && ts[i].numel() == first[i].numel() && ts[i].device() == dev &&
                      ts[i].scalar_type() == first[0].scalar_type(),
                  "cuda solver op: tensor ", i, " of list ", l, " does not match (contiguous, shape, device, dtype)");
      pp[l * T + i] = reinterpret_cast<int64_t>(ts[i].data_ptr());
    }
    ++l;
  }
  int32_t* btp = bt.data_ptr<int32_t>();
  int64_t* bsp = bs.data_ptr<int64_t>();
  int64_t* np = numel.data_ptr<int64_t>();
  int64_t b = 0;
  for (int64_t i = 0; i < T; ++i) {
    np[i] = first[i].numel();
    for (int64_t j = 0; j < nblocks[i]; ++j, ++b) {
      btp[b] = static_cast<int32_t>(i);
      bsp[b] = j * ck::kSolverBlockElems;
    }
  }
  Table t;
  t.ptrs = ptrs.to(dev, /*non_blocking=*/true);
  t.numel = numel.to(dev, true);
  t.block_tensor = bt.to(dev, true);
  t.block_start = bs.to(dev, true);
  t.tab = {t.ptrs.data_ptr<int64_t>(), T, t.numel.data_ptr<int64_t>(), t.block_tensor.data_ptr<int32_t>(),
           t.block_start.data_ptr<int64_t>(), blocks};
  return t;
}

ck::SolverDType element(const at::Tensor& t, const char* op) {
  return static_cast<ck::SolverDType>(dtype_code(t, op));
}

at::Tensor scalar_on(const at::Tensor& s, const at::Tensor& like) {
  return s.reshape({}).to(like.device(), acc_type(like.scalar_type())).contiguous();
}

at::Tensor finish(const at::Tensor& partial, const at::Tensor& like) {
  return partial.sum(at::kDouble).to(acc_type(like.scalar_type()));
}

void neumann_step(at::TensorList c, at::TensorList p, at::TensorList h, const at::Tensor& alpha) {
  const char* op = "cuda_neumann_step";
  TORCH_CHECK(!c.empty(), op, ": the tensor lists are empty");
  c10::cuda::CUDAGuard guard(c[0].device());
  Table t = make_table({c, p, h}, op);
  at::Tensor a = scalar_on(alpha, c[0]);
  check_cuda(ck::neumann_step(element(c[0], op), t.tab, a.data_ptr(), current_stream()), op);
}

at::Tensor axpy_dot(at::TensorList y, const at::Tensor& a, at::TensorList x, at::TensorList z) {
  const char* op = "cuda_axpy_dot";
  TORCH_CHECK(!y.empty(), op, ": the tensor lists are empty");
  c10::cuda::CUDAGuard guard(y[0].device());
  const bool has_z = !z.empty();
  Table t = has_z ? make_table({y, x, z}, op) : make_table({y, x}, op);
  at::Tensor av = scalar_on(a, y[0]);
  at::Tensor partial = at::zeros({std::max<int64_t>(t.tab.blocks, 1)}, y[0].options().dtype(acc_type(y[0].scalar_type())));
  check_cuda(ck::axpy_dot(element(y[0], op), t.tab, has_z, av.data_ptr(), partial.data_ptr(), current_stream()), op);
  return finish(partial, y[0]);
}

at::Tensor cg_update(at::TensorList x, at::TensorList r, at::TensorList d, at::TensorList q, const at::Tensor& a) {
  const char* op = "cuda_cg_update";
  TORCH_CHECK(!x.empty(), op, ": the tensor lists are empty");
  c10::cuda::CUDAGuard guard(x[0].device());
  Table t = make_table({x, r, d, q}, op);
  at::Tensor av = scalar_on(a, x[0]);
  at::Tensor partial = at::zeros({std::max<int64_t>(t.tab.blocks, 1)}, x[0].options().dtype(acc_type(x[0].scalar_type())));
  check_cuda(ck::cg_update(element(x[0], op), t.tab, av.data_ptr(), partial.data_ptr(), current_stream()), op);
  return finish(partial, x[0]);
}

at::Tensor multi_dot(at::TensorList x, at::TensorList y) {
  const char* op = "cuda_multi_dot";
  TORCH_CHECK(!x.empty(), op, ": the tensor lists are empty");
  c10::cuda::CUDAGuard guard(x[0].device());
  const bool has_y = !y.empty();
  Table t = has_y ? make_table({x, y}, op) : make_table({x}, op);
  at::Tensor partial = at::zeros({std::max<int64_t>(t.tab.blocks, 1)}, x[0].options().dtype(acc_type(x[0].scalar_type())));
  check_cuda(ck::multi_dot(element(x[0], op), t.tab, has_y, partial.data_ptr(), current_stream()), op);
  return finish(partial, x[0]);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cuda_neumann_step(Tensor(a!)[] c, Tensor(b!)[] p, Tensor[] h, Tensor alpha) -> ()");
  m.def("cuda_axpy_dot(Tensor(a!)[] y, Tensor a, Tensor[] x, Tensor[] z) -> Tensor");
  m.def("cuda_cg_update(Tensor(a!)[] x, Tensor(b!)[] r, Tensor[] d, Tensor[] q, Tensor a) -> Tensor");
  m.def("cuda_multi_dot(Tensor[] x, Tensor[] y) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CUDA, m) {
  m.impl("cuda_neumann_step", &neumann_step);
  m.impl("cuda_axpy_dot", &axpy_dot);
  m.impl("cuda_cg_update", &cg_update);
  m.impl("cuda_multi_dot", &multi_dot);
}

}  // namespace commentaries_ext
