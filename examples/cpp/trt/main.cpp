// A distill TensorRT engine from C++17 with the TensorRT 10 runtime API: load `<stem>.plan`,
// read its `<stem>.plan.json` sidecar for the tensor names and shapes, generate one image per
// label given on the command line, write a PNG grid and the raw floats.
//
//   distill_trt_demo PLAN OUT_PREFIX [--seed N | --noise FILE] LABEL [LABEL ...]
//
// --noise FILE: raw little-endian f32 noise, every noise input back to back ([n,C,H,W] each,
// `noise` first), e.g. from the C API's distill_seeded_noise, to reproduce distill's images
// exactly; otherwise the noise is drawn here from std::normal_distribution seeded with N.

#include "../common/png_writer.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

#define CUDA_CHECK(call)                                                                  \
    do {                                                                                  \
        const cudaError_t e_ = (call);                                                    \
        if (e_ != cudaSuccess) {                                                          \
            std::cerr << "CUDA error " << cudaGetErrorString(e_) << " at " #call "\n";    \
            std::exit(1);                                                                 \
        }                                                                                 \
    } while (0)

class Logger : public nvinfer1::ILogger {
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
    }
};

[[noreturn]] void die(const std::string& msg) {
    std::cerr << "error: " << msg << "\n";
    std::exit(1);
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die("cannot read " + path);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

// ---- minimal scanning of the sidecar JSON (its layout is fixed: see export/src/tensorrt/sidecar.rs)

// Position just after `"key":` at or after `from`.
size_t after_key(const std::string& s, const std::string& key, size_t from = 0) {
    const size_t k = s.find("\"" + key + "\"", from);
    if (k == std::string::npos) die("sidecar has no \"" + key + "\"");
    const size_t colon = s.find(':', k);
    return colon + 1;
}

std::string string_at(const std::string& s, size_t pos) {
    const size_t a = s.find('"', pos), b = s.find('"', a + 1);
    return s.substr(a + 1, b - a - 1);
}

long long int_at(const std::string& s, size_t pos) {
    return std::strtoll(s.c_str() + s.find_first_of("-0123456789", pos), nullptr, 10);
}

std::vector<int64_t> int_array_at(const std::string& s, size_t pos) {
    const size_t a = s.find('[', pos), b = s.find(']', a);
    std::vector<int64_t> v;
    std::stringstream in(s.substr(a + 1, b - a - 1));
    std::string tok;
    while (std::getline(in, tok, ',')) v.push_back(std::stoll(tok));
    return v;
}

struct Tensor {
    std::string name, dtype;
    std::vector<int64_t> shape;  // -1 = batch
};

// The objects of the array under `key` (objects hold no nested objects, only arrays).
std::vector<Tensor> tensors_at(const std::string& s, const std::string& key) {
    std::vector<Tensor> out;
    size_t p = s.find('[', after_key(s, key));
    int depth = 0;
    for (size_t i = p; i < s.size(); ++i) {
        if (s[i] == '[') ++depth;
        if (s[i] == ']' && --depth == 0) break;
        if (s[i] == '{') {
            const size_t end = s.find('}', i);
            const std::string obj = s.substr(i, end - i + 1);
            out.push_back({string_at(obj, after_key(obj, "name")), string_at(obj, after_key(obj, "dtype")),
                           int_array_at(obj, after_key(obj, "shape"))});
            i = end;
        }
    }
    return out;
}

size_t volume(const nvinfer1::Dims& d) {
    size_t v = 1;
    for (int i = 0; i < d.nbDims; ++i) v *= static_cast<size_t>(d.d[i]);
    return v;
}

int usage() {
    std::cerr << "usage: distill_trt_demo PLAN OUT_PREFIX [--seed N | --noise FILE] LABEL [LABEL ...]\n";
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 4) return usage();
    const std::string plan_path = argv[1], prefix = argv[2];
    uint64_t seed = 0;
    std::string noise_file;
    std::vector<int32_t> labels;
    for (int i = 3; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--seed" && i + 1 < argc) {
            seed = std::strtoull(argv[++i], nullptr, 10);
        } else if (a == "--noise" && i + 1 < argc) {
            noise_file = argv[++i];
        } else {
            char* end = nullptr;
            const long l = std::strtol(a.c_str(), &end, 10);
            if (end == a.c_str() || *end != '\0') return usage();
            labels.push_back(static_cast<int32_t>(l));
        }
    }
    const size_t n = labels.size();
    if (n == 0) return usage();

    const std::string sidecar = read_file(plan_path + ".json");
    const std::vector<Tensor> inputs = tensors_at(sidecar, "inputs");
    const std::vector<Tensor> outputs = tensors_at(sidecar, "outputs");
    const long long min_batch = int_at(sidecar, after_key(sidecar, "min_batch"));
    const long long max_batch = int_at(sidecar, after_key(sidecar, "max_batch"));
    const long long num_classes = int_at(sidecar, after_key(sidecar, "num_classes"));
    if (static_cast<long long>(n) < min_batch || static_cast<long long>(n) > max_batch)
        die("the plan takes " + std::to_string(min_batch) + " to " + std::to_string(max_batch) +
            " images at once, not " + std::to_string(n));
    for (int32_t l : labels)
        if (l < 0 || l >= num_classes) die("label " + std::to_string(l) + " is out of range");
    if (outputs.size() != 1 || outputs[0].name != "images") die("expected one output `images`");

    Logger logger;
    const std::string blob = read_file(plan_path);
    std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
    if (!runtime) die("createInferRuntime failed");
    std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(blob.data(), blob.size())};
    if (!engine) die("deserializeCudaEngine failed (plan built by another TensorRT version or for another GPU?)");
    std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};
    if (!context) die("createExecutionContext failed");

    // Host inputs: noise blocks (given or drawn) and the labels.
    std::vector<std::vector<float>> noise;
    size_t noise_inputs = 0;
    for (const Tensor& t : inputs) noise_inputs += t.dtype == "float32";
    std::vector<float> given;
    if (!noise_file.empty()) {
        const std::string raw = read_file(noise_file);
        given.resize(raw.size() / sizeof(float));
        std::memcpy(given.data(), raw.data(), given.size() * sizeof(float));
    }
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.f, 1.f);

    cudaStream_t stream;
    CUDA_CHECK(cudaStreamCreate(&stream));
    std::vector<void*> device;
    size_t used = 0;
    for (const Tensor& t : inputs) {
        nvinfer1::Dims d{};
        d.nbDims = static_cast<int32_t>(t.shape.size());
        for (int i = 0; i < d.nbDims; ++i) d.d[i] = t.shape[i] < 0 ? static_cast<int64_t>(n) : t.shape[i];
        if (!context->setInputShape(t.name.c_str(), d)) die("setInputShape(" + t.name + ") failed");
        const size_t count = volume(d);
        void* buf = nullptr;
        if (t.dtype == "int32") {
            if (engine->getTensorDataType(t.name.c_str()) != nvinfer1::DataType::kINT32) die(t.name + " is not int32");
            CUDA_CHECK(cudaMalloc(&buf, count * sizeof(int32_t)));
            CUDA_CHECK(cudaMemcpyAsync(buf, labels.data(), count * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
        } else {
            if (engine->getTensorDataType(t.name.c_str()) != nvinfer1::DataType::kFLOAT) die(t.name + " is not float32");
            noise.emplace_back(count);
            std::vector<float>& v = noise.back();
            if (!given.empty()) {
                if (given.size() < used + count)
                    die(noise_file + " holds " + std::to_string(given.size()) + " floats, " +
                        std::to_string(count * noise_inputs) + " needed");
                std::copy(given.begin() + used, given.begin() + used + count, v.begin());
                used += count;
            } else {
                for (float& x : v) x = normal(rng);
            }
            CUDA_CHECK(cudaMalloc(&buf, count * sizeof(float)));
            CUDA_CHECK(cudaMemcpyAsync(buf, v.data(), count * sizeof(float), cudaMemcpyHostToDevice, stream));
        }
        if (!context->setTensorAddress(t.name.c_str(), buf)) die("setTensorAddress(" + t.name + ") failed");
        device.push_back(buf);
    }
    // The output's shape follows from the input shapes.
    const nvinfer1::Dims od = context->getTensorShape("images");
    if (od.nbDims != 4) die("unexpected output rank");
    const size_t out_count = volume(od);
    void* out_buf = nullptr;
    CUDA_CHECK(cudaMalloc(&out_buf, out_count * sizeof(float)));
    if (!context->setTensorAddress("images", out_buf)) die("setTensorAddress(images) failed");
    if (!context->enqueueV3(stream)) die("enqueueV3 failed");
    std::vector<float> images(out_count);
    CUDA_CHECK(cudaMemcpyAsync(images.data(), out_buf, out_count * sizeof(float), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));

    std::ofstream raw(prefix + ".f32", std::ios::binary);
    raw.write(reinterpret_cast<const char*>(images.data()), static_cast<std::streamsize>(out_count * sizeof(float)));
    if (!raw) die("writing " + prefix + ".f32");
    const uint32_t C = static_cast<uint32_t>(od.d[1]), H = static_cast<uint32_t>(od.d[2]), W = static_cast<uint32_t>(od.d[3]);
    if (!distill_png::write_grid(prefix + ".png", images.data(), n, C, H, W)) die("writing " + prefix + ".png");
    std::cout << "wrote " << prefix << ".png and " << prefix << ".f32 (" << n << " images, "
              << C << "x" << H << "x" << W << ")\n";

    for (void* p : device) CUDA_CHECK(cudaFree(p));
    CUDA_CHECK(cudaFree(out_buf));
    CUDA_CHECK(cudaStreamDestroy(stream));
    return 0;
}
