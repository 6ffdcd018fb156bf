/* See core.h: the register types FBGEMM's SimdUtils.h names, as empty types. */
#pragma once
namespace asmjit::x86 {
struct Xmm {};
struct Ymm {};
struct Zmm {};
}  // namespace asmjit::x86
