"""Every error moai-sdk raises on purpose is a MoAIError subclass (read from the source, not from a list of names).

The scan walks every ``raise`` in ``src/moai_sdk``. A raise passes when it

* re-raises (``raise``, ``raise exc``, ``raise stored[1]``: no new exception is made here);
* constructs a class that subclasses :class:`moai_sdk.MoAIError` (the class tree is read from the source, so an
  error class defined in any module counts), or calls a factory function whose every ``return`` constructs one
  (or one of the internal classes below);
* raises ``NotImplementedError``;
* follows a Python protocol that requires a built-in type: ``AttributeError`` in ``__getattr__``, ``KeyError`` in
  ``__getitem__``, ``StopIteration`` in ``__next__``, ``ValueError`` / ``TypeError`` / ``AssertionError`` in a
  Pydantic validator (decorated with ``field_validator`` / ``model_validator`` or passed to ``PlainValidator`` ...;
  Pydantic turns them into a ``ValidationError``), ``TypeError`` in a ``json.dump(s)`` ``default=`` hook,
  ``argparse.ArgumentTypeError`` in a function given as ``type=`` to ``add_argument`` (argparse turns it into a
  usage error naming the option);
* constructs an exception class defined in the package for internal control flow that the package itself
  catches (an ``except`` clause or an exception handler names it), so it never reaches a caller.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moai_sdk"

_PROTOCOL = {"__getattr__": {"AttributeError"}, "__getitem__": {"KeyError"}, "__next__": {"StopIteration"}}
_VALIDATOR_DECORATORS = {"field_validator", "model_validator", "validator", "root_validator"}
_VALIDATOR_WRAPPERS = {"PlainValidator", "BeforeValidator", "AfterValidator", "WrapValidator"}
_VALIDATOR_ERRORS = {"ValueError", "TypeError", "AssertionError"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    return None


class _Package:
    """Class tree, factory functions, validator functions and caught exception names of a set of modules."""

    def __init__(self, trees: dict[str, ast.Module]):
        self.trees = trees
        self.bases: dict[str, list[str]] = {}
        self.returns: dict[str, list[ast.AST | None]] = {}
        self.caught: set[str] = set()
        self.validators: set[tuple[str, str]] = set()  # (module, function name)
        self.json_defaults: set[tuple[str, str]] = set()
        self.arg_types: set[tuple[str, str]] = set()  # argparse ``type=`` functions
        for module, tree in trees.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    self.bases[node.name] = [n for n in map(_name, node.bases) if n]
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    rets = [r.value for r in ast.walk(node) if isinstance(r, ast.Return)]
                    self.returns.setdefault(node.name, []).extend(rets)
                    if any(_name(d) in _VALIDATOR_DECORATORS for d in node.decorator_list):
                        self.validators.add((module, node.name))
                elif isinstance(node, ast.ExceptHandler) and node.type is not None:
                    types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                    self.caught.update(n for n in map(_name, types) if n)
                elif isinstance(node, ast.Call):
                    called = _name(node.func)
                    if called in _VALIDATOR_WRAPPERS:
                        self.validators.update((module, n) for n in map(_name, node.args) if n)
                    if called in ("dump", "dumps"):
                        self.json_defaults.update((module, _name(k.value)) for k in node.keywords if k.arg == "default")
                    if called == "add_argument":
                        self.arg_types.update((module, _name(k.value)) for k in node.keywords if k.arg == "type")
                    if called in ("add_exception_handler", "exception_handler") and node.args:
                        self.caught.add(_name(node.args[0]) or "")

    def is_moai_error(self, name: str | None, seen: frozenset[str] = frozenset()) -> bool:
        if name == "MoAIError":
            return True
        if name is None or name in seen:
            return False
        return any(self.is_moai_error(b, seen | {name}) for b in self.bases.get(name, []))

    def is_factory(self, name: str | None) -> bool:
        rets = self.returns.get(name or "", [])
        return bool(rets) and all(isinstance(r, ast.Call) and self.is_allowed_class(_name(r)) for r in rets)

    def is_allowed_class(self, name: str | None) -> bool:
        return self.is_moai_error(name) or self.is_internal(name)

    def is_internal(self, name: str | None) -> bool:
        """An exception class defined here (not a built-in) that the package catches itself."""
        return name in self.bases and name in self.caught


def violations(pkg: _Package) -> tuple[list[str], int]:
    """``(offending raises as 'module:line: Name', number of raises that construct an exception)``."""
    bad, constructed = [], 0
    for module, tree in pkg.trees.items():
        owner = _innermost_functions(tree)
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
            body = func.body if isinstance(func, ast.Module) else [func]
            for node in (n for stmt in body for n in ast.walk(stmt)):
                if not isinstance(node, ast.Raise) or not isinstance(node.exc, ast.Call):
                    continue
                if isinstance(func, ast.Module) and owner[id(node)] is not None:
                    continue  # judged with its function
                if not isinstance(func, ast.Module) and owner[id(node)] is not func:
                    continue  # judged with the innermost function
                constructed += 1
                name = _name(node.exc)
                fname = getattr(func, "name", "")
                ok = (
                    pkg.is_moai_error(name)
                    or pkg.is_factory(name)
                    or name == "NotImplementedError"
                    or name in _PROTOCOL.get(fname, set())
                    or ((module, fname) in pkg.validators and name in _VALIDATOR_ERRORS)
                    or ((module, fname) in pkg.json_defaults and name == "TypeError")
                    or ((module, fname) in pkg.arg_types and name == "ArgumentTypeError")
                    or pkg.is_internal(name)
                )
                if not ok:
                    bad.append(f"{module}:{node.lineno}: {name}")
    return sorted(bad), constructed


def _innermost_functions(tree: ast.Module) -> dict[int, ast.AST | None]:
    """``id(node)`` -> the innermost function definition that contains the node (``None`` at module level), for
    every node of ``tree``, in one pass (asking each node's enclosing function by walking every function is
    quadratic: 25 s over the package)."""
    owner: dict[int, ast.AST | None] = {}
    stack: list[tuple[ast.AST, ast.AST | None]] = [(tree, None)]
    while stack:
        node, func = stack.pop()
        for child in ast.iter_child_nodes(node):
            owner[id(child)] = func
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            stack.append((child, inner))
    return owner


def _package(sources: dict[str, str]) -> _Package:
    return _Package({name: ast.parse(text) for name, text in sources.items()})


def _real_package() -> _Package:
    return _package({str(p.relative_to(SRC)): p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py"))})


def test_every_deliberate_raise_is_a_moai_error():
    bad, constructed = violations(_real_package())
    assert constructed > 200, "the scan found too few raises: is it reading the package?"
    assert not bad, "raise a MoAIError subclass (see moai_sdk.errors) instead of:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    raise ValueError('x')", ["m.py:2: ValueError"]),
        ("def f():\n    raise RuntimeError('x')", ["m.py:2: RuntimeError"]),
        ("def f():\n    raise ConfigError('x')", []),
        ("class Mine(InputError): pass\ndef f():\n    raise Mine('x')", []),
        ("def err(): return ConfigError('x')\ndef f():\n    raise err()", []),
        ("def err(): return ValueError('x')\ndef f():\n    raise err()", ["m.py:3: err"]),
        ("def f(e):\n    raise e", []),
        ("def __getattr__(n):\n    raise AttributeError(n)", []),
        ("def g(n):\n    raise AttributeError(n)", ["m.py:2: AttributeError"]),
        ("class M:\n    @field_validator('a')\n    def v(cls, x):\n        raise ValueError('x')", []),
        ("def v(x):\n    raise ValueError('x')\nT = PlainValidator(v)", []),
        ("def d(x):\n    raise TypeError('x')\njson.dumps(1, default=d)", []),
        ("def t(x):\n    raise ArgumentTypeError('x')\np.add_argument('--n', type=t)", []),
        ("def t(x):\n    raise ArgumentTypeError('x')", ["m.py:2: ArgumentTypeError"]),
        ("class _Stop(Exception): pass\ndef f():\n    raise _Stop()\ntry:\n    f()\nexcept _Stop:\n    pass", []),
        ("class _Stop(Exception): pass\ndef f():\n    raise _Stop()", ["m.py:3: _Stop"]),
        ("def f():\n    def g():\n        raise ValueError('x')\n    raise ConfigError('y')", ["m.py:3: ValueError"]),
    ],
)
def test_the_scan_tells_deliberate_errors_apart(source, expected):
    errors = (SRC / "errors.py").read_text(encoding="utf-8")
    bad, _ = violations(_package({"errors.py": errors, "m.py": source}))
    assert bad == expected
