// A C interface to libtorch's c10d (TCPStore rendezvous + ProcessGroupGloo, and
// ProcessGroupNCCL when built with USE_C10D_NCCL) for forge's Rust trainer.
//
// Every entry point catches C++ exceptions and returns them as a malloc'd error string
// (NULL on success) that the caller frees with forge_c10d_free_error: no exception ever
// unwinds into Rust. Tensors arrive as `at::Tensor*` (tch's C_tensor).

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "guarded.h"

namespace {

using forge_shim::guarded;

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // what a subgroup needs to create its own backend of the same kind
  std::string host;
  int kind;
};

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp::SUM;
    case 1:
      return c10d::ReduceOp::MAX;
    case 2:
      return c10d::ReduceOp::MIN;
    default:
      throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait(g->timeout);
}

// The backend of one group over `store` (the rendezvous store, or a prefix of it for a
// subgroup). backend: 0 = gloo, 1 = nccl.
c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                               int world, std::chrono::milliseconds timeout, int backend,
                                               const std::string& host) {
  if (backend == 0) {
    auto o = c10d::ProcessGroupGloo::Options::create(timeout);
    // The interface(s) Gloo binds to: GLOO_SOCKET_IFNAME (comma-separated) as in PyTorch;
    // else MASTER_ADDR when it is an address of this machine (node 0, or one node);
    // else the address this machine's hostname resolves to (the other nodes).
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && ifname[0] != '\0') {
      std::string names(ifname);
      std::size_t begin = 0;
      while (begin <= names.size()) {
        std::size_t end = names.find(',', begin);
        if (end == std::string::npos) end = names.size();
        if (end > begin) {
          o->devices.push_back(
              c10d::ProcessGroupGloo::createDeviceForInterface(names.substr(begin, end - begin)));
        }
        begin = end + 1;
      }
    }
    if (o->devices.empty()) {
      try {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
      } catch (const std::exception&) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
    }
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
  } else if (backend == 1) {
#ifdef USE_C10D_NCCL
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
    throw std::runtime_error(
        "this forge build has no NCCL backend (built against a libtorch without "
        "libtorch_cuda/NCCL headers): use dist.backend gloo");
#endif
  } else {
    throw std::invalid_argument("unknown backend " + std::to_string(backend));
  }
}

}  // namespace

extern "C" {

// 1 when this shim was built with the NCCL backend.
int forge_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

void forge_c10d_free_error(char* e) { std::free(e); }

// Rendezvous at host:port and create the process group. Rank 0 hosts the TCPStore, unless
// agent_store is set (torchrun's agent already hosts it there: every rank is a client).
// backend: 0 = gloo, 1 = nccl.
char* forge_c10d_new(const char* host, int port, int rank, int world, long long timeout_ms,
                     int backend, int agent_store, void** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0 && agent_store == 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->timeout = timeout;
    g->host = host;
    g->kind = backend;
    g->backend = make_backend(store, rank, world, timeout, backend, g->host);
    *out = g.release();
  });
}

void forge_c10d_free(void* group) { delete static_cast<Group*>(group); }

// A group of some of the parent's ranks (torch.distributed.new_group): every member calls
// it with the same `name`, its own rank in the subgroup and the subgroup's size; the
// subgroup rendezvouses through the parent's store under the prefix `name`.
char* forge_c10d_subgroup(void* parent, const char* name, int rank, int world, void** out) {
  return guarded([&] {
    auto p = static_cast<Group*>(parent);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(name), p->store);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->timeout = p->timeout;
    g->host = p->host;
    g->kind = p->kind;
    g->backend = make_backend(store, rank, world, p->timeout, p->kind, p->host);
    *out = g.release();
  });
}

char* forge_c10d_all_reduce(void* group, at::Tensor* t, int op) {
  return guarded([&] {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(op);
    o.timeout = g->timeout;
    wait(g, g->backend->allreduce(ts, o));
  });
}

char* forge_c10d_broadcast(void* group, at::Tensor* t, int root) {
  return guarded([&] {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = g->timeout;
    wait(g, g->backend->broadcast(ts, o));
  });
}

// out has world * numel(input) elements; rank r's input lands at [r*n, (r+1)*n).
char* forge_c10d_all_gather(void* group, at::Tensor* out, at::Tensor* input) {
  return guarded([&] {
    auto g = static_cast<Group*>(group);
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->_allgather_base(*out, *input, o));
  });
}

// input has world * numel(out) elements; out receives the reduction of chunk `rank`.
char* forge_c10d_reduce_scatter(void* group, at::Tensor* out, at::Tensor* input, int op) {
  return guarded([&] {
    auto g = static_cast<Group*>(group);
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(op);
    o.timeout = g->timeout;
    wait(g, g->backend->_reduce_scatter_base(*out, *input, o));
  });
}

char* forge_c10d_barrier(void* group) {
  return guarded([&] {
    auto g = static_cast<Group*>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->barrier(o));
  });
}

// CUDA caching-allocator statistics of one device (what torch.cuda.max_memory_allocated
// reads): the peak of allocated bytes since the last reset (-1 without CUDA in this build).
long long forge_cuda_peak_allocated(int device) {
#ifdef USE_C10D_NCCL
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return static_cast<long long>(stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak);
  } catch (...) {
    return -1;
  }
#else
  (void)device;
  return -1;
#endif
}

// Resets the peak statistics of one device (no-op without CUDA in this build).
void forge_cuda_reset_peak(int device) {
#ifdef USE_C10D_NCCL
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  } catch (...) {
  }
#else
  (void)device;
#endif
}

}  // extern "C"
