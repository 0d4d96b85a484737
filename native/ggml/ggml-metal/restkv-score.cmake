# GGML_OP_RESTKV_SCORE (pyrestkv) on Metal, included by ggml-metal/CMakeLists.txt (patches/0003).
#
# The kernels stay out of ggml's Metal library: not in METALLIB_KERNEL_SOURCES, so neither in the
# per-kind embedded sources (GGML_METAL_EMBED_LIBRARY, what macOS builds use) nor in the xcrun-built
# default.metallib. A compile error in them therefore cannot fail ggml's library, the build of
# default.metallib, or the start of the Metal backend. Their source is embedded here as a string, in
# every mode, and restkv-score-metal.cpp compiles it at run time into a library of its own; if that
# fails, supports_op is false for the op (see restkv-score-metal.h).
#
# The embedded text is kernels/restkv_score.metal with its two quoted includes inlined, the same
# text that tests/test_metal_compile.py compiles against its MSL shim.

set(RESTKV_METAL_KERNEL "${CMAKE_CURRENT_SOURCE_DIR}/kernels/restkv_score.metal")
set(RESTKV_METAL_HEADER "${CMAKE_CURRENT_SOURCE_DIR}/restkv-score-metal.h")
set(RESTKV_COMMON_HEADER "${CMAKE_CURRENT_SOURCE_DIR}/../restkv-score-common.h")
set(RESTKV_METAL_GEN_DIR "${CMAKE_CURRENT_BINARY_DIR}/restkv-score")

set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
    "${RESTKV_METAL_KERNEL}" "${RESTKV_METAL_HEADER}" "${RESTKV_COMMON_HEADER}")

file(READ "${RESTKV_METAL_KERNEL}" _restkv_src)
file(READ "${RESTKV_METAL_HEADER}" _restkv_hdr)
file(READ "${RESTKV_COMMON_HEADER}" _restkv_common)

foreach(_inc "restkv-score-metal.h" "restkv-score-common.h")
    string(FIND "${_restkv_src}" "#include \"${_inc}\"" _pos)
    if (_pos EQUAL -1)
        message(FATAL_ERROR "restkv: ${RESTKV_METAL_KERNEL} does not include \"${_inc}\"")
    endif()
endforeach()
string(REPLACE "#include \"restkv-score-metal.h\"" "${_restkv_hdr}" _restkv_src "${_restkv_src}")
string(REPLACE "#include \"restkv-score-common.h\"" "${_restkv_common}" _restkv_src "${_restkv_src}")

string(FIND "${_restkv_src}" ")restkv_msl\"" _pos)
if (NOT _pos EQUAL -1)
    message(FATAL_ERROR "restkv: the Metal source contains the raw-string delimiter )restkv_msl\"")
endif()

file(MAKE_DIRECTORY "${RESTKV_METAL_GEN_DIR}")
# a C++ raw string literal, included by restkv-score-metal.cpp; rewritten only when it changes
file(WRITE "${RESTKV_METAL_GEN_DIR}/restkv-score-metal-src.inc.tmp"
    [=[R"restkv_msl(]=] "${_restkv_src}" [=[)restkv_msl"]=] "\n")
configure_file("${RESTKV_METAL_GEN_DIR}/restkv-score-metal-src.inc.tmp"
               "${RESTKV_METAL_GEN_DIR}/restkv-score-metal-src.inc" COPYONLY)

target_sources(ggml-metal PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/restkv-score-metal.cpp")
target_include_directories(ggml-metal PRIVATE "${RESTKV_METAL_GEN_DIR}")
