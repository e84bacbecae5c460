// A service's core: one pipeline per worker thread, caller-owned buffers, errors as text.
#include <sd_deploy.h>
#include <cstdio>
#include <vector>

int main(int argc, char **argv) {
  sd_pipeline *pipe = nullptr;
  if (argc < 3 || sd_pipeline_create(argv[1], nullptr, &pipe) != SD_OK)
    return std::fprintf(stderr, "usage: sd_service ENGINE_DIR PROMPT (%s)\n", sd_last_error()), 1;
  sd_request req;
  sd_request_init(&req);                       // engine defaults, random seed
  req.prompt = argv[2];
  req.seed = 42;
  std::vector<uint8_t> rgb(sd_output_bytes(pipe, &req));  // batch x H x W x 3
  int32_t w = 0, h = 0, n = 0;
  sd_status s = sd_generate(pipe, &req, rgb.data(), rgb.size(), &w, &h, &n);
  if (s != SD_OK) std::fprintf(stderr, "%s: %s\n", sd_status_name(s), sd_last_error());
  else std::printf("%d image(s) %dx%d\n%s\n", n, w, h, sd_last_parameters(pipe));
  sd_pipeline_free(pipe);
  return s == SD_OK ? 0 : 1;
}
