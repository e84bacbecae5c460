/*
 * libsd_deploy: the C ABI of sd_deploy.h over sd_deploy.runtime.Pipeline.
 *
 * All Python work goes through the bridge module (capi/python/sd_deploy_capi_bridge.py,
 * compiled in as source), which uses only the runtime's public API. This file owns the
 * interpreter's start, the GIL discipline, the per-thread error message and the copies
 * between C memory and Python objects.
 *
 * Lock order, everywhere: a pipeline's mutex first, then the GIL; the GIL is never held
 * while waiting for a pipeline's mutex, so two threads cannot deadlock on the pair.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sd_deploy.h"

#ifndef SD_DEPLOY_PYTHON_EXECUTABLE
#define SD_DEPLOY_PYTHON_EXECUTABLE "python3"
#endif

/* The bridge's source, generated from capi/python/sd_deploy_capi_bridge.py. */
extern const char sd_deploy_bridge_source[];

#define ERROR_CAPACITY 1024
#define BRIDGE_MODULE "_sd_deploy_capi_bridge"

struct sd_pipeline {
  pthread_mutex_t lock;  /* serialises calls on this pipeline */
  PyObject *pipe;        /* sd_deploy.runtime.Pipeline */
  char *backend;         /* its backend's name */
  char **parameters;     /* infotext of each image of the last image set */
  int32_t n_parameters;
};

/* ---------------------------------------------------------------- errors */

static _Thread_local char last_error[ERROR_CAPACITY];

/* Record this thread's failure as one line (newlines become spaces). */
static sd_status fail(sd_status status, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(last_error, sizeof last_error, fmt, args);
  va_end(args);
  for (char *c = last_error; *c; ++c) {
    if (*c == '\n' || *c == '\r') *c = ' ';
  }
  return status;
}

const char *sd_last_error(void) { return last_error; }

const char *sd_status_name(sd_status status) {
  switch (status) {
    case SD_OK: return "SD_OK";
    case SD_ERR_INVALID_ARGUMENT: return "SD_ERR_INVALID_ARGUMENT";
    case SD_ERR_ENGINE_DIR: return "SD_ERR_ENGINE_DIR";
    case SD_ERR_BACKEND: return "SD_ERR_BACKEND";
    case SD_ERR_NONFINITE: return "SD_ERR_NONFINITE";
    case SD_ERR_CANCELLED: return "SD_ERR_CANCELLED";
    case SD_ERR_BUFFER_TOO_SMALL: return "SD_ERR_BUFFER_TOO_SMALL";
    case SD_ERR_PYTHON: return "SD_ERR_PYTHON";
    case SD_ERR_CHECKPOINT: return "SD_ERR_CHECKPOINT";
  }
  return "SD_ERR_UNKNOWN";
}

const char *sd_version(void) { return "0.2.0"; }

/* ---------------------------------------------------------------- interpreter */

static pthread_once_t python_once = PTHREAD_ONCE_INIT;
static sd_status python_status = SD_OK;
static char python_error[ERROR_CAPACITY];
static PyObject *bridge; /* the bridge module; lives as long as the interpreter */

static void python_failed(const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(python_error, sizeof python_error, fmt, args);
  va_end(args);
  for (char *c = python_error; *c; ++c) {
    if (*c == '\n' || *c == '\r') *c = ' ';
  }
  python_status = SD_ERR_PYTHON;
}

/* The pending exception as "Type: first line" (GIL held); clears it. */
static void pending_exception_text(char *out, size_t capacity) {
  PyObject *type = NULL, *value = NULL, *tb = NULL;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  const char *name = type ? ((PyTypeObject *)type)->tp_name : "unknown error";
  PyObject *text = value ? PyObject_Str(value) : NULL;
  const char *utf8 = text ? PyUnicode_AsUTF8(text) : NULL;
  if (!utf8) PyErr_Clear();
  snprintf(out, capacity, "%s: %s", name, utf8 ? utf8 : "");
  Py_XDECREF(text);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
}

static int load_bridge(void) {
  PyObject *code = Py_CompileString(sd_deploy_bridge_source, "sd_deploy_capi_bridge.py",
                                    Py_file_input);
  if (!code) return -1;
  bridge = PyImport_ExecCodeModuleEx(BRIDGE_MODULE, code, "sd_deploy_capi_bridge.py");
  Py_DECREF(code);
  return bridge ? 0 : -1;
}

static void start_python(void) {
  int started_here = 0;
  PyGILState_STATE gil = PyGILState_UNLOCKED;
  if (!Py_IsInitialized()) {
    /* Extension modules (numpy, onnxruntime) resolve Python's symbols globally; make
       libpython global even when the host dlopen()ed this library RTLD_LOCAL. */
    Dl_info info;
    if (dladdr((void *)&Py_InitializeFromConfig, &info) && info.dli_fname) {
      void *handle = dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
      (void)handle; /* kept open for the process's life on purpose */
    }
    const char *exe = getenv("SD_DEPLOY_PYTHON");
    if (!exe || !*exe) exe = SD_DEPLOY_PYTHON_EXECUTABLE;
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0; /* the host owns SIGINT */
    config.parse_argv = 0;
    /* program_name: Python finds its prefix, and a venv's pyvenv.cfg, from it. */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, exe);
    if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
      python_failed("cannot start the Python interpreter %s: %s", exe,
                    status.err_msg ? status.err_msg : "unknown error");
      return;
    }
    started_here = 1;
  } else {
    gil = PyGILState_Ensure();
  }

  if (load_bridge() != 0) {
    char text[ERROR_CAPACITY - 128];
    pending_exception_text(text, sizeof text);
    python_failed("cannot import sd_deploy in the embedded Python (%s; set SD_DEPLOY_PYTHON to "
                  "the python of the environment sd-deploy is installed in): %s",
                  SD_DEPLOY_PYTHON_EXECUTABLE, text);
  } else if (started_here) {
    PyObject *r = PyObject_CallMethod(bridge, "claim_stdout", NULL);
    if (!r) PyErr_Clear();
    Py_XDECREF(r);
  }

  if (started_here) {
    PyEval_SaveThread(); /* from now on every call takes the GIL for its Python work only */
  } else {
    PyGILState_Release(gil);
  }
}

static sd_status ensure_python(void) {
  pthread_once(&python_once, start_python);
  if (python_status != SD_OK) return fail(python_status, "%s", python_error);
  return SD_OK;
}

/* Turn the pending Python exception into a status and this thread's message (GIL held).
   The status is the exception's `code` (read by the bridge), never parsed from text. */
static sd_status fail_from_python(const char *what) {
  PyObject *type = NULL, *value = NULL, *tb = NULL;
  PyErr_Fetch(&type, &value, &tb);
  if (!type) return fail(SD_ERR_PYTHON, "%s failed without a Python exception", what);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb && value) PyException_SetTraceback(value, tb);
  sd_status status = SD_ERR_PYTHON;
  PyObject *described = PyObject_CallMethod(bridge, "describe_error", "O", value ? value : Py_None);
  long code = 0;
  const char *message = NULL;
  if (described && PyArg_ParseTuple(described, "ls", &code, &message)) {
    status = (sd_status)code;
    fail(status, "%s", message);
  } else {
    PyErr_Clear();
    fail(SD_ERR_PYTHON, "%s failed: %s", what, type ? ((PyTypeObject *)type)->tp_name : "?");
  }
  Py_XDECREF(described);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return status;
}

/* ---------------------------------------------------------------- pipelines */

void sd_pipeline_options_init(sd_pipeline_options *opts) {
  if (!opts) return;
  memset(opts, 0, sizeof *opts);
  opts->graph_cache = 1;
}

sd_status sd_pipeline_create(const char *engine_dir, const char *backend, sd_pipeline **out) {
  sd_pipeline_options opts;
  sd_pipeline_options_init(&opts);
  opts.backend = backend;
  return sd_pipeline_create_with_options(engine_dir, &opts, out);
}

/* A C string as a Python str, NULL as None; NULL (error set) if it is not UTF-8. */
static PyObject *text_or_none(const char *text) {
  if (text) return PyUnicode_FromString(text);
  Py_INCREF(Py_None);
  return Py_None;
}

sd_status sd_pipeline_create_with_options(const char *engine_dir,
                                          const sd_pipeline_options *options,
                                          sd_pipeline **out) {
  if (!out) return fail(SD_ERR_INVALID_ARGUMENT, "sd_pipeline_create: out is NULL");
  *out = NULL;
  if (!engine_dir) return fail(SD_ERR_INVALID_ARGUMENT, "sd_pipeline_create: engine_dir is NULL");
  sd_pipeline_options defaults;
  sd_pipeline_options_init(&defaults);
  const sd_pipeline_options *opts = options ? options : &defaults;
  if (opts->threads < 0) {
    return fail(SD_ERR_INVALID_ARGUMENT, "sd_pipeline_create: threads must be >= 0 (0: the "
                "backend's default), got %d", (int)opts->threads);
  }
  sd_status status = ensure_python();
  if (status != SD_OK) return status;

  sd_pipeline *p = calloc(1, sizeof *p);
  if (!p) return fail(SD_ERR_PYTHON, "out of memory");
  pthread_mutex_init(&p->lock, NULL);

  PyGILState_STATE gil = PyGILState_Ensure();
  PyObject *dir = PyUnicode_DecodeFSDefault(engine_dir);
  PyObject *name = text_or_none(opts->backend);
  PyObject *precision = text_or_none(opts->precision);
  if (!dir || !name || !precision) {
    PyErr_Clear();
    status = fail(SD_ERR_INVALID_ARGUMENT, "engine_dir, backend or precision is not valid text");
  } else {
    p->pipe = PyObject_CallMethod(bridge, "open_pipeline", "OOOii", dir, name, precision,
                                  (int)opts->threads, opts->graph_cache ? 1 : 0);
    if (!p->pipe) status = fail_from_python("opening the pipeline");
  }
  if (status == SD_OK) {
    PyObject *b = PyObject_CallMethod(bridge, "backend_name", "O", p->pipe);
    const char *utf8 = b ? PyUnicode_AsUTF8(b) : NULL;
    if (!utf8) PyErr_Clear();
    p->backend = strdup(utf8 ? utf8 : "");
    Py_XDECREF(b);
  }
  Py_XDECREF(dir);
  Py_XDECREF(name);
  Py_XDECREF(precision);
  if (status != SD_OK) {
    Py_CLEAR(p->pipe);
    PyGILState_Release(gil);
    pthread_mutex_destroy(&p->lock);
    free(p);
    return status;
  }
  PyGILState_Release(gil);
  *out = p;
  return SD_OK;
}

static void free_parameters(sd_pipeline *p) {
  for (int32_t i = 0; i < p->n_parameters; ++i) free(p->parameters[i]);
  free(p->parameters);
  p->parameters = NULL;
  p->n_parameters = 0;
}

void sd_pipeline_free(sd_pipeline *p) {
  if (!p) return;
  pthread_mutex_lock(&p->lock);
  PyGILState_STATE gil = PyGILState_Ensure();
  PyObject *r = PyObject_CallMethod(p->pipe, "close", NULL);
  if (!r) PyErr_Clear();
  Py_XDECREF(r);
  Py_CLEAR(p->pipe);
  PyGILState_Release(gil);
  pthread_mutex_unlock(&p->lock);
  pthread_mutex_destroy(&p->lock);
  free_parameters(p);
  free(p->backend);
  free(p);
}

const char *sd_pipeline_backend(const sd_pipeline *p) { return p && p->backend ? p->backend : ""; }

const char *sd_last_parameters(const sd_pipeline *p) {
  if (!p || p->n_parameters == 0) return "";
  return p->parameters[0];
}

const char *sd_last_image_parameters(const sd_pipeline *p, int32_t index) {
  if (!p || index < 0 || index >= p->n_parameters) return NULL;
  return p->parameters[index];
}

/* ---------------------------------------------------------------- requests */

void sd_request_init(sd_request *req) {
  if (!req) return;
  memset(req, 0, sizeof *req);
  req->guidance = -1.0f;
  req->seed = -1;
  req->strength = 0.8f;
  req->emphasis = 1;
}

/* Checks that need no Python: NULLs and sizes a C caller can get wrong. */
static sd_status check_request(const sd_request *req) {
  if (!req) return fail(SD_ERR_INVALID_ARGUMENT, "request is NULL");
  if (!req->prompt) return fail(SD_ERR_INVALID_ARGUMENT, "request.prompt is NULL");
  if (req->init_rgb) {
    if (req->init_width <= 0 || req->init_height <= 0 || req->init_width > 65536 ||
        req->init_height > 65536) {
      return fail(SD_ERR_INVALID_ARGUMENT, "init image size %dx%d is not positive",
                  (int)req->init_width, (int)req->init_height);
    }
  }
  return SD_OK;
}

/* The bridge's GenerationRequest for req (GIL held); NULL with this thread's error set. */
static PyObject *python_request(const sd_request *req, sd_status *status) {
  PyObject *prompt = PyUnicode_FromString(req->prompt);
  PyObject *negative = text_or_none(req->negative_prompt);
  PyObject *sampler = text_or_none(req->sampler);
  PyObject *init = NULL;
  PyObject *request = NULL;
  if (!prompt || !negative || !sampler) {
    PyErr_Clear();
    *status = fail(SD_ERR_INVALID_ARGUMENT, "prompt, negative_prompt or sampler is not UTF-8");
    goto done;
  }
  if (req->init_rgb) {
    Py_ssize_t n = (Py_ssize_t)req->init_width * req->init_height * 3;
    init = PyBytes_FromStringAndSize((const char *)req->init_rgb, n); /* a copy */
  } else {
    init = (Py_INCREF(Py_None), Py_None);
  }
  if (!init) {
    *status = fail_from_python("copying the init image");
    goto done;
  }
  request = PyObject_CallMethod(bridge, "make_request", "OOOiiiidLOiidii", prompt, negative,
                                sampler, (int)req->width, (int)req->height, (int)req->steps,
                                (int)req->batch, (double)req->guidance, (long long)req->seed,
                                init, (int)req->init_width, (int)req->init_height,
                                (double)req->strength, (int)req->clip_skip,
                                req->emphasis ? 1 : 0);
  if (!request) *status = fail_from_python("building the request");
done:
  Py_XDECREF(prompt);
  Py_XDECREF(negative);
  Py_XDECREF(sampler);
  Py_XDECREF(init);
  return request;
}

/* (batch, height, width) of a valid request (GIL held). */
static sd_status request_shape(sd_pipeline *p, PyObject *request, int32_t shape[3]) {
  PyObject *r = PyObject_CallMethod(bridge, "output_shape", "OO", p->pipe, request);
  if (!r) return fail_from_python("validating the request");
  int b = 0, h = 0, w = 0;
  int ok = PyArg_ParseTuple(r, "iii", &b, &h, &w);
  Py_DECREF(r);
  if (!ok) return fail_from_python("reading the request's shape");
  shape[0] = b;
  shape[1] = h;
  shape[2] = w;
  return SD_OK;
}

size_t sd_output_bytes(const sd_pipeline *cp, const sd_request *req) {
  sd_pipeline *p = (sd_pipeline *)cp; /* the lock inside changes, the pipeline does not */
  if (!p) {
    fail(SD_ERR_INVALID_ARGUMENT, "sd_output_bytes: pipeline is NULL");
    return 0;
  }
  if (check_request(req) != SD_OK) return 0;
  size_t bytes = 0;
  pthread_mutex_lock(&p->lock);
  PyGILState_STATE gil = PyGILState_Ensure();
  sd_status status = SD_OK;
  PyObject *request = python_request(req, &status);
  int32_t shape[3];
  if (request && request_shape(p, request, shape) == SD_OK) {
    bytes = (size_t)shape[0] * (size_t)shape[1] * (size_t)shape[2] * 3u;
  }
  Py_XDECREF(request);
  PyGILState_Release(gil);
  pthread_mutex_unlock(&p->lock);
  return bytes;
}

/* ---------------------------------------------------------------- progress */

typedef struct {
  sd_progress_fn fn;
  void *user;
} progress_target;

static const char PROGRESS_CAPSULE[] = "sd_deploy.progress_target";

/* Python's progress callback (step, steps[, ...]) -> False to cancel; calls the C one with
   the GIL released, so the callback may block or call into other pipelines. */
static PyObject *progress_trampoline(PyObject *self, PyObject *args) {
  progress_target *target = PyCapsule_GetPointer(self, PROGRESS_CAPSULE);
  if (!target) return NULL;
  if (PyTuple_Size(args) < 2) {
    PyErr_SetString(PyExc_TypeError, "progress callback takes (step, steps)");
    return NULL;
  }
  int step = (int)PyLong_AsLong(PyTuple_GET_ITEM(args, 0));
  int steps = (int)PyLong_AsLong(PyTuple_GET_ITEM(args, 1));
  if (PyErr_Occurred()) return NULL;
  if (!target->fn) Py_RETURN_NONE;
  int cancel;
  Py_BEGIN_ALLOW_THREADS
  cancel = target->fn(step, steps, target->user);
  Py_END_ALLOW_THREADS
  if (cancel) Py_RETURN_FALSE;
  Py_RETURN_NONE;
}

static PyMethodDef progress_method = {"sd_progress", progress_trampoline, METH_VARARGS,
                                      "Forwards the runtime's progress to the C callback."};

static void free_progress_target(PyObject *capsule) {
  free(PyCapsule_GetPointer(capsule, PROGRESS_CAPSULE));
}

/* A Python callable forwarding to req's C callback, or None (GIL held). */
static PyObject *python_progress(const sd_request *req, progress_target **target) {
  *target = NULL;
  if (!req->progress) return (Py_INCREF(Py_None), Py_None);
  progress_target *t = malloc(sizeof *t);
  if (!t) return PyErr_NoMemory();
  t->fn = req->progress;
  t->user = req->progress_user;
  PyObject *capsule = PyCapsule_New(t, PROGRESS_CAPSULE, free_progress_target);
  if (!capsule) {
    free(t);
    return NULL;
  }
  PyObject *fn = PyCFunction_New(&progress_method, capsule);
  Py_DECREF(capsule);
  if (fn) *target = t;
  return fn;
}

/* ---------------------------------------------------------------- generation */

/* Keep each image's parameters text; returns -1 on a Python error (GIL held). */
static int keep_parameters(sd_pipeline *p, PyObject *texts) {
  Py_ssize_t n = PyList_Check(texts) ? PyList_GET_SIZE(texts) : -1;
  if (n < 0) {
    PyErr_SetString(PyExc_TypeError, "the bridge returned no parameter list");
    return -1;
  }
  char **kept = calloc((size_t)n + 1, sizeof *kept);
  if (!kept) {
    PyErr_NoMemory();
    return -1;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    const char *utf8 = PyUnicode_AsUTF8(PyList_GET_ITEM(texts, i));
    kept[i] = utf8 ? strdup(utf8) : NULL;
    if (!kept[i]) {
      for (Py_ssize_t j = 0; j < i; ++j) free(kept[j]);
      free(kept);
      if (!PyErr_Occurred()) PyErr_NoMemory();
      return -1;
    }
  }
  free_parameters(p);
  p->parameters = kept;
  p->n_parameters = (int32_t)n;
  return 0;
}

sd_status sd_generate(sd_pipeline *p, const sd_request *req, uint8_t *rgb, size_t capacity,
                      int32_t *out_width, int32_t *out_height, int32_t *out_batch) {
  if (!p) return fail(SD_ERR_INVALID_ARGUMENT, "sd_generate: pipeline is NULL");
  sd_status status = check_request(req);
  if (status != SD_OK) return status;

  pthread_mutex_lock(&p->lock);
  PyGILState_STATE gil = PyGILState_Ensure();
  PyObject *request = NULL, *progress = NULL, *result = NULL;
  progress_target *target = NULL;
  Py_buffer view = {0};
  int have_view = 0;
  int32_t shape[3] = {0, 0, 0};

  request = python_request(req, &status);
  if (!request) goto done;
  status = request_shape(p, request, shape);
  if (status != SD_OK) goto done;
  size_t needed = (size_t)shape[0] * (size_t)shape[1] * (size_t)shape[2] * 3u;
  if (!rgb) {
    status = fail(SD_ERR_INVALID_ARGUMENT, "rgb is NULL; the request needs %zu bytes", needed);
    goto done;
  }
  if (capacity < needed) {
    status = fail(SD_ERR_BUFFER_TOO_SMALL,
                  "rgb buffer holds %zu bytes, the request needs %zu (batch %d x %dx%d x 3)",
                  capacity, needed, (int)shape[0], (int)shape[2], (int)shape[1]);
    goto done;
  }
  progress = python_progress(req, &target);
  if (!progress) {
    status = fail_from_python("preparing the progress callback");
    goto done;
  }
  result = PyObject_CallMethod(bridge, "generate", "OOO", p->pipe, request, progress);
  if (target) target->fn = NULL; /* the C callback is the caller's only during this call */
  if (!result) {
    status = fail_from_python("generating");
    goto done;
  }
  PyObject *images = NULL, *texts = NULL;
  if (!PyArg_ParseTuple(result, "OO", &images, &texts) ||
      PyObject_GetBuffer(images, &view, PyBUF_C_CONTIGUOUS) != 0) {
    status = fail_from_python("reading the images");
    goto done;
  }
  have_view = 1;
  if ((size_t)view.len != needed) {
    status = fail(SD_ERR_PYTHON, "the runtime returned %zd bytes of images, expected %zu",
                  view.len, needed);
    goto done;
  }
  if (keep_parameters(p, texts) != 0) {
    status = fail_from_python("reading the parameters");
    goto done;
  }
  Py_BEGIN_ALLOW_THREADS /* the view keeps the array alive */
  memcpy(rgb, view.buf, needed);
  Py_END_ALLOW_THREADS
  if (out_batch) *out_batch = shape[0];
  if (out_height) *out_height = shape[1];
  if (out_width) *out_width = shape[2];
  status = SD_OK;

done:
  if (have_view) PyBuffer_Release(&view);
  Py_XDECREF(result);
  Py_XDECREF(progress);
  Py_XDECREF(request);
  PyGILState_Release(gil);
  pthread_mutex_unlock(&p->lock);
  return status;
}
