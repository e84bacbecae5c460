/*
 * sd_capi_test: drives libsd_deploy through sd_deploy.h from plain C99, checks what C
 * alone can check (status codes, sizes, callback behaviour) and writes each image's raw
 * RGB bytes and parameters under OUT_DIR, where tests/capi/test_capi.py compares them
 * byte for byte with Python's Pipeline.generate for the same requests.
 *
 *   sd_capi_test [--steps N] [--backend NAME] ENGINE_DIR OUT_DIR [CASE ...]
 *
 * Cases: txt2img img2img batch2 defaults options errors threads gil python_missing (the
 * last only on request: it expects the interpreter to be unusable). Exit status 0 when
 * every check passed. Requests use 20 steps unless --steps says otherwise, and the "auto"
 * backend unless --backend names one (the sanitizer run needs ONNX Runtime: OpenVINO's TBB
 * loads with RTLD_DEEPBIND, which AddressSanitizer refuses).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, pthread_cond_timedwait */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sd_deploy.h"

static const char *engine_dir;
static const char *out_dir;
static int steps = 20;
static const char *backend = NULL;
static int failures;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);       \
      fprintf(stderr, __VA_ARGS__);                              \
      fprintf(stderr, " [last error: %s]\n", sd_last_error());   \
      ++failures;                                                \
    }                                                            \
  } while (0)

static FILE *open_out(const char *name, const char *mode) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", out_dir, name);
  FILE *f = fopen(path, mode);
  if (!f) {
    fprintf(stderr, "cannot write %s\n", path);
    exit(2);
  }
  return f;
}

static void write_bytes(const char *name, const uint8_t *data, size_t n) {
  FILE *f = open_out(name, "wb");
  fwrite(data, 1, n, f);
  fclose(f);
}

static void write_text(const char *name, const char *text) {
  FILE *f = open_out(name, "w");
  fputs(text, f);
  fclose(f);
}

static sd_pipeline *open_pipeline(void) {
  sd_pipeline *p = NULL;
  sd_status s = sd_pipeline_create(engine_dir, backend, &p);
  CHECK(s == SD_OK && p != NULL, "sd_pipeline_create(%s) returned %s", engine_dir,
        sd_status_name(s));
  return p;
}

static sd_request base_request(const char *prompt, int64_t seed) {
  sd_request req;
  sd_request_init(&req);
  req.prompt = prompt;
  req.seed = seed;
  req.steps = steps;
  return req;
}

/* Generate req into a fresh buffer; NULL on failure (checked). */
static uint8_t *generate(sd_pipeline *p, const sd_request *req, size_t *bytes,
                         int32_t expect_w, int32_t expect_h, int32_t expect_b) {
  *bytes = sd_output_bytes(p, req);
  CHECK(*bytes == (size_t)expect_b * expect_w * expect_h * 3, "sd_output_bytes gave %lu",
        (unsigned long)*bytes);
  if (*bytes == 0) return NULL;
  uint8_t *rgb = malloc(*bytes);
  int32_t w = 0, h = 0, b = 0;
  sd_status s = sd_generate(p, req, rgb, *bytes, &w, &h, &b);
  CHECK(s == SD_OK, "sd_generate returned %s", sd_status_name(s));
  CHECK(w == expect_w && h == expect_h && b == expect_b, "generated %dx%d x%d", (int)w, (int)h,
        (int)b);
  if (s != SD_OK) {
    free(rgb);
    return NULL;
  }
  return rgb;
}

/* Generate one 64x64 image of req, write NAME.rgb and NAME.txt (its parameters) and check
 * that the parameters contain `want`; nonzero when it was generated. */
static int record_image(sd_pipeline *p, const sd_request *req, const char *name,
                        const char *want) {
  size_t n = 0;
  uint8_t *rgb = generate(p, req, &n, 64, 64, 1);
  if (!rgb) return 0;
  char file[256];
  snprintf(file, sizeof file, "%s.rgb", name);
  write_bytes(file, rgb, n);
  snprintf(file, sizeof file, "%s.txt", name);
  write_text(file, sd_last_parameters(p));
  CHECK(strstr(sd_last_parameters(p), want) != NULL, "%s: parameters lack \"%s\": %s", name,
        want, sd_last_parameters(p));
  free(rgb);
  return 1;
}

/* ---------------------------------------------------------------- cases */

static void case_txt2img(void) {
  sd_pipeline *p = open_pipeline();
  if (!p) return;
  CHECK(strcmp(sd_last_parameters(p), "") == 0, "parameters before the first generation");
  sd_request req = base_request("a red star on a white background", 7);
  if (record_image(p, &req, "txt2img", "Seed: 7")) {
    write_text("backend.txt", sd_pipeline_backend(p));
  }
  sd_pipeline_free(p);
}

/* The init image: a deterministic gradient, made the same way by the Python test. */
static uint8_t *init_pattern(int w, int h) {
  uint8_t *rgb = malloc((size_t)w * h * 3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      uint8_t *px = rgb + ((size_t)y * w + x) * 3;
      px[0] = (uint8_t)(x * 4);
      px[1] = (uint8_t)(y * 4);
      px[2] = (uint8_t)((x + y) * 2);
    }
  }
  return rgb;
}

static void case_img2img(void) {
  sd_pipeline *p = open_pipeline();
  if (!p) return;
  uint8_t *init = init_pattern(64, 64);
  sd_request req = base_request("a blue circle on a gray background", 3);
  req.init_rgb = init;
  req.init_width = 64;
  req.init_height = 64;
  req.strength = 0.6f;
  record_image(p, &req, "img2img", "Denoising strength: 0.6");
  free(init);
  sd_pipeline_free(p);
}

static void case_batch2(void) {
  sd_pipeline *p = open_pipeline();
  if (!p) return;
  sd_request req = base_request("a green square on a black background", 11);
  req.batch = 2;
  size_t n = 0;
  uint8_t *rgb = generate(p, &req, &n, 64, 64, 2);
  if (rgb) {
    write_bytes("batch2.rgb", rgb, n);
    const char *first = sd_last_image_parameters(p, 0);
    const char *second = sd_last_image_parameters(p, 1);
    CHECK(first && strstr(first, "Seed: 11"), "image 0's parameters: %s", first);
    CHECK(second && strstr(second, "Seed: 12"), "image 1's parameters: %s", second);
    CHECK(sd_last_image_parameters(p, 2) == NULL, "image 2 of a batch of 2 has parameters");
    CHECK(first && strcmp(sd_last_parameters(p), first) == 0, "sd_last_parameters != image 0");
  }
  free(rgb);
  sd_pipeline_free(p);
}

/* 0 / negative / NULL mean the engine's defaults; a negative seed is random. */
static void case_defaults(void) {
  sd_pipeline *p = open_pipeline();
  if (!p) return;
  sd_request req;
  sd_request_init(&req);
  req.prompt = "a yellow triangle on a black background";
  req.steps = steps == 20 ? 0 : steps; /* 0: the engine default (20 for the default model) */
  size_t n = 0;
  uint8_t *rgb = generate(p, &req, &n, 64, 64, 1);
  if (rgb) write_text("defaults-1.txt", sd_last_parameters(p));
  free(rgb);
  rgb = generate(p, &req, &n, 64, 64, 1);
  if (rgb) write_text("defaults-2.txt", sd_last_parameters(p));
  free(rgb);
  sd_pipeline_free(p);
}

/* sd_pipeline_create_with_options, and the request's prompt-reading fields. */
static void case_options(void) {
  sd_pipeline_options opts;
  sd_pipeline_options_init(&opts);
  CHECK(!opts.backend && !opts.precision && opts.threads == 0 && opts.graph_cache == 1,
        "sd_pipeline_options_init left a field off its default");
  opts.backend = backend;
  opts.threads = 1;
  sd_pipeline *p = NULL;
  sd_status s = sd_pipeline_create_with_options(engine_dir, &opts, &p);
  CHECK(s == SD_OK && p != NULL, "sd_pipeline_create_with_options returned %s",
        sd_status_name(s));
  if (!p) return;
  sd_request req = base_request("a (red:1.4) star BREAK on a white background", 7);
  CHECK(req.clip_skip == 0 && req.emphasis == 1, "sd_request_init: clip_skip %d emphasis %d",
        (int)req.clip_skip, (int)req.emphasis);
  req.clip_skip = 2;
  req.emphasis = 0;
  record_image(p, &req, "options", "Clip skip: 2");
  sd_pipeline_free(p);
}

/* ---------------------------------------------------------------- errors */

static FILE *errors_file;

static void record(const char *name, sd_status got, sd_status want) {
  fprintf(errors_file, "%s\t%s\t%s\n", name, sd_status_name(got), sd_last_error());
  CHECK(got == want, "%s: got %s, want %s", name, sd_status_name(got), sd_status_name(want));
  CHECK(got == SD_OK || sd_last_error()[0] != '\0', "%s: no message", name);
  CHECK(strchr(sd_last_error(), '\n') == NULL, "%s: message is not one line", name);
}

typedef struct {
  int cancel_at;
  int calls;
  int last_step;
  int steps;
} cancel_state;

static int cancel_progress(int step, int total, void *user) {
  cancel_state *c = user;
  c->calls++;
  c->last_step = step;
  c->steps = total;
  return step == c->cancel_at;
}

static void case_errors(void) {
  errors_file = open_out("errors.txt", "w");
  sd_pipeline *bad = (sd_pipeline *)1;
  record("bad_engine_dir", sd_pipeline_create("/nonexistent/engine-dir", NULL, &bad),
         SD_ERR_ENGINE_DIR);
  CHECK(bad == NULL, "a failed create left *out set");
  record("null_engine_dir", sd_pipeline_create(NULL, NULL, &bad), SD_ERR_INVALID_ARGUMENT);

  sd_pipeline *p = open_pipeline();
  if (!p) {
    fclose(errors_file);
    return;
  }
  uint8_t *rgb = malloc(2 * 64 * 64 * 3);
  size_t capacity = 2 * 64 * 64 * 3;

  sd_request req = base_request("a red circle on a white background", 1);
  req.width = 500;
  CHECK(sd_output_bytes(p, &req) == 0, "sd_output_bytes accepted width 500");
  record("width_500", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);

  req = base_request("a red circle on a white background", 1);
  req.sampler = "no_such_sampler";
  record("unknown_sampler", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);

  /* steps 0 is "engine default" in sd_request (see sd_deploy.h); -1 is the invalid count */
  req = base_request("a red circle on a white background", 1);
  req.steps = -1;
  record("steps_negative", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);

  req = base_request("a red circle on a white background", 1);
  req.prompt = NULL;
  record("null_prompt", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);

  req = base_request("a red circle on a white background", 1);
  record("null_rgb", sd_generate(p, &req, NULL, 0, NULL, NULL, NULL), SD_ERR_INVALID_ARGUMENT);

  uint8_t *init = init_pattern(64, 64);
  req = base_request("a red circle on a white background", 1);
  req.init_rgb = init;
  req.init_width = 64;
  req.init_height = 64;
  req.strength = 0.0f;
  record("strength_0", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);
  free(init);

  req = base_request("a red circle on a white background", 1);
  size_t need = sd_output_bytes(p, &req);
  record("buffer_too_small", sd_generate(p, &req, rgb, need - 1, NULL, NULL, NULL),
         SD_ERR_BUFFER_TOO_SMALL);

  cancel_state c = {2, 0, -1, 0};
  req = base_request("a red circle on a white background", 1);
  req.progress = cancel_progress;
  req.progress_user = &c;
  record("cancel_at_step_2", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_CANCELLED);
  CHECK(c.calls == 3 && c.last_step == 2 && c.steps == steps,
        "cancel: %d calls, last step %d of %d", c.calls, c.last_step, c.steps);

  req = base_request("a red circle on a white background", 1);
  req.clip_skip = 99;
  record("clip_skip_99", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);
  req.clip_skip = -1;
  record("clip_skip_negative", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_INVALID_ARGUMENT);

  req = base_request("a red circle <lora:no_such_lora:1>", 1);
  record("lora_missing", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL),
         SD_ERR_CHECKPOINT);

  /* guidance this large overflows the latents to Inf; the UNet then returns NaN */
  req = base_request("a red circle on a white background", 1);
  req.guidance = 3e38f;
  record("nonfinite", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL), SD_ERR_NONFINITE);

  /* the pipeline still works after every failure above */
  c.cancel_at = -1;
  c.calls = 0;
  req = base_request("a red circle on a white background", 1);
  req.progress = cancel_progress;
  req.progress_user = &c;
  record("after_errors", sd_generate(p, &req, rgb, capacity, NULL, NULL, NULL), SD_OK);
  CHECK(c.calls == steps, "progress called %d times for %d steps", c.calls, steps);

  sd_pipeline_options opts;
  sd_pipeline_options_init(&opts);
  opts.backend = "onnxruntime-cpu";
  opts.precision = "bf16";
  sd_pipeline *other = (sd_pipeline *)1;
  record("bf16_on_onnxruntime", sd_pipeline_create_with_options(engine_dir, &opts, &other),
         SD_ERR_INVALID_ARGUMENT);
  CHECK(other == NULL, "a failed create left *out set");
  opts.backend = NULL;
  opts.precision = "fp16";
  record("unknown_precision", sd_pipeline_create_with_options(engine_dir, &opts, &other),
         SD_ERR_INVALID_ARGUMENT);
  opts.precision = NULL;
  opts.threads = -1;
  record("threads_negative", sd_pipeline_create_with_options(engine_dir, &opts, &other),
         SD_ERR_INVALID_ARGUMENT);
  record("null_options", sd_pipeline_create_with_options(engine_dir, NULL, &other), SD_OK);
  sd_pipeline_free(other);

  other = NULL;
  sd_status s = sd_pipeline_create(engine_dir, "no-such-backend", &other);
  fprintf(errors_file, "unknown_backend\t%s\t%s\n", sd_status_name(s), sd_last_error());
  CHECK(s != SD_OK && other == NULL, "an unknown backend was accepted");
  /* TensorRT: SD_ERR_BACKEND where it cannot load; the test compares with Python's code */
  s = sd_pipeline_create(engine_dir, "tensorrt", &other);
  fprintf(errors_file, "backend_tensorrt\t%s\t%s\n", sd_status_name(s),
          s == SD_OK ? "" : sd_last_error());
  sd_pipeline_free(other);

  free(rgb);
  sd_pipeline_free(p);
  sd_pipeline_free(NULL);
  fclose(errors_file);
}

/* The interpreter cannot import sd_deploy (the test points SD_DEPLOY_PYTHON elsewhere). */
static void case_python_missing(void) {
  sd_pipeline *p = NULL;
  errors_file = open_out("python_missing.txt", "w");
  record("python_missing", sd_pipeline_create(engine_dir, NULL, &p), SD_ERR_PYTHON);
  record("python_missing_again", sd_pipeline_create(engine_dir, NULL, &p), SD_ERR_PYTHON);
  fclose(errors_file);
}

/* ---------------------------------------------------------------- threads */

typedef struct {
  int index;
  int64_t seed;
  uint8_t rgb[64 * 64 * 3];
  sd_status status;
  char error[1024];
  char parameters[4096];
} thread_job;

static void *thread_main(void *arg) {
  thread_job *job = arg;
  sd_pipeline *p = NULL;
  job->status = sd_pipeline_create(engine_dir, backend, &p);
  if (job->status == SD_OK) {
    sd_request req = base_request("a purple star on a white background", job->seed);
    job->status = sd_generate(p, &req, job->rgb, sizeof job->rgb, NULL, NULL, NULL);
    snprintf(job->parameters, sizeof job->parameters, "%s", sd_last_parameters(p));
    sd_pipeline_free(p);
  }
  snprintf(job->error, sizeof job->error, "%s", sd_last_error());
  return NULL;
}

static void case_threads(void) {
  static thread_job jobs[2];
  pthread_t threads[2];
  for (int i = 0; i < 2; ++i) {
    jobs[i].index = i;
    jobs[i].seed = 21 + i;
    CHECK(pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0, "pthread_create");
  }
  for (int i = 0; i < 2; ++i) pthread_join(threads[i], NULL);
  for (int i = 0; i < 2; ++i) {
    char name[64];
    CHECK(jobs[i].status == SD_OK, "thread %d: %s (%s)", i, sd_status_name(jobs[i].status),
          jobs[i].error);
    snprintf(name, sizeof name, "thread%d.rgb", i);
    write_bytes(name, jobs[i].rgb, sizeof jobs[i].rgb);
    snprintf(name, sizeof name, "thread%d.txt", i);
    write_text(name, jobs[i].parameters);
  }
}

/* ---------------------------------------------------------------- the GIL */

/* While pipeline A's progress callback runs, a whole generation on pipeline B must be able
   to run: the library releases the interpreter lock around the callback. If it did not,
   B would wait for A's callback, which waits for B (bounded here by a timeout). */
typedef struct {
  sd_pipeline *other;
  pthread_t thread;
  int started;
  pthread_mutex_t lock;
  pthread_cond_t done_cond;
  int done;
  sd_status other_status;
  int finished_inside_callback;
  uint8_t rgb[64 * 64 * 3];
} gil_state;

static void *gil_other_thread(void *arg) {
  gil_state *g = arg;
  sd_request req = base_request("a white square on a gray background", 5);
  req.steps = 2;
  sd_status s = sd_generate(g->other, &req, g->rgb, sizeof g->rgb, NULL, NULL, NULL);
  pthread_mutex_lock(&g->lock);
  g->other_status = s;
  g->done = 1;
  pthread_cond_signal(&g->done_cond);
  pthread_mutex_unlock(&g->lock);
  return NULL;
}

static int gil_progress(int step, int total, void *user) {
  (void)total;
  gil_state *g = user;
  if (step != 0) return 0;
  if (pthread_create(&g->thread, NULL, gil_other_thread, g) != 0) return 0;
  g->started = 1;
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 120;
  pthread_mutex_lock(&g->lock);
  while (!g->done) {
    if (pthread_cond_timedwait(&g->done_cond, &g->lock, &until) != 0) break;
  }
  g->finished_inside_callback = g->done;
  pthread_mutex_unlock(&g->lock);
  return 0; /* joined after sd_generate: if the GIL were held, B runs only after that */
}

static void case_gil(void) {
  static gil_state g;
  pthread_mutex_init(&g.lock, NULL);
  pthread_cond_init(&g.done_cond, NULL);
  sd_pipeline *p = open_pipeline();
  g.other = open_pipeline();
  if (p && g.other) {
    uint8_t *rgb = malloc(64 * 64 * 3);
    sd_request req = base_request("a black star on a white background", 6);
    req.steps = 2;
    req.progress = gil_progress;
    req.progress_user = &g;
    sd_status s = sd_generate(p, &req, rgb, 64 * 64 * 3, NULL, NULL, NULL);
    if (g.started) pthread_join(g.thread, NULL);
    CHECK(g.started, "the progress callback was not called");
    CHECK(s == SD_OK, "generation around the callback: %s", sd_status_name(s));
    CHECK(g.other_status == SD_OK, "the other pipeline: %s", sd_status_name(g.other_status));
    CHECK(g.finished_inside_callback,
          "the other pipeline could not generate while a progress callback ran (GIL held?)");
    free(rgb);
  }
  sd_pipeline_free(g.other);
  sd_pipeline_free(p);
  pthread_cond_destroy(&g.done_cond);
  pthread_mutex_destroy(&g.lock);
}

/* ---------------------------------------------------------------- main */

typedef struct {
  const char *name;
  void (*run)(void);
  int by_default;
} test_case;

static const test_case cases[] = {
    {"txt2img", case_txt2img, 1},   {"img2img", case_img2img, 1},
    {"batch2", case_batch2, 1},     {"defaults", case_defaults, 1},
    {"options", case_options, 1},   {"errors", case_errors, 1},
    {"threads", case_threads, 1},   {"gil", case_gil, 1},
    {"python_missing", case_python_missing, 0},
};

int main(int argc, char **argv) {
  int arg = 1;
  while (arg + 1 < argc && strncmp(argv[arg], "--", 2) == 0) {
    if (strcmp(argv[arg], "--steps") == 0) {
      steps = atoi(argv[arg + 1]);
    } else if (strcmp(argv[arg], "--backend") == 0) {
      backend = argv[arg + 1];
    } else {
      fprintf(stderr, "unknown option %s\n", argv[arg]);
      return 2;
    }
    arg += 2;
  }
  if (argc - arg < 2) {
    fprintf(stderr, "usage: %s [--steps N] [--backend NAME] ENGINE_DIR OUT_DIR [CASE ...]\n",
            argv[0]);
    return 2;
  }
  engine_dir = argv[arg];
  out_dir = argv[arg + 1];
  arg += 2;
  size_t n_cases = sizeof cases / sizeof cases[0];
  for (size_t i = 0; i < n_cases; ++i) {
    int wanted = arg == argc ? cases[i].by_default : 0;
    for (int j = arg; j < argc; ++j) wanted = wanted || strcmp(argv[j], cases[i].name) == 0;
    if (!wanted) continue;
    int before = failures;
    cases[i].run();
    printf("%s %s\n", failures == before ? "ok" : "FAILED", cases[i].name);
    fflush(stdout);
  }
  for (int j = arg; j < argc; ++j) {
    int known = 0;
    for (size_t i = 0; i < n_cases; ++i) known = known || strcmp(argv[j], cases[i].name) == 0;
    if (!known) {
      fprintf(stderr, "unknown case %s\n", argv[j]);
      return 2;
    }
  }
  return failures == 0 ? 0 : 1;
}
