"""Static checks of a NixOS VM test script against the real NixOS test driver.

The driver (``nixos/lib/test-driver`` of the nixpkgs tree) is read, not run:
the names it puts in a script's globals (``Driver.test_symbols``) and the
methods of its machines (``BaseMachine`` and ``QemuMachine``) with their
parameters; and the type hints ``nixos/lib/testing/driver.nix`` puts before
a script to type-check it (``nixos/lib/test-script-prepend.py``): the
driver's functions with their parameters, and its typed globals. A script is
then checked for what would fail the test's build (the type check) or only
fail after the VMs booted, or time out after 900 s:

- a name that is neither the driver's, a node's, nor bound by the script;
- a method called on a node that machines do not have, or with arguments
  its signature does not take;
- a function of the driver (``retry``, ``polling_condition``...) called with
  arguments its signature does not take;
- a global of the driver's type hints (``machines``, ``log``...) bound
  again at the script's top level, which the type check refuses (a dict
  of nodes named ``machines`` is not the driver's list of machines);
- ``wait_for_open_port(PORT)`` without an address, which probes
  ``localhost``, on a node whose keel daemon listens on PORT at another
  address only (the listeners come from the node's evaluated configuration).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import ipaddress
from dataclasses import dataclass
from pathlib import Path

MACHINE_CLASSES = ("BaseMachine", "QemuMachine")


@dataclass(frozen=True)
class DriverApi:
    symbols: frozenset[str]
    methods: dict[str, inspect.Signature]
    functions: dict[str, inspect.Signature]  # the driver's functions, as its type hints give them
    typed: frozenset[str]  # the globals its type hints declare a type for

    @classmethod
    def read(cls, nixpkgs: Path) -> DriverApi:
        source = nixpkgs / "nixos/lib/test-driver/src/test_driver"
        functions, typed = _type_hints((nixpkgs / "nixos/lib/test-script-prepend.py").read_text())
        return cls(
            _test_symbols((source / "driver.py").read_text()),
            _machine_methods((source / "machine/__init__.py").read_text()),
            functions,
            typed,
        )


def _test_symbols(driver: str) -> frozenset[str]:
    """The keys of ``general_symbols = dict(...)`` in ``Driver.test_symbols``."""
    for node in ast.walk(ast.parse(driver)):
        if isinstance(node, ast.FunctionDef) and node.name == "test_symbols":
            for inner in ast.walk(node):
                if (
                    isinstance(inner, ast.Assign)
                    and any(
                        isinstance(t, ast.Name) and t.id == "general_symbols" for t in inner.targets
                    )
                    and isinstance(inner.value, ast.Call)
                ):
                    return frozenset(k.arg for k in inner.value.keywords if k.arg)
    raise ValueError("the driver has no Driver.test_symbols with general_symbols = dict(...)")


def _signature(function: ast.FunctionDef) -> inspect.Signature:
    args = function.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params: list[inspect.Parameter] = []
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if i == 0 and arg.arg == "self":
            continue
        kind = (
            inspect.Parameter.POSITIONAL_ONLY
            if arg in args.posonlyargs
            else inspect.Parameter.POSITIONAL_OR_KEYWORD
        )
        params.append(
            inspect.Parameter(
                arg.arg, kind, default=inspect.Parameter.empty if default is None else 0
            )
        )
    if args.vararg:
        params.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        params.append(
            inspect.Parameter(
                arg.arg,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if kw_default is None else 0,
            )
        )
    if args.kwarg:
        params.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def _machine_methods(machine: str) -> dict[str, inspect.Signature]:
    methods: dict[str, inspect.Signature] = {}
    for node in ast.parse(machine).body:
        if isinstance(node, ast.ClassDef) and node.name in MACHINE_CLASSES:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    methods[item.name] = _signature(item)
    if "wait_for_open_port" not in methods:
        raise ValueError("the driver's machines have no wait_for_open_port")
    return methods


def _type_hints(prepend: str) -> tuple[dict[str, inspect.Signature], frozenset[str]]:
    """The module-level functions (but ``create_fake_*``, its own helpers) and annotated
    globals of the driver's type hints."""
    functions: dict[str, inspect.Signature] = {}
    typed: set[str] = set()
    for node in ast.parse(prepend).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("create_fake_"):
            functions[node.name] = _signature(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            typed.add(node.target.id)
    if "retry" not in functions or "machines" not in typed:
        raise ValueError("the driver's type hints have no retry() or no typed `machines`")
    return functions, frozenset(typed)


def top_level_bindings(tree: ast.Module) -> list[ast.Name]:
    """The names the script binds in its global scope (not in functions, lambdas,
    classes or comprehensions, which have scopes of their own)."""
    found: list[ast.Name] = []
    scopes = (
        ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
        ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
    )  # fmt: skip

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, scopes):
                continue
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def bound_names(tree: ast.AST) -> set[str]:
    """Every name the script binds anywhere (scopes are not told apart)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def undefined_names(script: str, nodes: set[str], api: DriverApi) -> set[str]:
    tree = ast.parse(script)
    known = bound_names(tree) | api.symbols | nodes | set(dir(builtins))
    if len(nodes) == 1:
        known.add("machine")  # the driver's alias for a single node
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - known


def _local_or_wildcard(host: str) -> bool:
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_loopback or address.is_unspecified


def check_script(
    script: str, listeners: dict[str, dict[str, list[str]]], api: DriverApi
) -> list[str]:
    """What in ``script`` would fail in the VMs. ``listeners``: node -> unit -> ["HOST:PORT"]."""
    nodes = set(listeners)
    problems = [f"undefined name {name!r}" for name in sorted(undefined_names(script, nodes, api))]
    machine_names = nodes | ({"machine"} if len(nodes) == 1 else set())
    tree = ast.parse(script)
    own = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    for bound in top_level_bindings(tree):
        if bound.id in api.typed:
            problems.append(
                f"line {bound.lineno}: {bound.id!r} is a global of the test driver's type hints "
                "(nixos/lib/test-script-prepend.py): binding it again fails the type check; "
                "use another name"
            )
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
            function = call.func.id
            if function in api.functions and function not in own:
                problems += _binding_problems(
                    api.functions[function], call, f"line {call.lineno}: {function}"
                )
            continue
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        receiver, method = call.func.value, call.func.attr
        on_node = isinstance(receiver, ast.Name) and receiver.id in machine_names
        where = f"line {call.lineno}: {ast.unparse(call.func)}"
        if method not in api.methods:
            if on_node:
                problems.append(f"{where}: the test driver's machines have no method {method!r}")
            continue
        if not isinstance(receiver, ast.Name):
            continue
        binding = _binding_problems(api.methods[method], call, where)
        if binding:
            problems += binding
            continue
        if method == "wait_for_open_port":
            problems += _port_problems(call, receiver.id, listeners, where, api)
    return problems


def _binding_problems(signature: inspect.Signature, call: ast.Call, where: str) -> list[str]:
    """Whether ``call``'s arguments fit ``signature`` (not told when it passes ``*`` or ``**``)."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(
        k.arg is None for k in call.keywords
    ):
        return []
    try:
        signature.bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
    except TypeError as exc:
        return [f"{where}(...): {exc}"]
    return []


def _port_problems(
    call: ast.Call,
    receiver: str,
    listeners: dict[str, dict[str, list[str]]],
    where: str,
    api: DriverApi,
) -> list[str]:
    bound = api.methods["wait_for_open_port"].bind(
        *call.args, **{k.arg: k.value for k in call.keywords if k.arg}
    )
    port_node = bound.arguments.get("port")
    if "addr" in bound.arguments or not (
        isinstance(port_node, ast.Constant) and isinstance(port_node.value, int)
    ):
        return []
    port = port_node.value
    candidates = [receiver] if receiver in listeners else sorted(listeners)
    problems = []
    for node in candidates:
        for unit, endpoints in listeners[node].items():
            for endpoint in endpoints:
                host, _, endpoint_port = endpoint.rpartition(":")
                if endpoint_port.lstrip("0") == str(port) and not _local_or_wildcard(host):
                    problems.append(
                        f"{where}({port}) waits on localhost, but {unit} on node {node} "
                        f"listens on {endpoint} only: give the address "
                        f"(wait_for_open_port({port}, addr))"
                    )
    return problems
