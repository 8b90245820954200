/*
 * wuffs_impl.c — the implementation of the vendored Wuffs release
 * (third_party/wuffs/wuffs-v0.3.c, unmodified) for the modules that
 * wuffs_png.h names. Built without the project's warning flags
 * (CMakeLists.txt): it is not our code.
 */
#define WUFFS_IMPLEMENTATION
#include "wuffs_png.h"
