# Three router variants in parallel on the device's CPU cores; the best (recall at a 10% LLM share) -> /root/best
rm -rf /root/router-*
for v in "a --lr 5e-4 --weight-decay 0.1" "b --lr 1e-3 --weight-decay 0.01 --width 256 --depth 3" \
         "c --lr 1e-3 --weight-decay 0.05 --width 512 --depth 2 --dropout 0.2"; do
  set -- $v; name=$1; shift
  mkdir -p /root/router-$name
  OMP_NUM_THREADS=5 python3 -m r2r_serve.training.cli train-router --data /root/run --target-share 0.12 \
    --out /root/router-$name/qwen2.5-coder-0.5b-instruct.safetensors --report /root/router-$name/report.json "$@" \
    > /root/router-$name/train.log 2>&1 &
done
wait
python3 - <<'PY'
import json, shutil
from pathlib import Path
best, rows = None, []
for d in sorted(Path("/root").glob("router-*")):
    try:
        r = json.loads((d / "report.json").read_text())
    except OSError:
        print(d, "failed:", (d / "train.log").read_text()[-1500:]); continue
    m = r["metrics"]
    rec = m["at_share"]["share_0.1"]["recall"]; ent = m["entropy_baseline_at_share"]["share_0.1"]["recall"]
    rows.append((d.name, m["val_auc"], rec, ent, r["best_epoch"]))
    print(f"{d.name}: AUC {m['val_auc']:.3f} recall@10% {rec:.3f} (entropy {ent:.3f}, AUC {m['entropy_baseline_at_share']['share_0.1']['auc']:.3f}) best epoch {r['best_epoch']}")
    if best is None or rec > best[1]:
        best = (d, rec)
shutil.rmtree("/root/best", ignore_errors=True); shutil.copytree(best[0], "/root/best")
print("best:", best[0].name)
PY
tar -C /root -cf /root/out/routers.tar router-a router-b router-c
