/*
 * wuffs_png.h — the part of the vendored Wuffs library (third_party/wuffs,
 * docs/DEPENDENCIES.md) that image.c uses: its PNG decoder and the modules
 * under it. Include this, not the release file, so that the declarations
 * and src/wuffs_impl.c's implementation see the same module list.
 */
#ifndef ALBEDO_WUFFS_PNG_H
#define ALBEDO_WUFFS_PNG_H

#define WUFFS_CONFIG__MODULES
#define WUFFS_CONFIG__MODULE__BASE
#define WUFFS_CONFIG__MODULE__ADLER32
#define WUFFS_CONFIG__MODULE__CRC32
#define WUFFS_CONFIG__MODULE__DEFLATE
#define WUFFS_CONFIG__MODULE__ZLIB
#define WUFFS_CONFIG__MODULE__PNG
#include "wuffs-v0.3.c"

#endif
