"""Find every TensorRT (and Polygraphy, cuda-python) API use in the project's source, by
reading it with `ast`, and check each against the real library.

No hand-kept list of names: the analysis starts from the imports (`import tensorrt`,
a lazy-import helper called with "tensorrt", `from polygraphy... import X`,
`from cuda.bindings import runtime`) and follows values through assignments,
`self.` attributes, dict literals, function returns and call arguments, using the
real module's own return annotations (`deserialize_cuda_engine -> ICudaEngine`,
`create_execution_context -> IExecutionContext`, ...) to learn what each name holds.
Each attribute read on such a value must exist in the real module, and each call's
argument count and keyword names must fit one of the real signatures (pybind11
docstrings for tensorrt; `inspect.signature` for Python and Cython objects).

`Api` wraps the JSON description made by `trt_api.describe_api` in a child process,
so the real tensorrt module is never imported into the test process.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def tensorrt_sources(root: Path = REPO) -> list[Path]:
    """The project's TensorRT code: engines/, runtime/backends/tensorrt*, and any other
    sd_deploy module that imports tensorrt, polygraphy or cuda-python (directly or via
    import_optional) -- except the lazy-import helper itself."""
    package = root / "sd_deploy"
    found = set((package / "engines").rglob("*.py"))
    for path in (package / "runtime" / "backends").glob("tensorrt*"):
        found.update([path] if path.is_file() else path.rglob("*.py"))
    pattern = re.compile(
        r"^\s*(import|from)\s+(tensorrt|polygraphy|cuda)\b"  # a direct import
        r"|import\w*\(\s*[\"'](tensorrt|polygraphy|cuda)\b",  # or a lazy-import helper
        re.M,
    )
    for path in package.rglob("*.py"):
        if pattern.search(path.read_text()):
            found.add(path)
    helper = package / "engine_dir" / "libraries.py"
    return sorted(p for p in found if p.suffix == ".py" and p != helper)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


# ---- the real API ---------------------------------------------------------------------------


def _fits(params: list[list[Any]], npos: int, keywords: list[str], star: bool) -> bool:
    """Whether a call with `npos` positional args and these keywords fits the parameters."""
    names = [p for p, _ in params]
    var_pos = any(n.startswith("*") and not n.startswith("**") for n in names)
    var_kw = any(n.startswith("**") for n in names)
    plain = [(n, d) for n, d in params if not n.startswith("*")]
    if star:  # f(*args) / f(**kw): only the keyword names can be checked
        return var_kw or all(k in names for k in keywords)
    if npos > len(plain) and not var_pos:
        return False
    covered = {n for n, _ in plain[:npos]}
    for k in keywords:
        if k in covered or (k not in names and not var_kw):
            return False
        covered.add(k)
    return all(d or n in covered for n, d in plain)


def _sig_text(params: list[list[Any]]) -> str:
    return "(" + ", ".join(n + ("=..." if d else "") for n, d in params) + ")"


class Api:
    """The real tensorrt module, from `trt_api.describe_api`'s JSON."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.d = description
        self.classes: dict[str, Any] = description["classes"]

    def member(self, owner: str | None, name: str) -> dict[str, Any] | None:
        if owner is None:
            return self.d["members"].get(name)
        cls = self.classes.get(owner)
        return None if cls is None else cls["members"].get(name)

    def types_of(self, annotation: str) -> set[tuple]:
        """'ICudaEngine' -> {inst ICudaEngine}; 'list[Dims]' -> {list Dims}; else {}."""
        result: set[tuple] = set()
        for part in re.split(r"\s*\|\s*", annotation.strip()):
            part = re.sub(r"^(Optional|typing\.Optional)\[(.*)\]$", r"\2", part)
            match = re.fullmatch(r"(?:list|typing\.List)\[(.+)\]", part)
            if match and match.group(1) in self.classes:
                result.add(("list", match.group(1)))
            elif part in self.classes:
                result.add(("inst", part))
        return result


@dataclass
class Use:
    """One use of a library API in the project's code."""

    library: str  # "tensorrt", "polygraphy", "cuda"
    where: str  # path:line
    what: str  # e.g. "ICudaEngine.get_tensor_profile_shape(2 args)"
    problem: str = ""


@dataclass
class Function:
    key: str
    node: ast.FunctionDef | ast.AsyncFunctionDef
    module: str
    path: Path
    cls: str | None  # "module:Class" for methods
    parent: str | None  # enclosing function key
    params: list[str] = field(default_factory=list)


_PY_LIBRARIES = ("polygraphy", "cuda")


class Analysis:
    """Flow-insensitive type propagation over the project's TensorRT modules."""

    def __init__(self, api: Api, paths: Iterable[Path], root: Path = REPO) -> None:
        self.api = api
        self.root = root
        self.paths = list(paths)
        self.functions: dict[str, Function] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.module_symbols: dict[str, dict[str, str]] = {}  # module -> name -> fn/class key
        self.module_imports: dict[str, list[ast.stmt]] = {}
        self.env: dict[tuple, set[tuple]] = {}
        self.objects: list[Any] = []  # ("py", i) -> objects[i]
        self.libraries: list[str] = []  # ... imported from libraries[i]
        self.uses: dict[tuple, Use] = {}
        self.changed = False
        self.trees = {p: ast.parse(p.read_text(), str(p)) for p in self.paths}
        self._add_imported_modules()
        for path, tree in self.trees.items():
            self._index(path, tree)

    def _add_imported_modules(self) -> None:
        """Also read the sd_deploy modules these import (transitively): TensorRT objects
        passed to a helper elsewhere (e.g. runtime.lora.refit_engine(trt, engine, ...)) are
        followed there."""
        todo = list(self.trees.values())
        while todo:
            tree = todo.pop()
            for node in ast.walk(tree):
                if not (isinstance(node, ast.ImportFrom) and node.module):
                    continue
                if node.module.split(".")[0] != "sd_deploy":
                    continue
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    path = self._module_file(name)
                    if path is not None and path not in self.trees:
                        self.paths.append(path)
                        self.trees[path] = ast.parse(path.read_text(), str(path))
                        todo.append(self.trees[path])

    def _module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    # -- indexing --

    def _index(self, path: Path, tree: ast.Module) -> None:
        module = module_name(path, self.root)
        symbols: dict[str, str] = {}
        imports: list[ast.stmt] = []
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                symbols[node.name] = self._add_function(node, module, path, None, None)
            elif isinstance(node, ast.ClassDef):
                key = f"{module}:{node.name}"
                self.classes[key] = node
                symbols[node.name] = key
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        self._add_function(item, module, path, key, None)
            elif isinstance(node, ast.Import | ast.ImportFrom | ast.Try):
                imports.append(node)
        self.module_symbols[module] = symbols
        self.module_imports[module] = imports

    def _add_function(self, node, module, path, cls, parent) -> str:
        owner = cls.split(":", 1)[1] + "." if cls else ""
        key = f"{module}:{owner}{node.name}" if parent is None else f"{parent}.{node.name}"
        args = node.args
        params = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
        self.functions[key] = Function(key, node, module, path, cls, parent, params)
        for child in ast.walk(node):
            if child is not node and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if self._direct_child(node, child):
                    self._add_function(child, module, path, None, key)
        return key

    @staticmethod
    def _direct_child(parent: ast.AST, child: ast.AST) -> bool:
        for node in ast.walk(parent):
            if node is parent:
                continue
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                if node is child:
                    return True
                if child in list(ast.walk(node))[1:]:
                    return False
        return False

    # -- environment --

    def _add(self, key: tuple, types: set[tuple]) -> None:
        if not types:
            return
        current = self.env.setdefault(key, set())
        if not types <= current:
            current |= types
            self.changed = True

    def _py(self, obj: Any, library: str) -> tuple:
        for index, known in enumerate(self.objects):
            if known is obj:
                return ("py", index)
        self.objects.append(obj)
        self.libraries.append(library)
        return ("py", len(self.objects) - 1)

    def _use(self, library: str, node: ast.AST, fn: Function, what: str, problem: str) -> None:
        where = f"{fn.path.relative_to(self.root)}:{node.lineno}"
        key = (where, node.col_offset, what)
        self.uses[key] = Use(library, where, what, problem)

    # -- running --

    def run(self, rounds: int = 12) -> list[Use]:
        for _ in range(rounds):
            self.changed = False
            self.uses = {}
            for module, imports in self.module_imports.items():
                pseudo = Function(
                    f"{module}:<module>",
                    ast.FunctionDef(),
                    module,
                    self._path_of(module),
                    None,
                    None,
                )
                for stmt in imports:
                    self._stmt(stmt, pseudo, optional=False)
            for fn in list(self.functions.values()):
                for stmt in fn.node.body:
                    self._stmt(stmt, fn, optional=False)
            if not self.changed:
                break
        return sorted(self.uses.values(), key=lambda u: (u.where, u.what))

    def _path_of(self, module: str) -> Path:
        for path in self.paths:
            if module_name(path, self.root) == module:
                return path
        raise KeyError(module)

    # -- statements --

    def _stmt(self, stmt: ast.stmt, fn: Function, optional: bool) -> None:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                self._bind_import(alias.name, None, alias.asname, fn, stmt, optional)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                self._bind_import(stmt.module or "", alias.name, alias.asname, fn, stmt, optional)
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            value = stmt.value
            types = self._expr(value, fn) if value is not None else set()
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                self._assign(target, types, fn)
        elif isinstance(stmt, ast.Return):
            if stmt.value is not None:
                self._add(("ret", fn.key), self._expr(stmt.value, fn))
        elif isinstance(stmt, ast.For | ast.AsyncFor):
            iterated = self._expr(stmt.iter, fn)
            self._assign(stmt.target, {("inst", t[1]) for t in iterated if t[0] == "list"}, fn)
            for child in stmt.body + stmt.orelse:
                self._stmt(child, fn, optional)
        elif isinstance(stmt, ast.Try):
            catches_import = any(
                h.type is not None
                and any(
                    isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
                    for n in ast.walk(h.type)
                )
                for h in stmt.handlers
            )
            for child in stmt.body:
                self._stmt(child, fn, optional or catches_import)
            for handler in stmt.handlers:
                if handler.type is not None:
                    self._expr(handler.type, fn)
                for child in handler.body:
                    self._stmt(child, fn, optional)
            for child in stmt.orelse + stmt.finalbody:
                self._stmt(child, fn, optional)
        elif isinstance(stmt, ast.With | ast.AsyncWith):
            for item in stmt.items:
                self._expr(item.context_expr, fn)
            for child in stmt.body:
                self._stmt(child, fn, optional)
        elif isinstance(stmt, ast.If | ast.While):
            self._expr(stmt.test, fn)
            for child in stmt.body + stmt.orelse:
                self._stmt(child, fn, optional)
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return  # nested functions are analysed on their own
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.expr):
                    self._expr(child, fn)

    def _bind_import(self, module, name, asname, fn, node, optional) -> None:
        local = asname or (name if name is not None else module.split(".")[0])
        key = ("local", fn.key, local)
        top = module.split(".")[0]
        if top == "tensorrt" and name is None:
            self._add(key, {("mod",)})
            return
        if top == "sd_deploy" and name is not None:
            target = self.module_symbols.get(module, {}).get(name)
            if target is not None:
                self._add(key, {("fn", target)})
            elif f"{module}.{name}" in self.module_symbols:  # a scanned module
                self._add(key, {("pmod", f"{module}.{name}")})
            return
        if top not in _PY_LIBRARIES:
            return
        try:
            obj = importlib.import_module(module)
            if name is not None:
                if hasattr(obj, name):
                    obj = getattr(obj, name)
                else:
                    obj = importlib.import_module(f"{module}.{name}")
        except ImportError as exc:
            if not optional:
                what = f"from {module} import {name}" if name else f"import {module}"
                self._use(top, node, fn, what, f"not in the real library: {exc}")
            return
        what = f"from {module} import {name}" if name else f"import {module}"
        self._use(top, node, fn, what, "")
        self._add(key, {self._py(obj, top)})

    def _assign(self, target: ast.expr, types: set[tuple], fn: Function) -> None:
        if isinstance(target, ast.Name):
            self._add(("local", fn.key, target.id), types)
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and fn.cls
        ):
            self._add(("attr", fn.cls, target.attr), types)
        elif isinstance(target, ast.Tuple | ast.List):
            elements = {("inst", t[1]) for t in types if t[0] == "list"}
            for element in target.elts:
                self._assign(element, elements, fn)
        else:
            self._expr(target, fn)

    # -- expressions --

    def _lookup(self, name: str, fn: Function) -> set[tuple]:
        scope: Function | None = fn
        while scope is not None:
            found = self.env.get(("local", scope.key, name))
            if found:
                return found
            if name in scope.params:
                return set()
            scope = self.functions.get(scope.parent) if scope.parent else None
        found = self.env.get(("local", f"{fn.module}:<module>", name))
        if found:
            return found
        symbol = self.module_symbols.get(fn.module, {}).get(name)
        if symbol is not None:
            return {("fn", symbol)}
        return set()

    def _expr(self, node: ast.expr, fn: Function) -> set[tuple]:
        if isinstance(node, ast.Name):
            return self._lookup(node.id, fn)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and fn.cls:
                found = self.env.get(("attr", fn.cls, node.attr), set())
                if found:
                    return found
                key = f"{fn.cls}.{node.attr}"
                return {("fn", key)} if key in self.functions else set()
            result = set()
            for base in self._expr(node.value, fn):
                result |= self._attribute(base, node.attr, node, fn, called=False)
            return result
        if isinstance(node, ast.Call):
            return self._call(node, fn)
        if isinstance(node, ast.Subscript):
            bases = self._expr(node.value, fn)
            self._expr(node.slice, fn)
            result: set[tuple] = set()
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
            for base in bases:
                if base[0] == "dict" and isinstance(key, str):
                    result |= self.env.get(("dict", base[1], key), set())
                elif base[0] == "list":
                    result.add(("inst", base[1]))
            return result
        if isinstance(node, ast.Dict):
            ident = f"{fn.path}:{node.lineno}:{node.col_offset}"
            for k, v in zip(node.keys, node.values, strict=True):
                if k is not None:
                    self._expr(k, fn)
                types = self._expr(v, fn)
                if isinstance(k, ast.Constant) and isinstance(k.value, str):
                    self._add(("dict", ident, k.value), types)
            return {("dict", ident)}
        if isinstance(node, ast.IfExp):
            self._expr(node.test, fn)
            return self._expr(node.body, fn) | self._expr(node.orelse, fn)
        if isinstance(node, ast.BoolOp):
            result = set()
            for value in node.values:
                result |= self._expr(value, fn)
            return result
        if isinstance(node, ast.Lambda):
            return set()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._expr(child, fn)
            elif isinstance(child, ast.comprehension):
                iterated = self._expr(child.iter, fn)
                self._assign(child.target, {("inst", t[1]) for t in iterated if t[0] == "list"}, fn)
                for cond in child.ifs:
                    self._expr(cond, fn)
        return set()

    def _call(self, node: ast.Call, fn: Function) -> set[tuple]:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):  # getattr(x, "name"[, default]) reads x.name: the name must be real too
            attribute = ast.copy_location(
                ast.Attribute(value=node.args[0], attr=node.args[1].value, ctx=ast.Load()), node
            )
            for extra in node.args[2:]:
                self._expr(extra, fn)
            return self._expr(attribute, fn)
        args = [a for a in node.args if not isinstance(a, ast.Starred)]
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        unknown_kwargs = False
        for k in node.keywords:
            if k.arg is None:  # **{"a": 1} or **({"a": 1} if c else {}): its keys are known
                keys = _literal_keys(k.value)
                unknown_kwargs |= keys is None
                keywords += keys or []
        star = len(args) != len(node.args) or unknown_kwargs
        arg_types = [self._expr(a, fn) for a in node.args]
        kw_types = {k.arg: self._expr(k.value, fn) for k in node.keywords}
        is_self = isinstance(node.func, ast.Attribute) and (
            isinstance(node.func.value, ast.Name) and node.func.value.id == "self"
        )
        if isinstance(node.func, ast.Attribute) and not is_self:
            result: set[tuple] = set()
            for base in self._expr(node.func.value, fn):
                result |= self._attribute(
                    base,
                    node.func.attr,
                    node,
                    fn,
                    called=True,
                    npos=len(args),
                    keywords=keywords,
                    star=star,
                    arg_types=arg_types,
                    kw_types=kw_types,
                )
            return result
        callees = self._expr(node.func, fn)
        seeded = self._seed(node, fn)
        if seeded:
            return seeded
        result = set()
        for callee in callees:
            result |= self._invoke(callee, node, fn, len(args), keywords, star, arg_types, kw_types)
        return result

    def _seed(self, node: ast.Call, fn: Function) -> set[tuple]:
        """A lazy-import helper (a call named *import*) given a library's module name
        gives that module: "tensorrt" the real API, polygraphy / cuda the real objects."""
        if isinstance(node.func, ast.Attribute):
            name = node.func.attr
        else:
            name = getattr(node.func, "id", "")
        if not (
            "import" in name.lower()
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            return set()
        module = node.args[0].value
        top = module.split(".")[0]
        if module == "tensorrt":
            return {("mod",)}
        if top not in _PY_LIBRARIES:
            return set()
        try:
            obj = importlib.import_module(module)
        except ImportError as exc:
            if importlib.util.find_spec(top) is not None:
                self._use(top, node, fn, f"{name}({module!r})", f"not in the real library: {exc}")
            return set()
        self._use(top, node, fn, f"{name}({module!r})", "")
        return {self._py(obj, top)}

    def _invoke(self, callee, node, fn, npos, keywords, star, arg_types, kw_types):
        kind = callee[0]
        if kind == "fn":  # a project function, method or class
            target = callee[1]
            if target in self.classes:
                init = f"{target}.__init__"
                if init in self.functions:
                    self._bind_args(self.functions[init], arg_types, kw_types, skip_self=True)
                return {("proj", target)}
            if target in self.functions:
                function = self.functions[target]
                self._bind_args(function, arg_types, kw_types, skip_self=function.cls is not None)
                return self.env.get(("ret", target), set())
            return set()
        if kind in ("tcall", "cls", "py", "mod"):
            return self._call_library(callee, node, fn, npos, keywords, star)
        return set()

    def _bind_args(self, function: Function, arg_types, kw_types, skip_self: bool) -> None:
        params = function.params[1:] if skip_self else function.params
        for name, types in zip(params, arg_types, strict=False):
            self._add(("local", function.key, name), types)
        for name, types in kw_types.items():
            if name in function.params:
                self._add(("local", function.key, name), types)

    # -- library values --

    def _attribute(
        self,
        base,
        attr,
        node,
        fn,
        called,
        npos=0,
        keywords=(),
        star=False,
        arg_types=(),
        kw_types=None,
    ):
        kind = base[0]
        if kind == "pmod":
            symbol = self.module_symbols.get(base[1], {}).get(attr)
            if symbol is None:
                return set()
            if called:
                return self._invoke(
                    ("fn", symbol), node, fn, npos, keywords, star, arg_types, kw_types or {}
                )
            return {("fn", symbol)}
        if kind == "proj":
            found = self.env.get(("attr", base[1], attr), set())
            method = f"{base[1]}.{attr}"
            if called and method in self.functions:
                self._bind_args(self.functions[method], arg_types, kw_types or {}, True)
                return self.env.get(("ret", method), set())
            return found
        if kind in ("mod", "cls", "inst"):
            owner = None if kind == "mod" else base[1]
            label = "tensorrt" if owner is None else owner
            entry = self.api.member(owner, attr)
            if entry is None:
                self._use(
                    "tensorrt",
                    node,
                    fn,
                    f"{label}.{attr}",
                    f"the real tensorrt {self.api.d['version']} has no {label}.{attr}",
                )
                return set()
            if entry["kind"] == "class":
                value = ("cls", entry["qualname"])
                if not called:
                    self._use("tensorrt", node, fn, f"{label}.{attr}", "")
                    return {value}
                return self._call_library(
                    value, node, fn, npos, keywords, star, label=f"{label}.{attr}"
                )
            if entry["kind"] == "property":
                self._use("tensorrt", node, fn, f"{label}.{attr}", "")
                return self.api.types_of(entry["returns"]) if kind == "inst" else set()
            if entry["kind"] == "value":
                self._use("tensorrt", node, fn, f"{label}.{attr}", "")
                vtype = entry["type"]
                return {("inst", vtype)} if vtype in self.api.classes else set()
            if entry["kind"] == "callable":
                handle = ("tcall", owner, attr, kind == "inst")
                if not called:
                    self._use("tensorrt", node, fn, f"{label}.{attr}", "")
                    return set()
                return self._call_library(handle, node, fn, npos, keywords, star)
            self._use("tensorrt", node, fn, f"{label}.{attr}", "")
            return set()
        if kind in ("py", "pyinst"):
            obj = self.objects[base[1]]
            library = self.libraries[base[1]]
            label = f"{self._name_of(obj)}{'()' if kind == 'pyinst' else ''}.{attr}"
            if not hasattr(obj, attr):
                self._use(library, node, fn, label, f"the real {library} has no {label}")
                return set()
            value = getattr(obj, attr)
            if not called:
                self._use(library, node, fn, label, "")
                return {self._py(value, library)}
            return self._call_library(
                self._py(value, library),
                node,
                fn,
                npos,
                keywords,
                star,
                label=label,
                bound=kind == "pyinst",
            )
        if kind == "dict" or kind == "list":
            return set()
        return set()

    def _call_library(self, callee, node, fn, npos, keywords, star, label=None, bound=False):
        call = f"{npos} positional" + (f", {', '.join(keywords)}=" if keywords else "")
        if callee[0] == "tcall":
            _, owner, name, is_bound = callee
            entry = self.api.member(owner, name)
            sigs = entry["sigs"] if entry else []
            label = f"{owner + '.' if owner else 'tensorrt.'}{name}"
            drop = 1 if is_bound else 0
            returns = set()
            fits = False
            for sig in sigs:
                params = (
                    sig["params"][drop:]
                    if drop and sig["params"] and sig["params"][0][0] in ("self", "arg0")
                    else sig["params"]
                )
                if _fits(params, npos, keywords, star):
                    fits = True
                    returns |= self.api.types_of(sig["returns"])
            problem = (
                ""
                if fits or not sigs
                else (
                    f"{label}({call}) fits none of the real signatures "
                    + " | ".join(_sig_text(s["params"][drop:]) for s in sigs)
                )
            )
            self._use("tensorrt", node, fn, f"{label}({call})", problem)
            return returns
        if callee[0] == "cls":
            qualname = callee[1]
            sigs = self.api.classes.get(qualname, {}).get("init", [])
            fits = not sigs or any(_fits(s["params"][1:], npos, keywords, star) for s in sigs)
            problem = (
                ""
                if fits
                else (
                    f"{qualname}({call}) fits none of the real constructors "
                    + " | ".join(_sig_text(s["params"][1:]) for s in sigs)
                )
            )
            self._use("tensorrt", node, fn, f"{label or qualname}({call})", problem)
            return {("inst", qualname)}
        if callee[0] == "mod":
            self._use("tensorrt", node, fn, "tensorrt()", "the tensorrt module is not callable")
            return set()
        obj = self.objects[callee[1]]
        library = self.libraries[callee[1]]
        label = label or self._name_of(obj)
        params = python_params(obj, bound=bound)
        if params is None:
            problem = "" if callable(obj) else f"{label} is not callable"
        elif _fits(params, npos, keywords, star):
            problem = ""
        else:
            problem = f"{label}({call}) does not fit the real signature {_sig_text(params)}"
        self._use(library, node, fn, f"{label}({call})", problem)
        if inspect.isclass(obj):
            return {("pyinst", callee[1])}
        return set()

    @staticmethod
    def _name_of(obj: Any) -> str:
        if inspect.ismodule(obj):
            return obj.__name__
        return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def _literal_keys(node: ast.expr) -> list[str] | None:
    """The constant keys of a dict literal (or of both branches of a conditional of dict
    literals); None when they cannot be read."""
    if isinstance(node, ast.Dict):
        if all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
            return [k.value for k in node.keys]  # type: ignore[union-attr]
        return None
    if isinstance(node, ast.IfExp):
        left, right = _literal_keys(node.body), _literal_keys(node.orelse)
        if left is None or right is None:
            return None
        return left + [k for k in right if k not in left]
    return None


def python_params(obj: Any, bound: bool = False) -> list[list[Any]] | None:
    """[[name, has_default]] of a Python/Cython callable; a class's __init__ chain through
    **kwargs (Polygraphy's CreateConfig passes them to its base). None when unknown."""
    if inspect.isclass(obj):
        merged: list[list[Any]] = []
        for klass in obj.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            try:
                sig = inspect.signature(init)
            except (TypeError, ValueError):
                return None
            params = list(sig.parameters.values())[1:]
            names = {n for n, _ in merged}
            for p in params:
                if p.kind is p.VAR_KEYWORD or p.name in names:
                    continue
                merged.append(_param(p))
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                return merged
        return merged + [["**kwargs", True]]
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [_param(p) for p in sig.parameters.values()]
    if bound and params and params[0][0] == "self":
        params = params[1:]
    return params


def _param(p: inspect.Parameter) -> list[Any]:
    if p.kind is p.VAR_POSITIONAL:
        return ["*" + p.name, True]
    if p.kind is p.VAR_KEYWORD:
        return ["**" + p.name, True]
    return [p.name, p.default is not p.empty]


def problems(uses: Iterable[Use]) -> Iterator[str]:
    for use in uses:
        if use.problem:
            yield f"{use.where}: {use.problem}"
