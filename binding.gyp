# Native addon virtnbd_native: libnbd, libvirt (+ libvirt-qemu), liblz4, libxxhash, zlib and BLAKE3 behind node-addon-api (C++17, exceptions on).
# BLAKE3 is the reference C implementation that Debian ships in librust-blake3-dev (its x86-64 assembly kernels),
# reached through the link native/blake3 made at configure time (gyp's make rules need sources below this folder).
{
  "variables": {
    "native_libs": "libnbd libvirt libvirt-qemu liblz4 libxxhash zlib",
    "blake3_dir": "<!(ln -sfn \"$(ls -d /usr/share/cargo/registry/blake3-*/c | sort -V | tail -n 1)\" native/blake3 && echo native/blake3)"
  },
  "targets": [
    {
      "target_name": "virtnbd_native",
      "sources": [
        "native/addon.cc",
        "native/adler32.cc",
        "native/checksum.cc",
        "native/libvirt.cc",
        "native/lz4.cc",
        "native/nbd_handle.cc",
        "<(blake3_dir)/blake3.c",
        "<(blake3_dir)/blake3_dispatch.c",
        "<(blake3_dir)/blake3_portable.c",
        "<(blake3_dir)/blake3_sse2_x86-64_unix.S",
        "<(blake3_dir)/blake3_sse41_x86-64_unix.S",
        "<(blake3_dir)/blake3_avx2_x86-64_unix.S",
        "<(blake3_dir)/blake3_avx512_x86-64_unix.S"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")", "<(blake3_dir)"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags": ["-Wall", "-Wextra", "<!@(pkg-config --cflags <(native_libs))"],
      "cflags_cc": ["-std=c++17", "-fexceptions"],
      "libraries": ["<!@(pkg-config --libs <(native_libs))"]
    }
  ]
}
