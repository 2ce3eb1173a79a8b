// distill C API from C++17: load an exported generator (.onnx) or a checkpoint folder, generate
// one digit per label given on the command line, write a PNG grid and the raw floats.
//
//   distill_capi_demo MODEL OUT_PREFIX [--seed N] LABEL [LABEL ...]
//
// Writes OUT_PREFIX.png (the images side by side) and OUT_PREFIX.f32 (little-endian f32,
// [n, channels, height, width], values in [-1, 1]). Same seed, same images as
// `distill sample --seed N`. No dependencies beyond the C++ standard library and distill.h:
// the PNG is written with stored (uncompressed) deflate blocks, so no zlib.

#include "distill.h"
#include "../common/png_writer.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace {

// ---- distill -----------------------------------------------------------------------------

[[noreturn]] void fail(const char* what, DistillStatus s) {
    std::cerr << "error: " << what << " failed (status " << static_cast<int>(s)
              << "): " << distill_last_error() << "\n";
    std::exit(1);
}

int usage() {
    std::cerr << "usage: distill_capi_demo MODEL OUT_PREFIX [--seed N] LABEL [LABEL ...]\n"
                 "  MODEL: an exported generator .onnx or a checkpoint folder\n";
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) return usage();
    const std::string model_path = argv[1], prefix = argv[2];
    uint64_t seed = 0;
    std::vector<int32_t> labels;
    for (int i = 3; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--seed" && i + 1 < argc) {
            seed = std::strtoull(argv[++i], nullptr, 10);
        } else {
            char* end = nullptr;
            const long l = std::strtol(a.c_str(), &end, 10);
            if (end == a.c_str() || *end != '\0') return usage();
            labels.push_back(static_cast<int32_t>(l));
        }
    }
    if (labels.empty()) return usage();

    DistillModel* model = nullptr;
    DistillStatus s = distill_model_load(model_path.c_str(), &model);
    if (s != DISTILL_STATUS_OK) fail("distill_model_load", s);
    DistillModelInfo info{};
    if ((s = distill_model_info(model, &info)) != DISTILL_STATUS_OK) fail("distill_model_info", s);
    std::cout << "distill " << distill_version() << ": " << model_path << " ("
              << (info.backend == DISTILL_BACKEND_CANDLE ? "candle" : "onnxruntime") << "), "
              << info.channels << "x" << info.height << "x" << info.width << ", "
              << info.num_classes << " classes, " << info.num_fresh_noise << " fresh-noise inputs\n";

    const size_t n = labels.size();
    std::vector<float> images(distill_image_len(model, n));
    s = distill_generate_seeded(model, labels.data(), n, seed, images.data(), images.size());
    if (s != DISTILL_STATUS_OK) fail("distill_generate_seeded", s);

    {
        std::ofstream raw(prefix + ".f32", std::ios::binary);
        raw.write(reinterpret_cast<const char*>(images.data()),
                  static_cast<std::streamsize>(images.size() * sizeof(float)));
        if (!raw) {
            std::cerr << "error: writing " << prefix << ".f32\n";
            return 1;
        }
    }
    if (!distill_png::write_grid(prefix + ".png", images.data(), n, info.channels, info.height,
                                 info.width)) {
        std::cerr << "error: writing " << prefix << ".png\n";
        return 1;
    }
    std::cout << "wrote " << prefix << ".png and " << prefix << ".f32 (" << n << " images)\n";
    distill_model_free(model);
    return 0;
}
