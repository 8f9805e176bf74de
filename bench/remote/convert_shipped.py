"""Device side: cut the shipped byte stream (chunks c00..c25 = SLM GGUF then LLM GGUF) into the two GGUFs,
verify their sha256, convert to HF folders.  `python3 convert.py slm|llm`."""
import os, sys, time
from pathlib import Path

from r2r_serve.models.prepare import _mark_verified, convert_gguf, gguf_path, verify_file
from r2r_serve.models.registry import DEFAULT_PAIR, model_dir

SLM_BYTES = 491400064
SHIP = Path(os.environ.get("SHIP_DIR", "/root/ship"))


def cut(role):
    chunks = sorted(SHIP.glob("c*"))
    lo, hi = (0, SLM_BYTES) if role == "slm" else (SLM_BYTES, 1 << 62)
    if role == "llm":
        total = sum(c.stat().st_size for c in chunks)
        assert total == SLM_BYTES + 1117320768, f"{len(chunks)} chunks, {total} bytes: some are missing"
    dest = gguf_path(getattr(DEFAULT_PAIR, role))
    dest.parent.mkdir(parents=True, exist_ok=True)
    pos = 0
    with open(dest, "wb") as f:
        for c in chunks:
            n = c.stat().st_size
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                with open(c, "rb") as src:
                    src.seek(a - pos)
                    f.write(src.read(b - a))
            pos += n
    return dest


def main(role):
    t = time.time()
    e = getattr(DEFAULT_PAIR, role)
    out = model_dir(e)
    if not out.exists():
        p = cut(role)
        verify_file(p, e.gguf_sha256)
        _mark_verified(p, e.gguf_sha256)
        print(role, "verified", round(time.time() - t, 1), flush=True)
        convert_gguf(p, out, e, progress=False)
    print(role, "ready", out, round(time.time() - t, 1), flush=True)
    Path(f"/root/{role}.done").touch()


if __name__ == "__main__":
    main(sys.argv[1])
