"""The prompt set: programming tasks built offline from the signatures and docstrings of functions in
Python's standard library, which the project may redistribute (PSF license) and which no evaluation set
(HumanEval, MBPP, ...) is drawn from.

For each public, documented, pure-Python function defined in one of `SOURCE_MODULES`, the task is
"Write a Python function `name(signature)`. <first sentence of its docstring>". The set is deterministic
for a given Python version (ordered by a hash of the qualified name, so modules are interleaved) and
deduplicated by function name and by description. The run folder keeps the exact list used
(`prompts.jsonl`), so a resumed run never sees a different set.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path

SOURCE_MODULES = (
    "argparse", "ast", "base64", "calendar", "colorsys", "configparser", "copy", "csv", "dataclasses", "difflib",
    "email.utils", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "heapq", "hmac", "html", "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "keyword", "linecache",
    "locale", "mimetypes", "ntpath", "operator", "optparse", "os", "pathlib", "pickletools", "pkgutil", "platform",
    "plistlib", "posixpath", "pprint", "py_compile", "quopri", "random", "re", "reprlib", "secrets", "shlex",
    "shutil", "smtplib", "statistics", "string", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "tokenize", "traceback", "types", "typing", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "xml.sax.saxutils", "zipfile",
    # more pure-Python stdlib modules (a larger set for GPU labeling runs)
    "bisect", "cmd", "codecs", "codeop", "collections", "contextlib", "dis", "doctest", "email.header",
    "email.message", "email.parser", "email.quoprimime", "email.base64mime", "email.charset", "enum", "graphlib",
    "hashlib", "html.parser", "http.client", "http.server", "importlib.util", "importlib.metadata", "logging",
    "logging.handlers", "mailbox", "netrc", "numbers", "pdb", "pydoc", "pyclbr", "queue", "runpy", "sched",
    "selectors", "shelve", "site", "socket", "socketserver", "ssl", "symtable", "tabnanny", "threading", "timeit",
    "token", "trace", "tracemalloc", "unittest.mock", "unittest.case", "urllib.robotparser", "venv", "weakref",
    "wsgiref.util", "wsgiref.headers", "xml.dom.minidom", "xml.etree.ElementTree", "zipapp", "zoneinfo",
    "concurrent.futures", "asyncio.tasks", "asyncio.base_events", "asyncio.streams", "multiprocessing.connection",
    "bdb", "cProfile", "profile", "pstats", "compileall", "modulefinder", "stringprep", "json.decoder",
    "json.encoder", "xml.sax.handler", "xmlrpc.client", "encodings.idna", "nturl2path", "importlib.resources",
    "code", "ctypes.util", "curses.ascii", "dbm",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    text = " ".join(line.strip() for line in para.splitlines())
    return _SENTENCE_END.split(text, maxsplit=1)[0].strip()


def _candidates(modules=SOURCE_MODULES):
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a missing optional stdlib module just contributes nothing
            continue
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or getattr(fn, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(fn) or ""
            sentence = first_sentence(doc)
            if not 25 <= len(sentence) <= 220 or ">>>" in sentence or not sentence[0].isupper():
                continue
            if "deprecated" in doc.lower()[:200]:
                continue
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            if "<" in sig or len(sig) > 100:
                continue
            if not sentence.endswith((".", "!", "?")):
                sentence += "."
            yield dict(id=f"{module.__name__}.{name}", name=name, text=f"Write a Python function `{name}{sig}`. {sentence}")


def build_prompts(n: int | None = None, modules=SOURCE_MODULES) -> list[dict]:
    """Up to `n` prompts ({id, text}), deterministic and deduplicated (by function name and description)."""
    items = sorted(_candidates(modules), key=lambda c: hashlib.sha256(c["id"].encode()).hexdigest())
    seen_names, seen_texts, out = set(), set(), []
    for c in items:
        description = re.sub(r"\W+", " ", c["text"].split("`. ", 1)[-1].lower()).strip()
        if c["name"] in seen_names or description in seen_texts:
            continue
        seen_names.add(c["name"])
        seen_texts.add(description)
        out.append({"id": c["id"], "text": c["text"]})
        if n is not None and len(out) >= n:
            break
    return out


def load_prompts_file(path: str | Path) -> list[dict]:
    """A user-supplied set: JSON lines with "text" (and optional "id"), or plain text, one prompt per line."""
    p = Path(path)
    out = []
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            d = json.loads(line)
            out.append({"id": str(d.get("id", f"{p.stem}-{i}")), "text": d["text"]})
        else:
            out.append({"id": f"{p.stem}-{i}", "text": line.strip()})
    return out
