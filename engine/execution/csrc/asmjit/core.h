/* A stand-in for asmjit's header, which torch's wheel does not ship: FBGEMM's headers name asmjit's
 * register types (SimdUtils.h) but fp16_gemm.cpp uses none of them, nor any asmjit code. */
#pragma once
#define ASMJIT_LIBRARY_MAKE_VERSION(major, minor, patch) (((major) << 16) | ((minor) << 8) | (patch))
#define ASMJIT_LIBRARY_VERSION 0
