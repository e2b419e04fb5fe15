"""Model files are inspected before any library that could run their code reads them.

No model file medsynth opens may execute code it carries. Each format has its own way in, closed here
by reading the file's structure without running any of it:

* a torch checkpoint is a pickle; :func:`medsynth.model.checkpoint.load_checkpoint` reads it with
  ``torch.load(weights_only=True)``, whose unpickler builds tensors and plain containers only;
* a pt2 archive (``torch.export.save``) is a zip that ``torch.export.load`` reads with the full
  unpickler for any weight or constant marked ``use_pickle``, for custom objects, for legacy weight
  files and for sample inputs its safe unpickler refuses; it ``exec``\\ s the input guards it stores as
  Python source, hands the stored shape expressions to ``sympy.sympify`` (an ``eval``), resolves node
  targets by name under ``torch`` and writes node names into generated code. :func:`check_pt2`
  therefore accepts only the entries ``torch.export.save`` writes for a plain network, raw tensors,
  sample inputs whose pickle names tensor-building globals only, guards and expressions of the
  arithmetic torch writes (parsed with :mod:`ast`, never run), ``torch.ops.aten`` operators and the
  shape arithmetic of :mod:`operator`, and names without quotes or line breaks;
* a TorchScript archive holds pickles read by torch's C++ unpickler; :func:`check_torchscript`
  refuses any pickle naming a global other than those torch's TorchScript writer uses, so it does not
  rely on that unpickler's own refusal;
* ONNX is a protobuf (data, no code) that may point at external files: :func:`check_onnx` refuses them.

Exports also bind their metadata to the network they describe: :func:`network_digest` and
:func:`onnx_network_digest` hash what defines the network (graph and weights, not the metadata), and
the loader compares that with the digest the metadata records, so metadata copied onto another network
is refused. A digest is not a signature: whoever writes a file can compute it, which is why the checks
above do not depend on it.

Example::

    entries = read_archive(path.read_bytes(), "pt2 (torch.export) model", path)
    check_pt2(entries, path)  # raises CheckpointError before torch.export.load sees the bytes
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

Source = str | Path

# ------------------------------------------------------------------------------- archives
#: Entries the digest leaves out: the extra files (medsynth's metadata among them) and the id torch draws per save.
_UNBOUND = re.compile(r"extra/.*|\.data/serialization_id")


def read_archive(data: bytes, what: str, source: Source) -> dict[str, bytes]:
    """The entries of a torch zip archive, named below its one root folder (``model/data.pkl`` -> ``data.pkl``).

    torch writes one root folder of unique entries, stored or deflated; anything else is refused, so
    what is inspected here is what torch will read.
    """
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"not a readable {what}; is the file complete?", source)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            one_folder = len({name.split("/", 1)[0] for name in names}) == 1 and all("/" in n for n in names)
            plain = all(info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for info in infos)
            if not (one_folder and plain and len(set(names)) == len(names)):
                raise CheckpointError(
                    f"not a {what} as torch writes it (one folder of unique entries)", source
                )
            return {name.split("/", 1)[1]: archive.read(name) for name in names}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError) as exc:
        reason = exc.__class__.__name__
        raise CheckpointError(f"not a readable {what} ({reason}); is the file complete?", source) from exc


def network_digest(entries: dict[str, bytes]) -> str:
    """SHA-256 of an archived network (pt2 or TorchScript): every entry but the extra files and the save id."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        if not _UNBOUND.fullmatch(name):
            digest.update(f"{name}\0{len(entries[name])}\0".encode())
            digest.update(entries[name])
    return digest.hexdigest()


# -------------------------------------------------------------------------------- pickles
_STRING_PUSHES = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING",
}  # fmt: skip
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_NO_STACK_EFFECT = {"PROTO", "FRAME", "STOP"}


def pickle_globals(data: bytes) -> set[str]:
    """``module.name`` of every global a pickle would import, read from its opcodes, never unpickled.

    Raises ValueError for a damaged pickle and for globals that cannot be told without running it: a
    ``STACK_GLOBAL`` whose names are not the two strings pushed just before it, or a code of the copyreg
    extension registry (``EXT1/2/4``).

    >>> import pickle, collections
    >>> sorted(pickle_globals(pickle.dumps(collections.OrderedDict(), protocol=4)))
    ['collections.OrderedDict']
    """
    found: set[str] = set()
    memo: dict[int, Any] = {}
    pushed: list[Any] = []  # what each stack-changing opcode left on top: a string, or None for anything else
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attribute = str(arg).partition(" ")
            found.add(f"{module}.{attribute}")
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            names = pushed[-2:]
            if len(names) < 2 or not all(isinstance(text, str) for text in names):
                raise ValueError("a STACK_GLOBAL whose names are computed")
            found.add(".".join(names))
            pushed[-2:] = [None]
        elif name.startswith("EXT"):
            raise ValueError("a global from the copyreg extension registry")
        elif name in _STRING_PUSHES:
            pushed.append(arg)
        elif name in _MEMO_PUTS or name == "MEMOIZE":  # MEMOIZE (no argument) takes the next index
            memo[arg if isinstance(arg, int) else len(memo)] = pushed[-1] if pushed else None
        elif name in _MEMO_GETS:
            pushed.append(memo.get(arg) if isinstance(arg, int) else None)
        elif name not in _NO_STACK_EFFECT:
            pushed.append(None)
    return found


def check_pickle(data: bytes, allowed: Callable[[str], bool], entry: str, source: Source) -> None:
    """Refuse a pickle that names any global ``allowed`` rejects (or that cannot be read without running it)."""
    try:
        names = pickle_globals(data)
    except ValueError as exc:
        raise CheckpointError(
            f"refused: {entry} is a pickle that cannot be checked without running it ({exc})", source
        ) from exc
    foreign = sorted(name for name in names if not allowed(name))
    if foreign:
        raise CheckpointError(
            f"refused: {entry} is a pickle that would import {foreign[0]}; medsynth's exports never do "
            "(a crafted file that runs code on loading)",
            source,
        )


_TENSOR_GLOBALS = {
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict",
}  # fmt: skip
_STORAGE = re.compile(r"torch\.[A-Z][A-Za-z0-9]*Storage")
_TORCHSCRIPT_PICKLE = {
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_tensor_from_id",
    "restore_type_tag",
}  # fmt: skip


def tensor_global(name: str) -> bool:
    """A global ``torch.save`` of tensors and containers uses (what ``weights_only`` loading allows of them)."""
    return name in _TENSOR_GLOBALS or _STORAGE.fullmatch(name) is not None


def torchscript_global(name: str) -> bool:
    """A global torch's TorchScript writer uses: the archive's own classes (``__torch__.*``), tensors, lists."""
    module, _, attribute = name.rpartition(".")
    return (
        module == "__torch__"
        or module.startswith("__torch__.")
        or tensor_global(name)
        or name == "torch._utils._rebuild_qtensor"
        or (module == "torch.jit._pickle" and attribute in _TORCHSCRIPT_PICKLE)
    )


# ----------------------------------------------------------------------------- TorchScript
#: torch operators that touch files (``aten::save`` writes any path, e.g. a shell's start-up file;
#: ``aten::from_file`` reads one): a network never needs them.
_FILE_OPERATORS = re.compile(r"\b(save|from_file|load_tensor)\b")


def check_torchscript(entries: dict[str, bytes], source: Source) -> None:
    """Every pickle of a TorchScript archive (``data.pkl``, ``constants.pkl``, ``*.debug_pkl`` ...) names
    only globals of :func:`torchscript_global`, and its code calls no operator that touches files."""
    for name, data in sorted(entries.items()):
        if name.endswith("pkl"):
            check_pickle(data, torchscript_global, name, source)
        elif name.startswith("code/") and _FILE_OPERATORS.search(data.decode("utf-8", errors="replace")):
            raise CheckpointError(
                f"refused: {name} calls a torch operator that reads or writes files", source
            )


# ------------------------------------------------------------------------------------ pt2
#: What ``torch.export.save`` writes for one plain network ("model"): no pickled objects, no compiled code.
_PT2_ENTRIES = re.compile(
    r"archive_format|archive_version|byteorder|\.data/(version|serialization_id)|models/model\.json"
    r"|data/weights/(model_weights_config\.json|weight_\d+)"
    r"|data/constants/(model_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/model\.pt|extra/[^/]+"
)
_PAYLOAD_CONFIGS = {
    "data/weights/model_weights_config.json": "weight_",
    "data/constants/model_constants_config.json": "tensor_",
}
#: Text of a pt2 program that torch turns into code or names: identifiers, dotted paths, simple arithmetic.
_PLAIN = re.compile(r"[A-Za-z0-9_.:+\-*,>]*")
_TARGET = re.compile(
    r"torch\.ops\.aten\.\w+\.\w+|torch\.sym_\w+"
    r"|_operator\.(add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|not_|getitem)",
    re.ASCII,
)
#: Program fields that torch keeps as text and never turns into code (debug info, tree specs read as JSON).
_FREE_TEXT = {"metadata", "in_spec", "out_spec", "torch_version"}


def check_pt2(entries: dict[str, bytes], source: Source) -> None:
    """Refuse a pt2 archive that ``torch.export.load`` could not read without running code it carries."""
    unknown = sorted(name for name in entries if not _PT2_ENTRIES.fullmatch(name))
    if unknown:
        raise CheckpointError(
            f"refused: the pt2 archive holds {unknown[0]!r}, which medsynth's exports never have "
            "(a pickled object, compiled code or another program: torch would run it on loading)",
            source,
        )
    if entries.get("archive_format") != b"pt2" or "models/model.json" not in entries:
        raise CheckpointError("not a pt2 (torch.export) archive: no archive_format or model", source)
    for config, prefix in _PAYLOAD_CONFIGS.items():
        if config in entries:
            _check_payload_config(_json(entries[config], config, source), prefix, config, source)
    _check_sample_inputs(entries.get("data/sample_inputs/model.pt", b""), source)
    _check_program(_json(entries["models/model.json"], "models/model.json", source), source)


def _json(data: bytes, entry: str, source: Source) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"not a readable pt2 archive: {entry} is not valid JSON", source) from exc


def _check_payload_config(config: Any, prefix: str, entry: str, source: Source) -> None:
    """Weights and constants must be raw tensors (``use_pickle`` false) in files named ``weight_N`` / ``tensor_N``."""
    items = config.get("config") if isinstance(config, dict) else None
    if not isinstance(items, dict):
        raise CheckpointError(f"not a readable pt2 archive: {entry} has no config", source)
    for name, payload in items.items():
        raw = isinstance(payload, dict) and payload.get("use_pickle") is False
        if not (
            raw and re.fullmatch(rf"{prefix}\d+", str(payload.get("path_name"))) and _PLAIN.fullmatch(name)
        ):
            raise CheckpointError(
                f"refused: {entry} stores {name!r} as a pickle or under an odd name; torch.export.load would "
                "unpickle it unsafely (medsynth's exports hold raw tensors only)",
                source,
            )


def _check_sample_inputs(data: bytes, source: Source) -> None:
    """The traced example input: a ``torch.save`` archive of tensors, which torch reads with the full
    unpickler whenever its safe one fails; its pickles may name tensor-building globals only."""
    if not data:
        return
    if not data.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            "refused: data/sample_inputs/model.pt is a bare pickle, which torch.export.load would unpickle "
            "unsafely (medsynth's exports store a torch.save archive of tensors there)",
            source,
        )
    for name, entry in read_archive(data, "pt2 sample input", source).items():
        if name.endswith("pkl"):
            check_pickle(entry, tensor_global, f"data/sample_inputs/model.pt:{name}", source)


def _check_program(program: Any, source: Source) -> None:
    checks: dict[str, Callable[[str], bool]] = {
        "guards_code": _safe_guard,
        "expr_str": _safe_expression,
        "target": lambda text: _TARGET.fullmatch(text) is not None and not _FILE_OPERATORS.search(text),
    }
    for key, text in _program_text(program):
        if not checks.get(key, lambda t: _PLAIN.fullmatch(t) is not None)(text):
            raise CheckpointError(
                f"refused: the pt2 program's {key or 'name'} {text[:60]!r} is not what torch.export writes "
                "for a network (torch would run it as code on loading)",
                source,
            )


def _program_text(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """``(field, text)`` for every string of a pt2 program: values, and dict keys (field ``""``)."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield "", str(name)
            if name not in _FREE_TEXT:
                yield from _program_text(value, str(name))
    elif isinstance(node, list):
        for item in node:
            yield from _program_text(item, key)
    elif isinstance(node, str):
        yield key, node


def _parsed(text: str) -> ast.AST | None:
    try:
        return ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None


def _safe_guard(text: str) -> bool:
    """A guard as torch writes it: integer arithmetic and comparisons of ``L['x'].size()[i]``, ``max``, ``min``."""
    node = _parsed(text)
    return node is not None and _guard_term(node)


def _guard_term(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, bool)
    if isinstance(node, ast.BinOp):
        return _guard_term(node.left) and _guard_term(node.right)
    if isinstance(node, ast.UnaryOp):
        return _guard_term(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(_guard_term(value) for value in node.values)
    if isinstance(node, ast.Compare):
        return all(_guard_term(value) for value in (node.left, *node.comparators))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
        return not node.keywords and all(_guard_term(arg) for arg in node.args)
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and type(node.slice.value) is int
    ):
        return _input_sizes(node.value)
    return False


def _input_sizes(node: ast.AST) -> bool:
    """``L['x'].size()`` or ``.stride()``: a property of the exported function's named input."""
    if not (isinstance(node, ast.Call) and not node.args and not node.keywords):
        return False
    method = node.func
    if not (isinstance(method, ast.Attribute) and method.attr in ("size", "stride")):
        return False
    arg = method.value
    return (
        isinstance(arg, ast.Subscript)
        and isinstance(arg.value, ast.Name)
        and arg.value.id == "L"
        and isinstance(arg.slice, ast.Constant)
        and isinstance(arg.slice.value, str)
        and arg.slice.value.isidentifier()
    )


#: sympy's constructors (``srepr``) and torch's shape functions: what a stored shape expression may call.
_SYMPY_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan",
    "Equality", "Unequality", "And", "Or", "Not", "FloorDiv", "ModularIndexing", "Where", "PythonMod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
    "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}  # fmt: skip
_SYMPY_NAMES = {"true", "false", "oo", "zoo", "nan"}
_NUMBER = re.compile(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", re.IGNORECASE)


def _safe_expression(text: str) -> bool:
    """A shape expression as torch stores it (sympy's ``srepr``): constructor calls of numbers and symbols."""
    node = _parsed(text)
    return node is not None and _expression_term(node)


def _expression_term(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return type(node.value) in (int, float, bool)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _expression_term(node.operand)
    if isinstance(node, ast.Name):
        return node.id in _SYMPY_NAMES
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
        return False
    args = list(node.args)
    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        name, first = node.func.id, args[0].value
        args = args[1:]
        if not (
            (name == "Symbol" and first.isidentifier()) or (name == "Float" and _NUMBER.fullmatch(first))
        ):
            return False
    keywords_ok = all(
        isinstance(k.value, ast.Constant) and type(k.value.value) in (int, bool) for k in node.keywords
    )
    return keywords_ok and all(_expression_term(arg) for arg in args)


# ------------------------------------------------------------------------------------ ONNX
def read_onnx(data: bytes, source: Source) -> Any:
    """The ``ModelProto`` of an ONNX file (protobuf: parsing runs nothing), refused if it names external data."""
    try:
        import onnx
    except ImportError as exc:
        raise CheckpointError(
            "reading an ONNX model needs the onnx package: pip install 'medsynth[onnx]'", source
        ) from exc
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError (and others) for a damaged file
        reason = exc.__class__.__name__
        raise CheckpointError(f"not a readable ONNX model ({reason}); is the file complete?", source) from exc
    check_onnx(proto, source)
    return proto


def check_onnx(proto: Any, source: Source) -> None:
    """Refuse tensors stored outside the file: onnxruntime would read whatever path they name."""
    import onnx

    external = onnx.TensorProto.EXTERNAL
    tensors = (tensor for graph in (proto.graph, *proto.functions) for tensor in _onnx_tensors(graph))
    if any(tensor.external_data or tensor.data_location == external for tensor in tensors):
        raise CheckpointError(
            "refused: the ONNX model keeps tensors in external files, which medsynth's exports never do",
            source,
        )


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of a graph (or function): initialisers and node attributes, subgraphs included."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            yield from ([attribute.t] if attribute.HasField("t") else [])
            yield from attribute.tensors
            sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
            for sparse in [*sparse_tensors, *attribute.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
            for sub in [*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs]:
                yield from _onnx_tensors(sub)


def onnx_network_digest(proto: Any) -> str:
    """SHA-256 of an ONNX model's graph (nodes and initialisers), serialised deterministically, no metadata."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()
