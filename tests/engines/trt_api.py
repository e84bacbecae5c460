"""The real TensorRT Python API on a machine without TensorRT's libraries or a GPU.

The `trt-api` extra installs NVIDIA's real bindings (`tensorrt-cu13-bindings`, the
pybind11 module with the whole Python API) and `tensorrt-cu13` (`import tensorrt`).
The module needs libnvinfer, libnvinfer_plugin and libnvonnxparser at import; from
them it resolves only a few C entry points. `compile_stand_ins` builds three tiny C
libraries defining those (each returns NULL / 0) with the system C compiler, and
`load_real_tensorrt` loads them RTLD_GLOBAL under the real sonames before importing
`tensorrt`: the import then succeeds, every class, method, enum member and call
signature can be read, and code runs up to its first real library call
(`trt.Builder(logger)` / `trt.Runtime(logger)` raise "factory function returned
nullptr"). See shared/notes/tensorrt-api-without-gpu.md.

The real module is only ever imported in a child process (`run_python`): once loaded,
`import tensorrt` would succeed for every later test of the session, and the lean
runtime crashes (SIGSEGV) when asked to deserialize without a GPU.

`describe_api` turns the module into plain JSON (classes, their members, pybind
signatures parsed from the docstrings), which the conformance tests compare the
project's own TensorRT code against.

Run as a script: `python tests/engines/trt_api.py describe STAND_IN_DIR [MODULE]`.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# soname -> C source: the entry points tensorrt_bindings/tensorrt.so resolves at load.
STAND_INS = {
    "libnvinfer.so.11": """
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
void *getPluginRegistry(void) { return 0; }
""",
    "libnvinfer_plugin.so.11": """
int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }
""",
    "libnvonnxparser.so.11": """
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
""",
}

EXTRA_HINT = "pip install -c constraints.txt -e '.[trt-api]' (see .ci/run)"


def c_compiler() -> str | None:
    """The system C compiler ($CC, cc or gcc), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def compile_stand_ins(dest: Path, compiler: str) -> list[Path]:
    """Compile the three stand-in libraries into `dest`; their paths, in load order."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for soname, source in STAND_INS.items():
        src = dest / f"{soname.split('.so')[0]}.c"
        src.write_text(source)
        out = dest / soname
        subprocess.run(
            [compiler, "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(out), str(src)],
            check=True,
            capture_output=True,
        )
        paths.append(out)
    return paths


def load_real_tensorrt(stand_ins: str | Path) -> Any:
    """Load the stand-ins (RTLD_GLOBAL, so the linker finds them by soname), import tensorrt."""
    for soname in STAND_INS:
        ctypes.CDLL(str(Path(stand_ins) / soname), mode=ctypes.RTLD_GLOBAL)
    import tensorrt

    return tensorrt


def missing_wheels(*modules: str) -> str:
    """Why the real API cannot be inspected here ('' when it can)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed ({EXTRA_HINT})"
    return ""


# ---- a JSON description of a pybind11 module ----------------------------------------------

_SIG = re.compile(r"^(?:\d+\.\s+)?(\w+)\((.*)\)\s*->\s*(.+?)\s*$")


def _split_top(text: str) -> list[str]:
    """Split a parameter list at the commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def parse_params(text: str) -> list[list[Any]]:
    """'self: X, name: str, shape: tuple = ()' -> [[name, has_default], ...] (with self)."""
    params = []
    for part in _split_top(text):
        name = part.split(":", 1)[0].split("=", 1)[0].strip()
        params.append([name, "=" in part])
    return params


def pybind_signatures(doc: str | None, name: str) -> list[dict[str, Any]]:
    """Every overload's parameters and return type from a pybind11 docstring."""
    result = []
    for line in (doc or "").splitlines():
        match = _SIG.match(line.strip())
        if match and match.group(1) == name and match.group(2) != "*args, **kwargs":
            result.append({"params": parse_params(match.group(2)), "returns": match.group(3)})
    return result


def python_signature(obj: Any) -> list[dict[str, Any]]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            params.append(["*" + p.name, True])
        elif p.kind is p.VAR_KEYWORD:
            params.append(["**" + p.name, True])
        else:
            params.append([p.name, p.default is not p.empty])
    return [{"params": params, "returns": ""}]


def _member(cls_or_module: Any, name: str, value: Any) -> dict[str, Any]:
    static = inspect.getattr_static(cls_or_module, name, None)
    if isinstance(static, property):
        doc = (static.fget.__doc__ or "") if static.fget is not None else ""
        match = re.search(r"->\s*(\S.*?)\s*$", doc.strip().splitlines()[0] if doc.strip() else "")
        return {"kind": "property", "returns": match.group(1) if match else ""}
    if inspect.isclass(value):
        return {"kind": "class", "qualname": value.__qualname__}
    if inspect.ismodule(value):
        return {"kind": "module", "name": value.__name__}
    if callable(value):
        sigs = pybind_signatures(getattr(value, "__doc__", None), name)
        if not sigs and inspect.isfunction(value):
            sigs = python_signature(value)
        return {"kind": "callable", "sigs": sigs}
    kind = type(value)
    return {"kind": "value", "type": kind.__qualname__}


def describe_api(module: Any) -> dict[str, Any]:
    """Module members and every class reachable from them, with signatures, as JSON."""
    classes: dict[str, Any] = {}
    todo: list[type] = []

    def note(value: Any) -> None:
        if inspect.isclass(value) and value.__module__.startswith(root):
            prefixes.add(value.__module__ + ".")
            key = value.__qualname__
            if key not in classes:
                classes[key] = None
                todo.append(value)

    root = module.__name__.split(".")[0].split("_")[0]  # tensorrt_lean_bindings -> tensorrt
    prefixes: set[str] = set()
    members = {}
    for name in dir(module):
        value = getattr(module, name)
        members[name] = _member(module, name, value)
        note(value)
    while todo:
        cls = todo.pop()
        entry: dict[str, Any] = {"init": pybind_signatures(cls.__init__.__doc__, "__init__")}
        if not entry["init"]:
            entry["init"] = python_signature(cls)
        entry["members"] = {}
        for name in dir(cls):
            try:
                value = getattr(cls, name)
            except AttributeError:
                continue
            entry["members"][name] = _member(cls, name, value)
            note(value)
            note(type(value))
        classes[cls.__qualname__] = entry
    text = json.dumps(classes)  # annotations name classes by qualname, without the module
    for prefix in sorted(prefixes, key=len, reverse=True):
        text = text.replace(prefix, "")
    return {
        "module": module.__name__,
        "version": str(getattr(module, "__version__", "")),
        "members": members,
        "classes": json.loads(text),
    }


# ---- doubles built from the real API ---------------------------------------------------------


class ApiDoubles:
    """Stand-ins for objects of the real tensorrt module that offer exactly the real
    attributes: a read of a name the real class lacks raises AttributeError (as the real
    object would) and is recorded; a call whose argument count or keyword names fit no
    real pybind signature raises TypeError and is recorded; results are doubles of the
    annotated return type (bool -> True, int -> 0, IHostMemory -> bytes, classes ->
    doubles). `script["Class.member"]` gives chosen values after the checks.

    Installed as trt.Builder / trt.OnnxParser / trt.Runtime, they let real Polygraphy run
    a whole build over the real module, checking every call it makes on our path.
    """

    def __init__(self, api: Any) -> None:
        self.api = api  # a trt_conformance.Api
        self.calls: list[str] = []
        self.missing: list[str] = []  # attribute reads the real module would refuse
        self.misfits: list[str] = []  # calls no real signature accepts
        self.script: dict[str, Any] = {}

    def value(self, annotation: str) -> Any:
        ann = annotation.strip()
        simple = {"bool": True, "int": 0, "float": 0.0, "str": "", "None": None, "": None}
        if ann in simple:
            return simple[ann]
        if ann.startswith("list["):
            return []
        if ann == "IHostMemory":
            return HostMemory(b"api double plan")
        if ann in self.api.classes:
            return Double(self, ann)
        return None

    def check_call(self, label: str, sigs: list, args: tuple, kwargs: dict, drop: int) -> Any:
        fits = [s for s in sigs if _fits_call(s["params"][drop:], len(args), list(kwargs))]
        self.calls.append(f"{label}({len(args)} positional{''.join(', ' + k for k in kwargs)})")
        if sigs and not fits:
            self.misfits.append(f"{label}{tuple(type(a).__name__ for a in args)} {sorted(kwargs)}")
            raise TypeError(f"{label}: no real signature fits")
        return (fits or sigs or [{"returns": ""}])[0]["returns"]

    def constructor(self, qualname: str) -> Any:
        def make(*args: Any, **kwargs: Any) -> Double:
            sigs = self.api.classes[qualname]["init"]
            self.check_call(qualname, sigs, args, kwargs, drop=1)
            return Double(self, qualname)

        return make


def _fits_call(params: list, npos: int, keywords: list) -> bool:
    import trt_conformance

    return trt_conformance._fits(params, npos, keywords, False)


class HostMemory(bytes):
    """IHostMemory: a buffer (what Polygraphy writes to files) and a context manager."""

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


class Double:
    """One object of a real tensorrt class (see ApiDoubles)."""

    def __init__(self, doubles: ApiDoubles, qualname: str) -> None:
        object.__setattr__(self, "_d", doubles)
        object.__setattr__(self, "_q", qualname)
        object.__setattr__(self, "_values", {})

    def __getattr__(self, name: str) -> Any:
        d, q = self._d, self._q
        if name in self._values:
            return self._values[name]
        entry = d.api.member(q, name)
        if entry is None:
            d.missing.append(f"{q}.{name}")
            raise AttributeError(f"the real tensorrt has no {q}.{name}")
        key = f"{q}.{name}"
        if entry["kind"] == "property":
            d.calls.append(key)
            return d.script[key](self) if key in d.script else d.value(entry["returns"])
        if entry["kind"] == "callable":

            def call(*args: Any, **kwargs: Any) -> Any:
                returns = d.check_call(key, entry["sigs"], args, kwargs, drop=1)
                if key in d.script:
                    return d.script[key](self, *args, **kwargs)
                return d.value(returns)

            return call
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        entry = self._d.api.member(self._q, name)
        self._d.calls.append(f"{self._q}.{name} =")
        if entry is None or entry["kind"] != "property":
            self._d.missing.append(f"{self._q}.{name} (set)")
            raise AttributeError(f"the real tensorrt has no settable {self._q}.{name}")
        self._values[name] = value

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Any:
        if self._d.api.member(self._q, "__iter__") is None and (
            self._d.api.member(self._q, "__getitem__") is None
        ):
            self._d.missing.append(f"iter({self._q})")
            raise TypeError(f"{self._q} is not iterable")
        self._d.calls.append(f"iter({self._q})")
        return iter(())

    def __len__(self) -> int:
        if self._d.api.member(self._q, "__len__") is None:
            self._d.missing.append(f"len({self._q})")
            raise TypeError(f"{self._q} has no len()")
        return 0

    def __enter__(self) -> Double:
        if self._d.api.member(self._q, "__enter__") is None:
            self._d.missing.append(f"with {self._q}")
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


# ---- child processes with the real module --------------------------------------------------


def run_python(
    code: str, stand_ins: Path | None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter; with `stand_ins`, the real tensorrt imports there.

    `code` sees `trt` (the real module, when stand_ins is given) and this module as
    `trt_api`.
    """
    prelude = [
        "import json, sys",
        f"sys.path.insert(0, {str(HERE)!r})",
        "import trt_api",
    ]
    if stand_ins is not None:
        prelude.append(f"trt = trt_api.load_real_tensorrt({str(stand_ins)!r})")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-c", "\n".join(prelude) + "\n" + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(cwd or REPO),
        env=env,
    )


def stand_ins_or_skip(tmp_path_factory) -> Path:
    """A folder with the compiled stand-in libraries; skips without a compiler or the wheels."""
    why = missing_wheels("tensorrt", "tensorrt_bindings")
    if why:
        pytest.skip(f"the real TensorRT bindings are needed: {why}")
    compiler = c_compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc/gcc) to build the TensorRT stand-in libraries")
    dest = tmp_path_factory.mktemp("trt-stand-ins")
    try:
        compile_stand_ins(dest, compiler)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{compiler} could not build the stand-in libraries: {exc.stderr[:200]}")
    return dest


def describe_real_tensorrt(stand_ins: Path) -> dict[str, Any]:
    """JSON description of the real tensorrt module (imported in a child process)."""
    done = run_python("print(json.dumps(trt_api.describe_api(trt)))", stand_ins)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def describe_lean_runtime_or_skip() -> dict[str, Any]:
    """JSON description of the real lean runtime module (tensorrt-lean-cu13-bindings)."""
    why = missing_wheels("tensorrt_lean_bindings", "tensorrt_lean_libs")
    if why:
        pytest.skip(f"the real lean runtime is needed: {why}")
    done = run_python(
        "import tensorrt_lean_bindings as lean\nprint(json.dumps(trt_api.describe_api(lean)))",
        None,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


if __name__ == "__main__":  # python trt_api.py describe STAND_IN_DIR [MODULE]
    if len(sys.argv) >= 3 and sys.argv[1] == "describe":
        load_real_tensorrt(sys.argv[2])
        target = importlib.import_module(sys.argv[3] if len(sys.argv) > 3 else "tensorrt")
        json.dump(describe_api(target), sys.stdout, indent=1)
    else:
        sys.exit(__doc__)
