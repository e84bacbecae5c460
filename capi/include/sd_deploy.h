/*
 * sd_deploy.h -- C ABI of the sd-deploy runtime (C99).
 *
 * An opaque pipeline built from an engine dir, a plain request struct with an init
 * function, a caller-owned RGB buffer, status codes plus a per-thread message; in the
 * manner of stable-diffusion.cpp's sd_ctx_t. Behind it runs the one implementation of
 * the sampler loop: the library embeds the Python interpreter of the environment
 * sd-deploy is installed in and drives sd_deploy.runtime.Pipeline, so sd_generate
 * gives bytes identical to Python's Pipeline.generate for the same request.
 *
 * Interpreter: started on the first sd_pipeline_create (or reused if the host process
 * already runs one) and kept until the process exits; it is never finalised. It is the
 * Python named at build time (CMake's Python_EXECUTABLE, usually a venv's bin/python);
 * the environment variable SD_DEPLOY_PYTHON names another one at run time.
 *
 * Thread safety:
 *   - Every function may be called from any thread.
 *   - Different pipelines run concurrently; the Python interpreter lock (GIL) is held only
 *     while Python code runs, and released while the library waits, while the backend
 *     computes (ONNX Runtime releases it inside its run calls) and while the progress
 *     callback runs. How much two pipelines really overlap therefore depends on the
 *     backend; one pipeline per thread is the intended use.
 *   - Calls on the same pipeline are serialised by a lock inside it (safe, not parallel).
 *     sd_last_parameters's string belongs to that pipeline and is replaced by its next
 *     sd_generate: read it in the thread that generated, before generating again.
 *   - sd_pipeline_free must not race with another call on the same pipeline.
 *   - The progress callback runs on the thread that called sd_generate; it must not call
 *     sd_generate or sd_pipeline_free on the same pipeline (that would deadlock).
 *
 * Output: the library prints nothing to stdout. The runtime's log messages (the Python
 * logger "sd_deploy", warnings such as a truncated prompt) go to stderr; when the library
 * starts the interpreter itself it also points Python's sys.stdout at stderr.
 *
 * Errors: every function returning sd_status sets a one-line message on failure, read
 * with sd_last_error() on the same thread. Codes come from the Python exceptions' `code`
 * attribute (sd_deploy.errors.ErrorCode), never from their text.
 */
#ifndef SD_DEPLOY_H
#define SD_DEPLOY_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(SD_DEPLOY_BUILDING)
#    define SD_API __declspec(dllexport)
#  else
#    define SD_API __declspec(dllimport)
#  endif
#else
#  define SD_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define SD_DEPLOY_VERSION_MAJOR 0
#define SD_DEPLOY_VERSION_MINOR 2
#define SD_DEPLOY_VERSION_PATCH 0

typedef struct sd_pipeline sd_pipeline; /* opaque */

typedef enum {
  SD_OK = 0,
  SD_ERR_INVALID_ARGUMENT = 1, /* bad size, steps, sampler, strength, NULL where not allowed */
  SD_ERR_ENGINE_DIR = 2,       /* missing/incomplete/unknown-schema engine dir */
  SD_ERR_BACKEND = 3,          /* backend not available, stale TensorRT plan, load failure */
  SD_ERR_NONFINITE = 4,        /* NaN/Inf in a component's output */
  SD_ERR_CANCELLED = 5,        /* the progress callback asked to stop */
  SD_ERR_BUFFER_TOO_SMALL = 6, /* rgb capacity < sd_output_bytes() */
  SD_ERR_PYTHON = 7,           /* interpreter or sd_deploy cannot be initialised, or an
                                  unexpected Python exception (a bug: its traceback goes
                                  to stderr) */
  SD_ERR_CHECKPOINT = 8        /* addition: a LoRA file a prompt names cannot be read */
} sd_status;

/* Called after each sampling step. Return nonzero to cancel: sd_generate then stops
 * before the next step and returns SD_ERR_CANCELLED. step is 0-based, of steps. */
typedef int (*sd_progress_fn)(int step, int steps, void *user);

typedef struct {
  const char *prompt;          /* required (UTF-8) */
  const char *negative_prompt; /* NULL: "" */
  const char *sampler;         /* NULL: engine default; names as sd-run --help lists */
  int32_t width, height, steps; /* 0: engine default (for img2img, width/height 0: the init
                                   image's size rounded down to a multiple of 8) */
  int32_t batch;               /* 0: 1 */
  float guidance;              /* < 0: engine default */
  int64_t seed;                /* < 0: random; image i uses seed + i */
  const uint8_t *init_rgb;     /* NULL: txt2img; else init_height x init_width x 3, row-major
                                  RGB; copied during the call */
  int32_t init_width, init_height;
  float strength;              /* img2img only, (0, 1]; sd_request_init: 0.8 */
  sd_progress_fn progress;     /* may be NULL */
  void *progress_user;
  /* 0.2 additions: how the prompt is read, as sd-run's --clip-skip / --no-emphasis */
  int32_t clip_skip;           /* 0: 1 (the last layer); A1111's Clip skip */
  int32_t emphasis;            /* nonzero: "(word:1.3)" weights and BREAK; 0: plain text;
                                  sd_request_init: 1 */
} sd_request;

/* Every field to its default: prompt NULL (must be set), 0 for sizes/steps/batch and
 * clip_skip, guidance -1, seed -1 (random), strength 0.8, emphasis 1, no init image, no
 * callback. */
SD_API void sd_request_init(sd_request *req);

/* How a pipeline runs its graphs (0.2 addition), as sd-run's options. */
typedef struct {
  const char *backend;   /* NULL: "auto"; a name as sd-run --backend takes */
  const char *precision; /* NULL: "auto"; OpenVINO's compute precision: auto, fp32, bf16 or
                            int8 (sd-quantize's int8-weight UNet); other backends run the
                            graphs as exported and refuse bf16 and int8 */
  int32_t threads;       /* 0: the backend's default (one per physical core) */
  int32_t graph_cache;   /* nonzero: keep optimized / compiled graphs in the engine dir */
} sd_pipeline_options;

/* Every field to its default: backend and precision NULL ("auto"), threads 0,
 * graph_cache 1. */
SD_API void sd_pipeline_options_init(sd_pipeline_options *opts);

/* Load the engine dir's manifest and choose the backend (NULL: "auto"; otherwise a name
 * as sd-run --backend takes, e.g. "onnxruntime-cpu"). Components load on first use.
 * On failure *out is NULL. */
SD_API sd_status sd_pipeline_create(const char *engine_dir, const char *backend,
                                    sd_pipeline **out);

/* sd_pipeline_create with every option (NULL opts: the defaults of
 * sd_pipeline_options_init). A precision the backend cannot compute in, or threads < 0,
 * is SD_ERR_INVALID_ARGUMENT. (0.2 addition) */
SD_API sd_status sd_pipeline_create_with_options(const char *engine_dir,
                                                 const sd_pipeline_options *opts,
                                                 sd_pipeline **out);

/* batch x height x width x 3 for req with every default filled in, or 0 if req is invalid
 * (then sd_last_error() says why). */
SD_API size_t sd_output_bytes(const sd_pipeline *p, const sd_request *req);

/* Generate req.batch images into rgb (caller-owned, batch x H x W x 3 bytes, image after
 * image, row-major RGB). The request is validated before any work, so a too-small buffer
 * fails at once. out_width/out_height/out_batch may be NULL. */
SD_API sd_status sd_generate(sd_pipeline *p, const sd_request *req, uint8_t *rgb,
                             size_t capacity, int32_t *out_width, int32_t *out_height,
                             int32_t *out_batch);

/* A1111-style "parameters" text of the last image set (its first image; image i of a
 * batch differs only in its seed, seed + i), owned by p; "" before the first success. */
SD_API const char *sd_last_parameters(const sd_pipeline *p);

/* Addition: the parameters text of image `index` of the last image set, owned by p;
 * NULL if index is out of range. */
SD_API const char *sd_last_image_parameters(const sd_pipeline *p, int32_t index);

/* The name of the backend the pipeline runs on (e.g. "onnxruntime"), owned by p. */
SD_API const char *sd_pipeline_backend(const sd_pipeline *p);

/* This thread's last failure, one line; "" if none yet. Valid until this thread's next
 * failing call. */
SD_API const char *sd_last_error(void);

/* Close the pipeline's backend sessions and free it. NULL is ignored. */
SD_API void sd_pipeline_free(sd_pipeline *p);

/* "0.1.0": the version of this library (the sd_deploy Python package may differ). */
SD_API const char *sd_version(void);

/* A name for a status code, e.g. "SD_ERR_ENGINE_DIR". */
SD_API const char *sd_status_name(sd_status status);

#ifdef __cplusplus
}
#endif

#endif /* SD_DEPLOY_H */
