"""Writes the tiny seed corpus in fuzz/seeds/<target>/ (valid inputs libFuzzer mutates from).
Run from the repository root: python3 fuzz/make_seeds.py (stdlib only)."""
import json, os, re, struct, zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def idx(n, side):
    img = bytes([0, 0, 8, 3]) + struct.pack(">III", n, side, side)
    img += bytes(i % 251 for i in range(n * side * side))
    lab = bytes([0, 0, 8, 1]) + struct.pack(">I", n) + bytes(i % 10 for i in range(n))
    return img, lab


# idx: byte 0 = k, the images are the first k*len/255 bytes of the rest (fuzz_targets/idx.rs).
for n, side in [(2, 4), (3, 8), (6, 8), (4, 6)]:
    img, lab = idx(n, side)
    rest = img + lab
    for k in range(256):
        if k * len(rest) // 255 == len(img):
            put("idx", f"n{n}_side{side}", bytes([k]) + rest)
            break

put("cifar", "one_record", bytes([3]) + bytes(i % 256 for i in range(3072)))


def png(w, h, color_type, channels):
    raw = b"".join(b"\0" + bytes((x * 7 + y * 3 + c) % 256 for x in range(w) for c in range(channels)) for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


put("image_folder", "gray_12x10.png", png(12, 10, 0, 1))
put("image_folder", "rgb_5x5.png", png(5, 5, 2, 3))


def safetensors(tensors, meta):
    header, data = {}, b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    header["__metadata__"] = meta
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "two_tensors", safetensors(
    {"unet.conv_in.weight": ("F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)),
     "unet.conv_in.bias": ("F16", [2], b"\x00\x3c\x00\x40")}, {"format": "pt"}))

# config: the README's teacher TOML (the one documented config) and a checkpoint config.json.
readme = open(os.path.join(ROOT, "..", "..", "README.md")).read()
put("config", "teacher.toml", re.search(r"```toml\n(.*?)```", readme, re.S).group(1).encode())
put("config", "config.json", json.dumps({
    "format_version": 1, "producer": "distill 0.1.0", "role": "teacher",
    "model": {"unet": {"channels": 1, "resolution": 16, "base_channels": 8, "channel_mult": [1, 2],
                       "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0,
                       "num_classes": 10, "groups": 4},
              "parameterisation": {"edm": {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
                                           "rho": 7.0, "p_mean": -1.2, "p_std": 1.2}}},
    "generator": {"sampler": "heun", "steps": 2, "sigmas": [], "fresh_noise": False, "cfg_scale": 1.0},
    "step": 1}).encode())


# onnx_metadata: a hand-encoded ModelProto (protobuf wire format): one Identity node, typed
# input/output, an initializer and two metadata_props.
def varint(v):
    out = b""
    while True:
        b, v = v & 0x7F, v >> 7
        out += bytes([b | (0x80 if v else 0)])
        if not v:
            return out


key = lambda f, w: varint(f << 3 | w)
vi = lambda f, v: key(f, 0) + varint(v)
ld = lambda f, b: key(f, 2) + varint(len(b)) + b
s = lambda f, t: ld(f, t.encode())


def value_info(name, dims):
    shape = b"".join(ld(1, vi(1, d) if isinstance(d, int) else s(2, d)) for d in dims)
    return s(1, name) + ld(2, ld(1, vi(1, 1) + ld(2, shape)))


node = s(1, "x") + s(2, "y") + s(3, "id") + s(4, "Identity")
init = vi(1, 2) + vi(1, 2) + vi(2, 1) + s(8, "w") + ld(9, struct.pack("<4f", 1, 2, 3, 4))
graph = ld(1, node) + s(2, "g") + ld(5, init) + ld(11, value_info("x", ["batch", 1, 4, 4])) + ld(12, value_info("y", ["batch", 1, 4, 4]))
model = (vi(1, 8) + s(2, "distill") + s(3, "0.1.0") + ld(7, graph) + ld(8, s(1, "") + vi(2, 17))
         + ld(14, s(1, "distill.sampler") + s(2, "heun")) + ld(14, s(1, "distill.steps") + s(2, "2")))
put("onnx_metadata", "identity_model", model)
