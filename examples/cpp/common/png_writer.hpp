// Minimal PNG writer for the examples: 8-bit grayscale or RGB, stored (uncompressed) deflate
// blocks, so no zlib. Header-only, C++17 standard library only.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace distill_png {

inline uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
    static const std::array<uint32_t, 256> table = [] {
        std::array<uint32_t, 256> t{};
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

inline uint32_t adler32(const std::vector<uint8_t>& d) {
    uint32_t a = 1, b = 0;
    for (uint8_t x : d) {
        a = (a + x) % 65521;
        b = (b + a) % 65521;
    }
    return (b << 16) | a;
}

inline void put_u32(std::vector<uint8_t>& out, uint32_t v) {
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

inline void chunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
    put_u32(out, static_cast<uint32_t>(data.size()));
    std::vector<uint8_t> body(type, type + 4);
    body.insert(body.end(), data.begin(), data.end());
    out.insert(out.end(), body.begin(), body.end());
    put_u32(out, crc32(body.data(), body.size()));
}

// 8-bit grayscale (channels 1) or RGB (channels 3) PNG of interleaved pixels.
inline bool write_png(const std::string& path, uint32_t w, uint32_t h, uint32_t channels,
               const std::vector<uint8_t>& pixels) {
    std::vector<uint8_t> raw;  // each row: filter type 0 (none), then the row
    const size_t stride = static_cast<size_t>(w) * channels;
    for (uint32_t y = 0; y < h; ++y) {
        raw.push_back(0);
        raw.insert(raw.end(), pixels.begin() + y * stride, pixels.begin() + (y + 1) * stride);
    }
    std::vector<uint8_t> z = {0x78, 0x01};  // zlib header: deflate, no preset dictionary
    size_t pos = 0;
    do {  // stored blocks of at most 65535 bytes
        const size_t len = std::min<size_t>(65535, raw.size() - pos);
        const bool last = pos + len == raw.size();
        z.push_back(last ? 1 : 0);
        z.push_back(static_cast<uint8_t>(len));
        z.push_back(static_cast<uint8_t>(len >> 8));
        z.push_back(static_cast<uint8_t>(~len));
        z.push_back(static_cast<uint8_t>(~len >> 8));
        z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + len);
        pos += len;
    } while (pos < raw.size());
    put_u32(z, adler32(raw));

    std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    std::vector<uint8_t> ihdr;
    put_u32(ihdr, w);
    put_u32(ihdr, h);
    ihdr.push_back(8);                        // bit depth
    ihdr.push_back(channels == 3 ? 2 : 0);    // colour type: RGB or grayscale
    ihdr.push_back(0);                        // compression: deflate
    ihdr.push_back(0);                        // filter method
    ihdr.push_back(0);                        // no interlace
    chunk(png, "IHDR", ihdr);
    chunk(png, "IDAT", z);
    chunk(png, "IEND", {});
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    return static_cast<bool>(f);
}

// Images [n, C, H, W] in [-1, 1] side by side as one PNG (C = 3: RGB, else channel 0 in gray).
inline bool write_grid(const std::string& path, const float* images, size_t n, uint32_t C,
                       uint32_t H, uint32_t W) {
    const uint32_t out_c = C == 3 ? 3 : 1, gw = W * static_cast<uint32_t>(n);
    std::vector<uint8_t> px(static_cast<size_t>(gw) * H * out_c);
    for (size_t k = 0; k < n; ++k)
        for (uint32_t y = 0; y < H; ++y)
            for (uint32_t x = 0; x < W; ++x)
                for (uint32_t c = 0; c < out_c; ++c) {
                    const float v = images[((k * C + c) * H + y) * W + x];
                    const float u = (std::min(std::max(v, -1.f), 1.f) + 1.f) * 127.5f + 0.5f;
                    px[(static_cast<size_t>(y) * gw + k * W + x) * out_c + c] = static_cast<uint8_t>(u);
                }
    return write_png(path, gw, H, out_c, px);
}

}  // namespace distill_png
