// What forge's C shims share: no C++ exception unwinds into Rust. `guarded` runs a body and
// returns NULL on success, or the exception's message as a malloc'd string that the caller
// hands back to the shim's free function.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace forge_shim {

inline char* dup_error(const std::string& what) {
  char* out = static_cast<char*>(std::malloc(what.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, what.c_str(), what.size() + 1);
  }
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return dup_error(e.what());
  } catch (...) {
    return dup_error("unknown C++ exception");
  }
}

}  // namespace forge_shim
