# Native addon virtnbd_native: libnbd, libvirt (+ libvirt-qemu), liblz4 and zlib behind node-addon-api (C++17, exceptions on).
{
  "variables": {
    "native_libs": "libnbd libvirt libvirt-qemu liblz4 zlib"
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
        "native/nbd_handle.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NAPI_CPP_EXCEPTIONS", "NODE_ADDON_API_DISABLE_DEPRECATED"],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17"],
      "cflags": ["-Wall", "-Wextra", "<!@(pkg-config --cflags <(native_libs))"],
      "cflags_cc": ["-std=c++17", "-fexceptions"],
      "libraries": ["<!@(pkg-config --libs <(native_libs))"]
    }
  ]
}
