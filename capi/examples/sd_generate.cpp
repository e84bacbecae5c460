// sd-generate-c: txt2img / img2img through libsd_deploy's C ABI (C++17).
//
//   sd-generate-c --engine-dir engines/ --prompt "a red circle on a white background" \
//       --seed 1 --out circle.png
//
// Writes PNG (with the A1111 "parameters" text chunk) or binary PPM, chosen by the
// --out extension; a batch of n writes NAME-0.EXT ... NAME-(n-1).EXT. Prints each
// image's parameters and path to stdout, progress to stderr. --init-image takes a
// binary PPM (P6, maxval 255).
#include <sd_deploy.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

const char kUsage[] =
    "usage: sd-generate-c --engine-dir DIR --prompt TEXT [--negative-prompt TEXT]\n"
    "         [--width N] [--height N] [--steps N] [--guidance F] [--sampler NAME]\n"
    "         [--seed N] [--batch N] [--init-image FILE.ppm] [--strength F]\n"
    "         [--clip-skip N] [--no-emphasis] [--backend NAME] [--precision NAME]\n"
    "         [--threads N] [--out FILE.png|FILE.ppm] [--quiet]\n";

// ---------------------------------------------------------------- PNG / PPM

uint32_t crc32(const uint8_t *data, size_t n, uint32_t crc = 0) {
  static const auto table = [] {
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

void put_u32(std::vector<uint8_t> &out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(uint8_t(v >> shift));
}

void chunk(std::vector<uint8_t> &png, const char type[4], const std::vector<uint8_t> &data) {
  put_u32(png, uint32_t(data.size()));
  size_t start = png.size();
  png.insert(png.end(), type, type + 4);
  png.insert(png.end(), data.begin(), data.end());
  put_u32(png, crc32(png.data() + start, png.size() - start));
}

// An RGB PNG with uncompressed (stored) deflate blocks: no zlib needed, any viewer reads it.
std::vector<uint8_t> encode_png(const uint8_t *rgb, int width, int height,
                                const std::string &parameters) {
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32(ihdr, uint32_t(width));
  put_u32(ihdr, uint32_t(height));
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit RGB, no interlace
  chunk(png, "IHDR", ihdr);
  if (!parameters.empty()) {  // iTXt: UTF-8, as A1111 writes non-ASCII prompts
    std::vector<uint8_t> text;
    const char key[] = "parameters";
    text.insert(text.end(), key, key + sizeof key);  // keyword + NUL
    text.insert(text.end(), {0, 0, 0, 0});           // uncompressed, no language/translation
    text.insert(text.end(), parameters.begin(), parameters.end());
    chunk(png, "iTXt", text);
  }
  std::vector<uint8_t> raw;  // filter byte 0 + row
  size_t row = size_t(width) * 3;
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb + y * row, rgb + (y + 1) * row);
  }
  std::vector<uint8_t> z = {0x78, 0x01};
  uint32_t a = 1, b = 0;  // adler32
  for (uint8_t byte : raw) {
    a = (a + byte) % 65521;
    b = (b + a) % 65521;
  }
  for (size_t pos = 0; pos < raw.size() || pos == 0;) {
    size_t n = std::min<size_t>(65535, raw.size() - pos);
    bool last = pos + n == raw.size();
    z.push_back(last ? 1 : 0);
    z.push_back(uint8_t(n));
    z.push_back(uint8_t(n >> 8));
    z.push_back(uint8_t(~n));
    z.push_back(uint8_t(~n >> 8));
    z.insert(z.end(), raw.begin() + pos, raw.begin() + pos + n);
    pos += n;
    if (last) break;
  }
  put_u32(z, (b << 16) | a);
  chunk(png, "IDAT", z);
  chunk(png, "IEND", {});
  return png;
}

bool write_image(const std::string &path, const uint8_t *rgb, int width, int height,
                 const std::string &parameters) {
  std::ofstream out(path, std::ios::binary);
  if (!out) return false;
  bool ppm = path.size() >= 4 && path.compare(path.size() - 4, 4, ".ppm") == 0;
  if (ppm) {
    out << "P6\n" << width << " " << height << "\n255\n";
    out.write(reinterpret_cast<const char *>(rgb), std::streamsize(size_t(width) * height * 3));
  } else {
    auto png = encode_png(rgb, width, height, parameters);
    out.write(reinterpret_cast<const char *>(png.data()), std::streamsize(png.size()));
  }
  return bool(out);
}

bool read_ppm(const std::string &path, std::vector<uint8_t> &rgb, int &width, int &height) {
  std::ifstream in(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  auto skip_comments = [&in] {
    in >> std::ws;
    while (in.peek() == '#') {
      std::string line;
      std::getline(in, line);
      in >> std::ws;
    }
  };
  in >> magic;
  skip_comments();
  in >> width;
  skip_comments();
  in >> height;
  skip_comments();
  in >> maxval;
  if (!in || magic != "P6" || maxval != 255 || width <= 0 || height <= 0) return false;
  in.get();  // the single whitespace before the pixels
  rgb.resize(size_t(width) * height * 3);
  in.read(reinterpret_cast<char *>(rgb.data()), std::streamsize(rgb.size()));
  return bool(in);
}

std::string numbered(const std::string &path, int index, int batch) {
  if (batch == 1) return path;
  size_t dot = path.rfind('.');
  size_t slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) dot = path.size();
  return path.substr(0, dot) + "-" + std::to_string(index) + path.substr(dot);
}

int show_progress(int step, int steps, void *) {
  std::fprintf(stderr, "\rstep %d/%d", step + 1, steps);
  if (step + 1 == steps) std::fputc('\n', stderr);
  return 0;
}

}  // namespace

int main(int argc, char **argv) {
  std::map<std::string, std::string> flags;
  bool quiet = false;
  bool no_emphasis = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (arg == "--quiet") {
      quiet = true;
    } else if (arg == "--no-emphasis") {
      no_emphasis = true;
    } else if (arg.rfind("--", 0) == 0 && i + 1 < argc) {
      flags[arg.substr(2)] = argv[++i];
    } else {
      std::cerr << "sd-generate-c: unexpected argument " << arg << "\n" << kUsage;
      return 2;
    }
  }
  static const char *known[] = {"engine-dir", "prompt", "negative-prompt", "width", "height",
                                "steps", "guidance", "sampler", "seed", "batch", "init-image",
                                "strength", "clip-skip", "backend", "precision", "threads",
                                "out"};
  for (const auto &[name, value] : flags) {
    bool ok = false;
    for (const char *k : known) ok = ok || name == k;
    if (!ok) {
      std::cerr << "sd-generate-c: unknown option --" << name << "\n" << kUsage;
      return 2;
    }
  }
  if (!flags.count("engine-dir") || !flags.count("prompt")) {
    std::cerr << kUsage;
    return 2;
  }
  auto get = [&flags](const char *name) -> const std::string * {
    auto it = flags.find(name);
    return it == flags.end() ? nullptr : &it->second;
  };

  sd_request req;
  sd_request_init(&req);
  req.prompt = get("prompt")->c_str();
  req.emphasis = no_emphasis ? 0 : 1;
  sd_pipeline_options options;
  sd_pipeline_options_init(&options);
  if (auto v = get("backend")) options.backend = v->c_str();
  if (auto v = get("precision")) options.precision = v->c_str();
  if (auto v = get("negative-prompt")) req.negative_prompt = v->c_str();
  if (auto v = get("sampler")) req.sampler = v->c_str();
  try {
    if (auto v = get("width")) req.width = std::stoi(*v);
    if (auto v = get("height")) req.height = std::stoi(*v);
    if (auto v = get("steps")) req.steps = std::stoi(*v);
    if (auto v = get("batch")) req.batch = std::stoi(*v);
    if (auto v = get("guidance")) req.guidance = std::stof(*v);
    if (auto v = get("seed")) req.seed = std::stoll(*v);
    if (auto v = get("strength")) req.strength = std::stof(*v);
    if (auto v = get("clip-skip")) req.clip_skip = std::stoi(*v);
    if (auto v = get("threads")) options.threads = std::stoi(*v);
  } catch (const std::exception &) {
    std::cerr << "sd-generate-c: a numeric option is not a number\n";
    return 2;
  }
  std::vector<uint8_t> init;
  if (auto v = get("init-image")) {
    int w = 0, h = 0;
    if (!read_ppm(*v, init, w, h)) {
      std::cerr << "sd-generate-c: " << *v << " is not a binary PPM (P6, maxval 255)\n";
      return 2;
    }
    req.init_rgb = init.data();
    req.init_width = w;
    req.init_height = h;
  }
  if (!quiet) req.progress = show_progress;
  const std::string out = get("out") ? *get("out") : "sd-generate-c.png";

  sd_pipeline *pipe = nullptr;
  if (sd_pipeline_create_with_options(get("engine-dir")->c_str(), &options, &pipe) != SD_OK) {
    std::cerr << "sd-generate-c: " << sd_last_error() << "\n";
    return 1;
  }
  size_t bytes = sd_output_bytes(pipe, &req);
  if (bytes == 0) {
    std::cerr << "sd-generate-c: " << sd_last_error() << "\n";
    sd_pipeline_free(pipe);
    return 1;
  }
  std::vector<uint8_t> rgb(bytes);
  int32_t width = 0, height = 0, batch = 0;
  sd_status status = sd_generate(pipe, &req, rgb.data(), rgb.size(), &width, &height, &batch);
  if (status != SD_OK) {
    std::cerr << "sd-generate-c: " << sd_last_error() << " (" << sd_status_name(status) << ")\n";
    sd_pipeline_free(pipe);
    return 1;
  }
  int rc = 0;
  size_t image_bytes = size_t(width) * height * 3;
  for (int i = 0; i < batch; ++i) {
    std::string path = numbered(out, i, batch);
    const char *parameters = sd_last_image_parameters(pipe, i);
    if (!write_image(path, rgb.data() + i * image_bytes, width, height,
                     parameters ? parameters : "")) {
      std::cerr << "sd-generate-c: cannot write " << path << "\n";
      rc = 1;
      continue;
    }
    std::cout << (parameters ? parameters : "") << "\n-> " << path << "\n";
  }
  sd_pipeline_free(pipe);
  return rc;
}
